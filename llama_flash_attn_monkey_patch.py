"""`replace_llama_attn_with_flash_attn()`, the original repository's call, without a monkey patch.

The original replaced `LlamaAttention.forward` with a FlashAttention varlen forward. transformers
now chooses attention through a public registry (`AttentionInterface`), so this call registers
LongAlign's packed attention there (`longalign.modeling.packed_attention`: the varlen kernel --
FlashAttention-4 / FlashAttention-2 on GPU, torch's varlen or the reference elsewhere -- for
calls that carry a pack's geometry, transformers' SDPA for padded batches and generation) and
returns its name; Llama's code is untouched.

    from llama_flash_attn_monkey_patch import replace_llama_attn_with_flash_attn
    attn = replace_llama_attn_with_flash_attn()
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation=attn)
    # or, for a model already loaded: replace_llama_attn_with_flash_attn(model)

The library never imports this file.
"""
from __future__ import annotations

from longalign.modeling.packed_attention import register_packed_attention


def replace_llama_attn_with_flash_attn(model=None) -> str:
    """Register the varlen attention (idempotent); switch `model` to it if given; return its name."""
    name = register_packed_attention()
    if model is not None:
        model.set_attn_implementation(name)
    return name
