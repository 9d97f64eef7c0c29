"""ChatGLM3-6B's model code, the public entry point under the name the original repository used.

The code itself is `longalign/modeling/configuration_chatglm.py` + `longalign/modeling/modeling_chatglm.py`:
self-contained remote code (torch + transformers only) that every ChatGLM checkpoint this project
saves carries beside its weights (`longalign.modeling.checkpoints`), so a checkpoint loads anywhere
with `AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)`. This file re-exports it
(one copy of the code, DESIGN.md §11); the library never imports it.

    from modeling_chatglm import ChatGLMConfig, ChatGLMForConditionalGeneration
    model = ChatGLMForConditionalGeneration(ChatGLMConfig(...))       # or .from_pretrained(path)
    answer, history = model.chat(tokenizer, "What is the key?")

`LongAlignChatGLMForConditionalGeneration` is the training class (the weighted chunked loss,
packed attention); `REMOTE_CODE_FILES` are the two files a checkpoint ships.
"""
from longalign.modeling.checkpoints import CHATGLM_CODE as REMOTE_CODE_FILES
from longalign.modeling.configuration_chatglm import ChatGLMConfig
from longalign.modeling.modeling_chatglm import ChatGLMForConditionalGeneration, ChatGLMModel, ChatGLMPreTrainedModel
from longalign.modeling.weighted_lm import LongAlignChatGLMForConditionalGeneration

__all__ = ["ChatGLMConfig", "ChatGLMForConditionalGeneration", "ChatGLMModel", "ChatGLMPreTrainedModel",
           "LongAlignChatGLMForConditionalGeneration", "REMOTE_CODE_FILES"]
