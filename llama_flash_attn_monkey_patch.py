"""Make stock transformers Llama models use the fastest attention there is, for long inputs.

    from llama_flash_attn_monkey_patch import replace_llama_attn_with_flash_attn
    replace_llama_attn_with_flash_attn()          # before loading: later loads default to it
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16)
    replace_llama_attn_with_flash_attn(model)     # or switch a model already loaded

transformers chooses a model's attention at load time (`attn_implementation`). This module picks
`flash_attention_2` when the flash-attn package is installed and CUDA is present, otherwise
`sdpa` (PyTorch's scaled_dot_product_attention, which on CUDA runs its own flash /
memory-efficient kernels: O(T) memory, enough for 64k+ tokens of single-sequence inference) and
warns. Loads of Llama models that name no `attn_implementation` then get that choice; an
explicit `attn_implementation=` still wins. Calling it twice is harmless.
"""
from __future__ import annotations

import functools
import warnings

import torch
from transformers.models.llama import modeling_llama as hf_llama
from transformers.utils import is_flash_attn_2_available

FLASH = "flash_attention_2"
FALLBACK = "sdpa"
_PATCH_MARK = "_longalign_default_attn"


def best_llama_attn_implementation() -> str:
    """`flash_attention_2` where flash-attn is installed and CUDA available, else `sdpa`."""
    if torch.cuda.is_available() and is_flash_attn_2_available():
        return FLASH
    return FALLBACK


def _patch_from_pretrained(impl: str) -> None:
    """Give LlamaPreTrainedModel.from_pretrained (all Llama classes) a default attn_implementation."""
    cls = hf_llama.LlamaPreTrainedModel
    inner = getattr(cls.__dict__.get("from_pretrained"), "__func__", None)
    original = inner.__wrapped__ if getattr(inner, _PATCH_MARK, None) else cls.from_pretrained.__func__

    @functools.wraps(original)
    def from_pretrained(klass, *args, **kwargs):
        kwargs.setdefault("attn_implementation", impl)
        return original(klass, *args, **kwargs)

    setattr(from_pretrained, _PATCH_MARK, impl)
    cls.from_pretrained = classmethod(from_pretrained)


def undo_llama_attn_patch() -> None:
    """Remove the from_pretrained default installed by replace_llama_attn_with_flash_attn."""
    inner = getattr(hf_llama.LlamaPreTrainedModel.__dict__.get("from_pretrained"), "__func__", None)
    if getattr(inner, _PATCH_MARK, None):
        del hf_llama.LlamaPreTrainedModel.from_pretrained


def replace_llama_attn_with_flash_attn(model=None) -> str:
    """Use the fastest attention for Llama models loaded from now on (and `model`, if given).

    Returns the implementation name. Warns when flash-attn is missing and `sdpa` is used.
    """
    impl = best_llama_attn_implementation()
    if impl != FLASH:
        warnings.warn(f"flash-attn (or CUDA) is not available: Llama attention falls back to {impl!r}",
                      RuntimeWarning, stacklevel=2)
    _patch_from_pretrained(impl)
    if model is not None:
        if hasattr(model, "set_attn_implementation"):
            model.set_attn_implementation(impl)
        else:  # older transformers: the config attribute is what the layers read
            model.config._attn_implementation = impl
    return impl
