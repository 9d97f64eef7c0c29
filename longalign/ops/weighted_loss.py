"""Weighted, chunked causal-LM cross-entropy (DESIGN.md §4; paper Eq. 2).

For hidden states h_i, the LM head W (V, H) and labels y (HF convention, aligned with the input):

    target  t_i = y_{i+1}   if token i+1 belongs to the same sequence as token i, else ignored
    loss    l_i = logsumexp_v(z_i) - z_{i, t_i},      z_i = W h_i   (in fp32)
    weight  w_i = loss_weights_{i+1} (1 when loss_weights is None), 0 where t_i is ignored
    mean    L = sum_i w_i l_i / sum_i w_i             sum   L = sum_i w_i l_i

"Same sequence" means: inside one row of a padded (B, L) batch, or, for a flat pack (1, T) with
`cu_seqlens`, inside one [e_{k-1}, e_k) segment, so the last token of every sequence has no
target and a pack gives exactly the per-token losses of its sequences run alone. With the pack's
weights 1/N_k on sequence k's N_k targets, `mean` is the average over sequences of each
sequence's mean token loss. A batch without any target gives L = 0 (and zero gradients).

The logits never exist for all tokens at once: `_ChunkedLinearCE` computes z for `chunk_size`
tokens at a time in the forward (keeping only the scalar), and recomputes them chunk by chunk in
the backward, where

    dL/dz_i = g * w_i * (softmax(z_i) - onehot(t_i)),   dL/dh_i = W^T dL/dz_i,   dL/dW = sum_i dL/dz_i h_i^T

(g the incoming gradient), accumulated in fp32 for dL/dW. Peak extra memory is about
2 * chunk_size * V * 4 bytes (fp32 logits and their gradient) plus an fp32 copy of dL/dW.

Pre-shifted targets (sequence parallelism). A shard of a pack cannot shift its own labels: the
target of its last token is the next shard's first label. The targets t and weights w of the
WHOLE pack are then computed once by `shift_targets` before sharding, and the loss takes them
as `shift_labels` / `shift_weights` (aligned with the hidden states: t_i is the target of
position i), shard by shard. `labels_for_targets(t)` gives the labels whose plain one-token
shift is t (DeepSpeed's Ulysses data loader shifts `labels` itself, without sequence boundaries):

    t = [5 6 X | 7 X]  ->  labels = [X 5 6 | X 7],  and  labels[1:] + [X] == t  (t ends with X)
"""
from __future__ import annotations

import torch
from torch import nn

from longalign.constants import IGNORE_INDEX
from longalign.pack_geometry import sequence_starts, target_mask

DEFAULT_CHUNK_TOKENS = 4096  # 4096 tokens x 65024 vocab x 4 B = 1 GiB of fp32 logits per chunk
REDUCTIONS = ("mean", "sum")


def shift_targets(labels, loss_weights=None, cu_seqlens=None):
    """Flat (N,) targets t and weights w (float32) as defined in the module docstring."""
    if labels.dim() == 1:
        labels = labels.unsqueeze(0)
    if cu_seqlens is not None:
        if labels.shape[0] != 1:
            raise ValueError("cu_seqlens requires a flat pack of shape (1, T)")
        starts = sequence_starts(cu_seqlens).to(device=labels.device, dtype=torch.long)
        labels = labels.masked_fill(~target_mask(labels[0], starts)[None], IGNORE_INDEX)  # no target crosses a boundary
    ignore = torch.full_like(labels[:, :1], IGNORE_INDEX)
    targets = torch.cat([labels[:, 1:], ignore], dim=1).reshape(-1).long()
    valid = targets != IGNORE_INDEX
    if loss_weights is None:
        weights = valid.float()
    else:
        lw = loss_weights.reshape(labels.shape).float()
        shifted = torch.cat([lw[:, 1:], torch.zeros_like(lw[:, :1])], dim=1).reshape(-1)
        weights = torch.where(valid, shifted, torch.zeros_like(shifted))
    return targets, weights


def labels_for_targets(targets: torch.Tensor) -> torch.Tensor:
    """Labels (1, T) whose plain shift (labels[1:] + [IGNORE]) is `targets` (T,) (module docstring).

    The last token of a pack ends a sequence, so its target is always IGNORE_INDEX; anything else
    would be lost by the shift, hence an error.
    """
    targets = targets.reshape(-1)
    if targets.numel() == 0 or int(targets[-1]) != IGNORE_INDEX:
        raise ValueError("the last position of a pack ends a sequence: its target must be IGNORE_INDEX")
    return torch.cat([targets.new_full((1,), IGNORE_INDEX), targets[:-1]])[None]


def pre_shifted_targets(shift_labels, shift_weights=None):
    """Flat (N,) targets and float32 weights from already shifted ones; 0 weight where ignored."""
    targets = shift_labels.reshape(-1).long()
    valid = targets != IGNORE_INDEX
    if shift_weights is None:
        return targets, valid.float()
    weights = shift_weights.reshape(-1).float()
    if weights.shape != targets.shape:
        raise ValueError(f"shift_weights has {weights.numel()} values, shift_labels {targets.numel()}")
    return targets, torch.where(valid, weights, torch.zeros_like(weights))


