"""Activation recompute policies for the decoder layers of both model families.

    from longalign.ops.recompute import apply_recompute
    apply_recompute(model, "selective")            # or "full", "none", "partial:8", "selective:12"
    apply_recompute(model, "full", compile=True)   # also torch.compile each layer (dynamic shapes)

Policies (a layer is a transformers `GradientCheckpointingLayer`: LlamaDecoderLayer, GLMBlock):
- `full`: every layer checkpointed (non-reentrant); its whole forward, attention included, is
  re-run in backward. Least memory: one (T, hidden) input per layer.
- `selective`: every layer checkpointed, but the attention core (the varlen kernel, which is ~40%
  of the FLOPs of a 64k pack) is run once: its output and the tensors its backward needs
  (q, k, v, out, lse: ~4 (T, hidden) per layer) are kept, and the recompute reuses the output.
- `none`: nothing checkpointed (~6 GiB per layer of the 1.4B bench model at 64k, bf16).
- `partial:K` (= `full:K`) / `selective:K`: the first K layers use that policy, the others none,
  so the memory left idle by full checkpointing buys back their recompute.

How `selective` works, independent of the attention backend (flash_attn, torch_varlen, compiled
flex, reference). The model calls its attention core through `saved_attention(fn, q, k, v, ...)`.
Outside a selective region that is just `fn(...)`. Inside, on the layer's first forward, `fn`
runs on detached q, k, v under identity saved-tensor hooks (the innermost hooks win, so the
checkpoint's discarding hooks do not see its saved tensors) and a `_Bridge` autograd node links
q, k, v to the output; its backward differentiates that kept inner graph. When the checkpoint
re-runs the layer in backward, `saved_attention` returns the kept output without calling `fn`.
(torch's selective checkpoint contexts would do the same through a dispatch mode, but dynamo
skips compiled code under a dispatch mode, which makes compiled flex run eagerly: T x T scores.)

Only packed batches (`cu_seqlens`) call `saved_attention`; padded batches recompute attention.
"""
from __future__ import annotations

import contextvars
import functools
import re

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

POLICIES = ("full", "selective", "none")
_REGION: contextvars.ContextVar = contextvars.ContextVar("longalign_recompute_region", default=None)


def parse_policy(policy: str, num_layers: int) -> list[str]:
    """Policy string -> one of 'full', 'selective', 'none' per layer."""
    m = re.fullmatch(r"(full|selective|none|partial)(?::(\d+))?", policy.strip())
    if m is None or (m.group(1) == "partial" and m.group(2) is None) or (m.group(1) == "none" and m.group(2)):
        raise ValueError(f"unknown recompute policy {policy!r}: full, selective, none, partial:K, "
                         "full:K or selective:K")
    mode = "full" if m.group(1) == "partial" else m.group(1)
    k = num_layers if m.group(2) is None else int(m.group(2))
    if not 0 <= k <= num_layers:
        raise ValueError(f"policy {policy!r}: K must be in [0, {num_layers}]")
    return [mode] * k + ["none"] * (num_layers - k)


class _Region:
    """One checkpointed call of one layer: the attention outputs of its first forward, in order."""

    def __init__(self):
        self.outputs: list[tuple[torch.Tensor, bool]] = []
        self.recomputing = False
        self.index = 0


class _Holder:
    """The kept inner attention graph: output and the detached inputs it was computed from."""

    def __init__(self, out, inputs):
        self.out, self.inputs = out, inputs


class _Bridge(torch.autograd.Function):
    """Identity on the kept output in forward; backward differentiates the kept inner graph."""

    @staticmethod
    def forward(ctx, holder, *inputs):
        ctx.holder = holder  # an attribute, not save_for_backward: no checkpoint hook sees it
        return holder.out.detach()

    @staticmethod
    def backward(ctx, grad_out):
        holder, ctx.holder = ctx.holder, None
        grads = torch.autograd.grad(holder.out, holder.inputs, grad_out)
        return (None, *grads)


def _identity(x):
    return x


@torch.compiler.disable  # a graph break under --compile: the kernel runs (or is skipped) eagerly
def saved_attention(fn, *args, **kwargs):
    """`fn(*args, **kwargs)`, computed once per selective-checkpoint region (module docstring)."""
    region = _REGION.get()
    if region is None:
        return fn(*args, **kwargs)
    if region.recomputing:  # a leaf like the first pass's output, so later ops save the same tensors
        out, requires_grad = region.outputs[region.index]
        region.index += 1
        return out.detach().requires_grad_(requires_grad)
    grad_idx = [i for i, a in enumerate(args) if isinstance(a, torch.Tensor) and a.requires_grad]
    if not grad_idx or not torch.is_grad_enabled():
        out = fn(*args, **kwargs)
        region.outputs.append((out.detach(), out.requires_grad))
        return out
    inner = list(args)
    for i in grad_idx:
        inner[i] = args[i].detach().requires_grad_(True)
    with torch.autograd.graph.saved_tensors_hooks(_identity, _identity), torch.enable_grad():
        out = fn(*inner, **kwargs)
    region.outputs.append((out.detach(), True))
    holder = _Holder(out, [inner[i] for i in grad_idx])
    return _Bridge.apply(holder, *(args[i] for i in grad_idx))


def _selective_fn(inner_forward, kwargs):
    """The function handed to checkpoint: first call records attention, later calls replay it."""
    region = _Region()

    def run(*args):
        region.index = 0
        token = _REGION.set(region)
        try:
            return inner_forward(*args, **kwargs)
        finally:
            _REGION.reset(token)
            region.recomputing = True

    return run


def _wrapped_forward(layer: nn.Module, mode: str, inner_forward):
    """Instance `forward` of a layer: checkpoint (non-reentrant) the inner forward per `mode`."""

    def forward(*args, **kwargs):
        if mode == "none" or not (layer.training and torch.is_grad_enabled()):
            return inner_forward(*args, **kwargs)
        if mode == "selective":
            return checkpoint(_selective_fn(inner_forward, kwargs), *args, use_reentrant=False)
        return checkpoint(functools.partial(inner_forward, **kwargs), *args, use_reentrant=False)

    return forward


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The transformer layers of either family, in order (transformers' checkpointable layers)."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    if not layers:
        raise ValueError(f"{type(model).__name__} has no GradientCheckpointingLayer to checkpoint")
    return layers


def apply_recompute(model: nn.Module, policy: str = "full", compile: bool = False,
                    compile_backend: str = "inductor") -> list[str]:
    """Set the recompute policy of every decoder layer (and optionally compile it); idempotent.

    Replaces transformers' own gradient checkpointing of these layers (its flags are turned off).
    With `compile`, each layer's inner forward is `torch.compile(dynamic=True)`d, outside the
    checkpoint: pack lengths vary, and the attention call is a graph break under `selective`.
    Returns the per-layer modes.
    """
    layers = decoder_layers(model)
    modes = parse_policy(policy, len(layers))
    for layer, mode in zip(layers, modes):
        layer.__dict__.pop("forward", None)  # undo an earlier apply_recompute
        layer.gradient_checkpointing = False
        inner = layer.forward  # transformers' wrapper, a plain call with its flag off
        if compile:
            inner = torch.compile(inner, dynamic=True, backend=compile_backend)
        layer.forward = _wrapped_forward(layer, mode, inner)
    if hasattr(model, "gradient_checkpointing"):
        model.gradient_checkpointing = False
    return modes
