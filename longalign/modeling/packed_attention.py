"""LongAlign's packed attention as a transformers attention implementation.

    from longalign.modeling.packed_attention import ATTN_IMPLEMENTATION, register_packed_attention
    register_packed_attention()
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation=ATTN_IMPLEMENTATION)

`register_packed_attention()` adds one name to transformers' public registries:
- `AttentionInterface`: `packed_attention_forward`, which runs `longalign.ops.varlen_attention.varlen_attention`
  (block-diagonal causal over a flat (1, T) pack; FlashAttention-4, FA2, torch varlen, flex,
  cuDNN or the per-sequence reference, as chosen there) whenever the call carries the pack
  geometry. It reads the keyword arguments that transformers documents for packed batches
  (`FlashAttentionKwargs`, as `DataCollatorWithFlattening(return_flash_attn_kwargs=True)` emits
  them): `cu_seq_lens_q` / `cu_seq_lens_k` = [0, e_1, ..., T] and `max_length_q` / `max_length_k`;
  with only `position_ids` restarting at 0 per sequence, the boundaries are derived from them.
  Any other call (padded batches, generation) goes to transformers' own SDPA attention.
- `AttentionMaskInterface`: `packed_attention_mask`, which builds no mask for a call without a
  padding mask and without cached keys (a pack would otherwise get a (T, T) block mask that the
  varlen kernel never reads), and transformers' SDPA mask otherwise.

Models of both families call it through transformers' registry (`ALL_ATTENTION_FUNCTIONS`), so
Llama is stock transformers and ChatGLM's remote code never imports this package. The kernel is
called through `longalign.ops.recompute.saved_attention`, so the `selective` recompute policy can keep
its output instead of re-running it in backward.
"""
from __future__ import annotations

import torch
from transformers import AttentionInterface, AttentionMaskInterface
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from longalign.ops.varlen_attention import padded_sdpa_context, varlen_attention
from longalign.ops.recompute import saved_attention

ATTN_IMPLEMENTATION = "longalign_varlen"
FALLBACK_IMPLEMENTATION = "sdpa"  # transformers' own, for padded batches and generation


def register_packed_attention() -> str:
    """Register the attention function and its mask function under ATTN_IMPLEMENTATION (idempotent)."""
    AttentionInterface.register(ATTN_IMPLEMENTATION, packed_attention_forward)
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, packed_attention_mask)
    return ATTN_IMPLEMENTATION


def packed_attention_mask(*args, attention_mask=None, **kwargs):
    """None for an unpadded call without cached keys (plain causal or a pack), else SDPA's mask."""
    fresh = kwargs.get("kv_offset", 0) == 0 and kwargs.get("q_length") == kwargs.get("kv_length")
    if attention_mask is None and fresh:
        return None
    return ALL_MASK_ATTENTION_FUNCTIONS[FALLBACK_IMPLEMENTATION](*args, attention_mask=attention_mask, **kwargs)


def cu_seqlens_from_positions(position_ids: torch.Tensor | None, query: torch.Tensor, attention_mask):
    """[0, s_2, ..., T] (int32) for a (1, T) call whose position_ids restart at 0, else None.

    position_ids [[0 1 2 0 1 0 1 2 3]] -> [0 3 5 9]. Only prefill / training calls (T > 1) without
    a padding mask are looked at; one device sync.
    """
    if position_ids is None or attention_mask is not None or query.shape[0] != 1 or query.shape[2] < 2:
        return None
    starts = torch.nonzero(position_ids.reshape(-1) == 0).flatten()
    if starts.numel() < 2 or int(starts[0]) != 0:
        return None
    total = torch.tensor([query.shape[2]], device=starts.device)
    return torch.cat([starts, total]).to(torch.int32)


def packed_attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers attention function: (B, H, L, D) q/k/v in, ((B, L, H, D) output, None) out."""
    cu_seqlens = kwargs.get("cu_seq_lens_q")
    if cu_seqlens is None:
        cu_seqlens = cu_seqlens_from_positions(kwargs.get("position_ids"), query, attention_mask)
    if cu_seqlens is None:
        with padded_sdpa_context():
            return ALL_ATTENTION_FUNCTIONS[FALLBACK_IMPLEMENTATION](
                module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
    _check_packed_call(module, query, key, kwargs, dropout)
    q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))  # (T, heads, D)
    out = saved_attention(varlen_attention, q, k, v, cu_seqlens, max_seqlen=kwargs.get("max_length_q"),
                          softmax_scale=scaling)
    return out[None], None


def _check_packed_call(module, query, key, kwargs, dropout) -> None:
    """Shape checks only (no device sync per layer); cu_seq_lens_k is taken to equal cu_seq_lens_q,
    which the training models check once per forward (`longalign.modeling.weighted_lm`)."""
    if query.shape[0] != 1:
        raise ValueError(f"a packed batch is flat, shape (1, T); got batch size {query.shape[0]}")
    if query.shape[2] != key.shape[2]:
        raise ValueError("packed attention is self-attention over one pack: no cached keys (use_cache=False)")
    if not getattr(module, "is_causal", True):
        raise ValueError(f"{type(module).__name__} is not causal; the packed kernel is block-diagonal causal")
    if dropout and module.training:
        raise NotImplementedError("attention dropout is not supported by the packed varlen kernels")
