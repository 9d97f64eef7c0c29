"""Activation recompute policies for the decoder layers of both model families.

    from longalign.ops.recompute import apply_recompute
    apply_recompute(model, "selective")            # or "full", "none", "partial:8", "selective:12"
    apply_recompute(model, "full", compile=True)   # also torch.compile each layer (dynamic shapes)
    apply_recompute(model, "offload")              # selective's tensors kept in (pinned) host memory

Policies (a layer is a transformers `GradientCheckpointingLayer`: LlamaDecoderLayer, GLMBlock):
- `full`: every layer checkpointed (non-reentrant); its whole forward, attention included, is
  re-run in backward. Least memory: one (T, hidden) input per layer.
- `selective`: every layer checkpointed, but the attention core (the varlen kernel, which is ~40%
  of the FLOPs of a 64k pack) is run once: its output and the tensors its backward needs
  (q, k, v, out, lse: ~4 (T, hidden) per layer) are kept, and the recompute reuses the output.
- `none`: nothing checkpointed (~6 GiB per layer of the 1.4B bench model at 64k, bf16).
- `offload`: what `selective` keeps (the layer input and the attention kernel's saved tensors),
  kept in host memory instead (`_LayerOffload`): on CUDA copied into pinned memory on a side
  stream as they are saved (at most OFFLOAD_LAYERS_IN_FLIGHT layers' copies pending, so a slow
  PCIe bounds the forward, not the memory), and in the backward the layer before the one being
  differentiated is prefetched on that stream, so its copy overlaps this layer's recompute and
  backward. On the CPU the same code keeps plain copies. On the GPU: one layer's input and
  attention tensors in use and one prefetched, instead of all layers'.
- `partial:K` (= `full:K`) / `selective:K` / `offload:K`: the first K layers use that policy, the
  others none, so the memory left idle by full checkpointing buys back their recompute.

How `selective` works, independent of the attention backend (flash_attn, torch_varlen, compiled
flex, reference). The model calls its attention core through `saved_attention(fn, q, k, v, ...)`.
Outside a selective region that is just `fn(...)`. Inside, on the layer's first forward, `fn`
runs on detached q, k, v under identity saved-tensor hooks (the innermost hooks win, so the
checkpoint's discarding hooks do not see its saved tensors) and a `_Bridge` autograd node links
q, k, v to the output; its backward differentiates that kept inner graph. When the checkpoint
re-runs the layer in backward, `saved_attention` returns the kept output without calling `fn`.
(torch's selective checkpoint contexts would do the same through a dispatch mode, but dynamo
skips compiled code under a dispatch mode, which makes compiled flex run eagerly: T x T scores.)

Under `offload` the kept inner graph is held by its gradient edges (`torch.autograd.graph.
get_gradient_edge`), not by its output and input tensors, so that nothing on the GPU outlives the
layer's forward: its saved tensors, the checkpoint's saved layer input and the output replayed in
the recompute are all packed by the layer's `_LayerOffload`.

Only packed batches (`cu_seqlens`) call `saved_attention`; padded batches recompute attention.
"""
from __future__ import annotations

import contextvars
import functools
import re
import weakref

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

POLICIES = ("full", "selective", "offload", "none")
CHECKPOINTED = ("full", "selective", "offload")  # the policies that checkpoint a layer
OFFLOAD_LAYERS_IN_FLIGHT = 2  # layers whose device-to-host copies may still be running
_REGION: contextvars.ContextVar = contextvars.ContextVar("longalign_recompute_region", default=None)


def parse_policy(policy: str, num_layers: int) -> list[str]:
    """Policy string -> one of 'full', 'selective', 'offload', 'none' per layer."""
    m = re.fullmatch(r"(full|selective|offload|none|partial)(?::(\d+))?", policy.strip())
    if m is None or (m.group(1) == "partial" and m.group(2) is None) or (m.group(1) == "none" and m.group(2)):
        raise ValueError(f"unknown recompute policy {policy!r}: full, selective, offload, none, partial:K, "
                         "full:K, selective:K or offload:K")
    mode = "full" if m.group(1) == "partial" else m.group(1)
    k = num_layers if m.group(2) is None else int(m.group(2))
    if not 0 <= k <= num_layers:
        raise ValueError(f"policy {policy!r}: K must be in [0, {num_layers}]")
    return [mode] * k + ["none"] * (num_layers - k)


