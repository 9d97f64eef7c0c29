"""Optional liger-kernel fused kernels (RMSNorm, SwiGLU, RoPE) for the Llama training model.

    from longalign.train.speed.liger import apply_liger_kernels
    apply_liger_kernels(model)          # train.py --liger; needs `pip install liger-kernel` and CUDA

Through liger-kernel's documented entry point `apply_liger_kernel_to_llama(model=...)`, with its
loss replacements off (`cross_entropy=False, fused_linear_cross_entropy=False`): the model keeps
LongAlign's per-token weighted chunked loss (longalign.ops.weighted_loss), which Liger's fused linear
cross-entropy cannot compute (it has no per-token weights). What liger does inside that call,
and why it is opt-in: it *reassigns attributes of transformers' modeling_llama module*
(`apply_rotary_pos_emb`, `LlamaRMSNorm`, `LlamaMLP`) for the whole process, and binds its own
`forward` onto the model's existing norm and MLP instances. This package itself overrides no
module signature and swaps no class.

`liger_weighted_loss` is the other way round: Liger's fused linear cross-entropy with
`reduction="none"` (per-token losses l_i, logits never stored), weighted as causal_lm_loss does
(same targets t_i and weights w_i, `longalign.ops.weighted_loss.shift_targets`):

    mean  L = sum_i w_i l_i / sum_i w_i        sum  L = sum_i w_i l_i

bench/bench_peers.py measures it against causal_lm_loss (time, memory, agreement); the
training model does not use it.
"""
from __future__ import annotations

import importlib.util

import torch
from transformers import LlamaForCausalLM

from longalign.constants import IGNORE_INDEX
from longalign.ops.weighted_loss import REDUCTIONS, shift_targets

LIGER_PACKAGE = "liger_kernel"
KERNELS = {"rope": True, "rms_norm": True, "swiglu": True, "cross_entropy": False,
           "fused_linear_cross_entropy": False}


def liger_available() -> bool:
    try:
        return importlib.util.find_spec(LIGER_PACKAGE) is not None
    except ImportError:
        return False


def _require_liger():
    if not liger_available():
        raise ImportError("--liger needs liger-kernel (`pip install liger-kernel`; Triton, CUDA GPUs)")


def apply_liger_kernels(model: torch.nn.Module) -> str:
    """Liger's RMSNorm, SwiGLU and RoPE on a Llama model, its losses off; a one-line description."""
    if not isinstance(model, LlamaForCausalLM):
        raise ValueError(f"--liger: Llama models only (liger-kernel has no entry point for {type(model).__name__})")
    _require_liger()
    from liger_kernel.transformers import apply_liger_kernel_to_llama

    apply_liger_kernel_to_llama(model=model, **KERNELS)
    on = ", ".join(k for k, v in KERNELS.items() if v)
    return f"liger-kernel {on} (the weighted chunked loss stays LongAlign's)"


def liger_weighted_loss(hidden, lm_head_weight, labels, loss_weights=None, cu_seqlens=None, reduction="mean"):
    """The module docstring's weighted loss through Liger's fused linear cross-entropy."""
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    _require_liger()
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

    targets, weights = shift_targets(labels, loss_weights, cu_seqlens)
    flat = hidden.reshape(-1, hidden.shape[-1])
    per_token = LigerFusedLinearCrossEntropyLoss(ignore_index=IGNORE_INDEX, reduction="none")(
        lm_head_weight, flat, targets)
    total = (weights.to(per_token.dtype) * per_token).sum()
    if reduction == "sum":
        return total
    denom = weights.sum()
    return total / torch.where(denom > 0, denom, torch.ones_like(denom))
