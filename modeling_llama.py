"""Llama's model code, the public entry point under the name the original repository used.

Llama is stock transformers: checkpoints are plain `LlamaForCausalLM` folders that need no code
of this project. Training uses `LongAlignLlamaForCausalLM` (the same model, its loss computed by
the weighted chunked loss without building the logits) with LongAlign's packed attention
registered in transformers' AttentionInterface under `ATTN_IMPLEMENTATION`. The library never
imports this file (DESIGN.md §11).

    from modeling_llama import LlamaForCausalLM, ATTN_IMPLEMENTATION, register_packed_attention
    register_packed_attention()
    model = LlamaForCausalLM.from_pretrained(path, attn_implementation=ATTN_IMPLEMENTATION)
"""
from transformers import LlamaConfig, LlamaForCausalLM

from longalign.modeling.packed_attention import ATTN_IMPLEMENTATION, register_packed_attention
from longalign.modeling.weighted_lm import LongAlignLlamaForCausalLM

__all__ = ["ATTN_IMPLEMENTATION", "LlamaConfig", "LlamaForCausalLM", "LongAlignLlamaForCausalLM",
           "register_packed_attention"]