class _Region:
    """One checkpointed call of one layer: the attention outputs of its first forward, in order
    (packed by `offload` when the layer offloads)."""

    def __init__(self, offload: "_LayerOffload | None" = None):
        self.outputs: list[tuple[object, bool]] = []
        self.recomputing = False
        self.index = 0
        self.offload = offload


class _Holder:
    """The kept inner attention graph: its root and inputs (tensors, or gradient edges under
    `offload`), and the output handed to the layer (taken once, by `_Bridge.forward`)."""

    def __init__(self, root, inputs, value):
        self.root, self.inputs, self.value = root, inputs, value

    def take_value(self) -> torch.Tensor:
        value, self.value = self.value, None
        return value.detach()


class _Bridge(torch.autograd.Function):
    """Identity on the kept output in forward; backward differentiates the kept inner graph."""

    @staticmethod
    def forward(ctx, holder, *inputs):
        ctx.holder = holder  # an attribute, not save_for_backward: no checkpoint hook sees it
        return holder.take_value()

    @staticmethod
    def backward(ctx, grad_out):
        holder, ctx.holder = ctx.holder, None
        grads = torch.autograd.grad(holder.root, holder.inputs, grad_out)
        return (None, *grads)


class _EdgeOf(torch.autograd.Function):
    """`x` (no grad) as a tensor with a gradient edge of its own that keeps no tensor: the gradient
    arriving at that edge is what `torch.autograd.grad` returns for it (the anchor is a 0-size leaf)."""

    @staticmethod
    def forward(ctx, anchor, x):
        return x.detach()

    @staticmethod
    def backward(ctx, grad):
        return None, None


class _Packed:
    """One saved tensor in host memory (`host`), its device, and a prefetched device copy."""
    __slots__ = ("host", "device", "group", "fetched", "event", "__weakref__")

    def __init__(self, host, device, group):
        self.host, self.device, self.group, self.fetched, self.event = host, device, group, None, None


_LAST_OFFLOAD: list = [None]  # weak reference to the layer call packed last (the next one's `previous`)


class _LayerOffload:
    """saved-tensor hooks of one `offload` layer call (module docstring): `pack` copies a tensor to
    host memory (CUDA: pinned, on the side stream), `unpack` brings it back, first prefetching the
    layer call packed before this one, which the backward differentiates next."""

    def __init__(self):
        previous = _LAST_OFFLOAD[0]() if _LAST_OFFLOAD[0] is not None else None
        self.previous = weakref.ref(previous) if previous is not None else None
        self.items: list[weakref.ref] = []
        self.same: dict[tuple, tuple[weakref.ref, int, _Packed]] = {}  # a tensor saved twice is packed once
        self.done = None  # CUDA event after this call's last device-to-host copy
        self.prefetched = False
        _LAST_OFFLOAD[0] = weakref.ref(self)
        self._bound_copies_in_flight(previous)

    @staticmethod
    def _bound_copies_in_flight(previous) -> None:
        for _ in range(OFFLOAD_LAYERS_IN_FLIGHT - 1):
            previous = previous.previous() if previous is not None and previous.previous is not None else None
        if previous is not None and previous.done is not None:
            previous.done.synchronize()  # the host waits: pending copies hold their device memory

    def pack(self, t: torch.Tensor) -> _Packed:
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype, t.device)
        hit = self.same.get(key)
        if hit is not None and hit[0]() is not None and hit[1] == t._version:
            return hit[2]  # the same storage, alive since (so not reused) and unmodified
        if t.device.type == "cuda":
            stream = _side_stream(t.device)
            stream.wait_stream(torch.cuda.current_stream(t.device))
            host = torch.empty_like(t, device="cpu", pin_memory=True)
            with torch.cuda.stream(stream):
                host.copy_(t, non_blocking=True)
            t.record_stream(stream)  # the allocator may not reuse t's memory before the copy ran
            self.done = self.done or torch.cuda.Event()
            self.done.record(stream)
        else:
            host = t.detach().clone()  # CPU: a plain copy
        packed = _Packed(host, t.device, self)
        self.items.append(weakref.ref(packed))
        self.same[key] = (weakref.ref(t), t._version, packed)
        return packed

    def unpack(self, packed: _Packed) -> torch.Tensor:
        previous = self.previous() if self.previous is not None else None
        if previous is not None and not previous.prefetched:
            previous.prefetch()
        fetched, packed.fetched = packed.fetched, None
        if fetched is None:
            return _to_device(packed.host, packed.device)
        if fetched.device.type == "cuda":
            stream = torch.cuda.current_stream(fetched.device)
            stream.wait_event(packed.event)
            fetched.record_stream(stream)
        return fetched

    def prefetch(self) -> None:
        """Copy this call's saved tensors back to their devices ahead of use (CUDA: side stream)."""
        self.prefetched = True
        for ref in self.items:
            packed = ref()
            if packed is None or packed.fetched is not None:
                continue
            if packed.device.type == "cuda":
                stream = _side_stream(packed.device)
                with torch.cuda.stream(stream):
                    packed.fetched = packed.host.to(packed.device, non_blocking=True)
                    packed.event = torch.cuda.Event()
                    packed.event.record(stream)
            else:
                packed.fetched = _to_device(packed.host, packed.device)