def mask_padding_labels(labels: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """IGNORE_INDEX on padding (attention_mask 0) and on a token right after padding: with left
    padding the first real token would otherwise be the target of the padding position before it.

    mask [0 0 1 1], labels [a b c d] -> [-100 -100 -100 d]
    """
    real = attention_mask != 0
    prev_real = torch.cat([torch.ones_like(real[:, :1]), real[:, :-1]], dim=1)
    return labels.masked_fill(~(real & prev_real), IGNORE_INDEX)


def _chunk_losses(h, weight, t):
    """(fp32 logits, per-token loss l with 0 on ignored targets) for one chunk."""
    logits = (h @ weight.t()).to(torch.promote_types(h.dtype, torch.float32))
    valid = t != IGNORE_INDEX
    safe_t = torch.where(valid, t, torch.zeros_like(t))
    picked = logits.gather(1, safe_t[:, None]).squeeze(1)
    losses = torch.logsumexp(logits, dim=-1) - picked
    return logits, torch.where(valid, losses, torch.zeros_like(losses)), safe_t


class _ChunkedLinearCE(torch.autograd.Function):
    """sum_i w_i l_i with logits recomputed per chunk in the backward (see module docstring)."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, weights, chunk_size):
        acc_dtype = torch.promote_types(hidden.dtype, torch.float32)  # fp32, or fp64 in gradcheck
        total = torch.zeros((), dtype=acc_dtype, device=hidden.device)
        with torch.no_grad():
            for s in range(0, hidden.shape[0], chunk_size):
                e = s + chunk_size
                _, losses, _ = _chunk_losses(hidden[s:e], weight, targets[s:e])
                total += (weights[s:e] * losses).sum()
        ctx.save_for_backward(hidden, weight, targets, weights)
        ctx.chunk_size = chunk_size
        return total

    @staticmethod
    def backward(ctx, grad_out):
        hidden, weight, targets, weights = ctx.saved_tensors
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_h = torch.empty_like(hidden) if need_h else None
        acc_dtype = torch.promote_types(weight.dtype, torch.float32)
        grad_w = torch.zeros(weight.shape, dtype=acc_dtype, device=weight.device) if need_w else None
        for s in range(0, hidden.shape[0], ctx.chunk_size):
            e = s + ctx.chunk_size
            h = hidden[s:e]
            logits, _, safe_t = _chunk_losses(h, weight, targets[s:e])
            dz = torch.softmax(logits, dim=-1)
            del logits
            dz.scatter_add_(1, safe_t[:, None], torch.full_like(dz[:, :1], -1.0))
            dz.mul_((grad_out * weights[s:e])[:, None])  # rows of ignored targets have w = 0
            dz = dz.to(weight.dtype)
            if need_h:
                grad_h[s:e] = dz @ weight
            if need_w:
                grad_w.add_(dz.t() @ h)
        if need_w:
            grad_w = grad_w.to(weight.dtype)
        return grad_h, grad_w, None, None, None


def causal_lm_loss(hidden, lm_head_weight, labels=None, loss_weights=None, cu_seqlens=None,
                   reduction="mean", chunk_size=DEFAULT_CHUNK_TOKENS, shift_labels=None, shift_weights=None):
    """Weighted causal-LM loss of `hidden` (B, L, H) under the head `lm_head_weight` (V, H).

    labels (B, L) (IGNORE_INDEX on non-targets); loss_weights (B, L) aligned with labels or None;
    cu_seqlens (n+1,) for a flat pack (B = 1). Or, instead of labels / loss_weights / cu_seqlens,
    already shifted `shift_labels` and `shift_weights` (B, L) (module docstring). reduction
    "mean" = sum w l / sum w (0 when sum w = 0), "sum" = sum w l. Returns an fp32 scalar (fp64
    for fp64 inputs). See the module docstring for formulas.
    """
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if chunk_size is None or chunk_size <= 0:
        raise ValueError(f"chunk_size must be a positive number of tokens, got {chunk_size}")
    if (labels is None) == (shift_labels is None):
        raise ValueError("give either labels (shifted here) or shift_labels (already shifted)")
    if shift_labels is not None:
        if loss_weights is not None or cu_seqlens is not None:
            raise ValueError("shift_labels are already shifted: pass shift_weights, not loss_weights / cu_seqlens")
        targets, weights = pre_shifted_targets(shift_labels, shift_weights)
    else:
        if shift_weights is not None:
            raise ValueError("shift_weights belong to shift_labels; with labels pass loss_weights")
        targets, weights = shift_targets(labels, loss_weights, cu_seqlens)
    flat = hidden.reshape(-1, hidden.shape[-1])
    if flat.shape[0] != targets.shape[0]:
        raise ValueError(f"hidden has {flat.shape[0]} tokens, labels {targets.shape[0]}")
    total = _ChunkedLinearCE.apply(flat, lm_head_weight, targets, weights, int(chunk_size))
    if reduction == "sum":
        return total
    denom = weights.sum()
    return total / torch.where(denom > 0, denom, torch.ones_like(denom))


class LMHeadWithLoss(nn.Linear):
    """nn.Linear (same `weight`) whose forward returns the chunked loss when given labels.

    The LM head of both families (Llama `lm_head`, ChatGLM `transformer.output_layer`).

    The loss is computed inside this module's forward so that frameworks that gather a
    parameter around its module's forward/backward (DeepSpeed ZeRO-3) see the head in use.
    """

    def forward(self, hidden, labels=None, loss_weights=None, cu_seqlens=None,
                reduction="mean", chunk_size=DEFAULT_CHUNK_TOKENS, shift_labels=None, shift_weights=None):
        if labels is None and shift_labels is None:
            return super().forward(hidden)
        return causal_lm_loss(hidden, self.weight, labels, loss_weights, cu_seqlens, reduction=reduction,
                              chunk_size=chunk_size, shift_labels=shift_labels, shift_weights=shift_weights)
