"""Tiny random-init training models of both families (LongAlign's packed attention registered)."""
from __future__ import annotations

from transformers import LlamaConfig

from longalign.modeling.configuration_chatglm import ChatGLMConfig
from longalign.modeling.packed_attention import ATTN_IMPLEMENTATION, register_packed_attention
from longalign.modeling.weighted_lm import LongAlignChatGLMForConditionalGeneration, LongAlignLlamaForCausalLM


def tiny_llama(**overrides) -> LongAlignLlamaForCausalLM:
    register_packed_attention()
    config = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  intermediate_size=128, vocab_size=128, max_position_embeddings=64,
                  attn_implementation=ATTN_IMPLEMENTATION)
    return LongAlignLlamaForCausalLM(LlamaConfig(**{**config, **overrides}))


def tiny_chatglm(**overrides) -> LongAlignChatGLMForConditionalGeneration:
    register_packed_attention()
    config = dict(num_layers=2, padded_vocab_size=128, hidden_size=32, ffn_hidden_size=64, kv_channels=16,
                  num_attention_heads=4, multi_query_attention=True, multi_query_group_num=2, seq_length=64,
                  rope_ratio=1.0, attn_implementation=ATTN_IMPLEMENTATION)
    return LongAlignChatGLMForConditionalGeneration(ChatGLMConfig(**{**config, **overrides}))