def _to_device(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    return host.to(device, non_blocking=True) if device.type == "cuda" else host.clone()


_SIDE_STREAMS: dict = {}


def _side_stream(device: torch.device):
    if device not in _SIDE_STREAMS:
        _SIDE_STREAMS[device] = torch.cuda.Stream(device)
    return _SIDE_STREAMS[device]


def _identity(x):
    return x


@torch.compiler.disable  # a graph break under --compile: the kernel runs (or is skipped) eagerly
def saved_attention(fn, *args, **kwargs):
    """`fn(*args, **kwargs)`, computed once per selective-checkpoint region (module docstring)."""
    region = _REGION.get()
    if region is None:
        return fn(*args, **kwargs)
    offload = region.offload
    if region.recomputing:  # a leaf like the first pass's output, so later ops save the same tensors
        out, requires_grad = region.outputs[region.index]
        region.index += 1
        out = offload.unpack(out) if offload is not None else out
        return out.detach().requires_grad_(requires_grad)
    grad_idx = [i for i, a in enumerate(args) if isinstance(a, torch.Tensor) and a.requires_grad]
    if not grad_idx or not torch.is_grad_enabled():
        out = fn(*args, **kwargs)
        region.outputs.append((offload.pack(out.detach()) if offload is not None else out.detach(),
                               out.requires_grad))
        return out
    return (_offloaded_graph if offload is not None else _kept_graph)(region, fn, args, kwargs, grad_idx)


def _kept_graph(region, fn, args, kwargs, grad_idx):
    """selective: the inner graph on detached leaves, its saved tensors kept where they are."""
    inner = list(args)
    for i in grad_idx:
        inner[i] = args[i].detach().requires_grad_(True)
    with torch.autograd.graph.saved_tensors_hooks(_identity, _identity), torch.enable_grad():
        out = fn(*inner, **kwargs)
    region.outputs.append((out.detach(), True))
    holder = _Holder(out, [inner[i] for i in grad_idx], out)
    return _Bridge.apply(holder, *(args[i] for i in grad_idx))


def _offloaded_graph(region, fn, args, kwargs, grad_idx):
    """offload: the inner graph's saved tensors packed by the layer's offload, held by edges."""
    get_edge = torch.autograd.graph.get_gradient_edge
    anchor = torch.empty(0, requires_grad=True)
    inner = list(args)
    with torch.enable_grad():
        for i in grad_idx:
            inner[i] = _EdgeOf.apply(anchor, args[i].detach())
        with torch.autograd.graph.saved_tensors_hooks(region.offload.pack, region.offload.unpack):
            out = fn(*inner, **kwargs)
    region.outputs.append((region.offload.pack(out.detach()), True))
    holder = _Holder(get_edge(out), [get_edge(inner[i]) for i in grad_idx], out)
    return _Bridge.apply(holder, *(args[i] for i in grad_idx))


def _selective_fn(inner_forward, kwargs, offload=None):
    """The function handed to checkpoint: first call records attention, later calls replay it."""
    region = _Region(offload)

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
        if mode == "offload":  # the checkpoint's saved inputs go through the outer hooks: packed too
            offload = _LayerOffload()
            with torch.autograd.graph.saved_tensors_hooks(offload.pack, offload.unpack):
                return checkpoint(_selective_fn(inner_forward, kwargs, offload), *args, use_reentrant=False)
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
