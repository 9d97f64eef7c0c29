"""transformers model code of the two families and the pieces that plug LongAlign into it.

configuration_chatglm.py / modeling_chatglm.py are self-contained remote code (torch + transformers
only) copied into every ChatGLM checkpoint; the other modules are the training side.
"""
