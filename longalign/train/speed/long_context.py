"""ALST's single-GPU memory pieces from DeepSpeed, on both model families (bench_long_context.py).

    from longalign.train.speed.long_context import tile_mlps, offload_checkpoints_to_cpu
    tile_mlps(model)                   # each decoder layer's MLP in tiles of ~hidden tokens
    offload_checkpoints_to_cpu(model)  # full recompute, each layer's input kept on the CPU

Arctic Long Sequence Training (Bekman et al. 2025, arXiv 2506.13996) reaches 500k tokens on one
H100 with Ulysses plus "a bag of tricks"; the ones DeepSpeed ships and that fit these models
without changing any module's signature:
- Tiled MLP: `deepspeed.runtime.sequence_parallel.ulysses_sp.TiledMLP` runs the MLP over
  ceil(T / hidden) tiles of the sequence in forward and recomputes it tile by tile in backward, so
  the (T, intermediate) activations (gate, up, their product: ~4 x T x I x 2 bytes in bf16, 22 GiB
  at 512k for the 1.4B bench model) exist for one tile at a time. Each layer's `mlp` gets an
  instance `forward(x)` (same signature) that calls the module's own class forward per tile.
- Activation-checkpoint offload: `deepspeed.checkpointing.checkpoint` with `cpu_checkpointing`
  (`checkpoint_in_cpu=True`, no partitioning) moves each checkpointed layer input (T x hidden,
  2 GiB per layer at 512k) to the CPU after the layer's forward, asynchronously on a side stream
  on CUDA, and back for its recompute. The layers then run DeepSpeed's (reentrant) full recompute
  instead of longalign.ops.recompute's policies.
- Tiled loss (`TiledFusedLogitsLoss`): not needed, the loss is already computed in chunks of
  tokens without the (T, V) logits (longalign/ops/weighted_loss.py).
The math is unchanged (tested on the CPU, both families: same loss and gradients; the offload
through DeepSpeed's GPU code path, its asynchronous offload engine, which its CPU accelerator
does not take by itself: see `offload_checkpoints_to_cpu`). bench_long_context.py also checks
each configuration's step against plain full recompute on the GPU before timing it.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from longalign.ops.recompute import apply_recompute, decoder_layers


def mlp_tiles(tokens: int, hidden_size: int) -> int:
    """DeepSpeed's choice: tiles of about `hidden_size` tokens (agreed by all ranks, if distributed)."""
    tiles = max(1, math.ceil(tokens / hidden_size))
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        count = torch.tensor(tiles, device="cuda" if torch.cuda.is_available() else "cpu")
        torch.distributed.all_reduce(count, op=torch.distributed.ReduceOp.MAX)
        tiles = int(count)
    return tiles


def _tiled_forward(mlp: nn.Module, hidden_size: int):
    from deepspeed.runtime.sequence_parallel.ulysses_sp import TiledMLP

    class_forward = type(mlp).forward
    params = [p for p in mlp.parameters()]

    def forward(x):
        if not torch.is_grad_enabled():
            return class_forward(mlp, x)
        return TiledMLP.apply(class_forward, mlp, x, mlp_tiles(x.shape[-2], hidden_size), params)

    return forward


def tile_mlps(model: nn.Module) -> int:
    """Give every decoder layer's `mlp` DeepSpeed's tiled forward; returns how many (idempotent)."""
    layers = decoder_layers(model)
    for layer in layers:
        mlp = getattr(layer, "mlp", None)
        if mlp is None:
            raise ValueError(f"{type(layer).__name__} has no `mlp` to tile")
        mlp.__dict__.pop("forward", None)
        mlp.forward = _tiled_forward(mlp, model.config.hidden_size)
    return len(layers)


def _offloaded_forward(layer: nn.Module, inner_forward):
    import deepspeed

    def forward(*args, **kwargs):
        if not (layer.training and torch.is_grad_enabled()):
            return inner_forward(*args, **kwargs)
        return deepspeed.checkpointing.checkpoint(inner_forward, *args, **kwargs)

    return forward


def offload_checkpoints_to_cpu(model: nn.Module) -> int:
    """Full recompute through DeepSpeed's checkpointing with the checkpoints on the CPU.

    DeepSpeed's checkpointing needs deepspeed.comm started (train.py under DeepSpeed: done; one
    process: `deepspeed.init_distributed` on a one-rank group, as bench_long_context.py does).
    """
    import deepspeed

    from deepspeed.accelerator import get_accelerator

    if get_accelerator().is_synchronized_device():
        raise NotImplementedError(
            "offload_checkpoints_to_cpu needs a GPU: on DeepSpeed's CPU accelerator its cpu_checkpointing copies "
            "each layer input with .to('cpu') (the same tensor there) and then empties it, so the recompute "
            "reads an empty tensor")
    if not deepspeed.comm.is_initialized():
        raise RuntimeError("offload_checkpoints_to_cpu: deepspeed.comm is not started; launch under "
                           "deepspeed/torchrun or call deepspeed.init_distributed() first")
    deepspeed.checkpointing.configure(None, partition_activations=False, checkpoint_in_cpu=True)
    apply_recompute(model, "none")  # plain layer forwards (and transformers' checkpointing off)
    layers = decoder_layers(model)
    for layer in layers:
        layer.forward = _offloaded_forward(layer, layer.forward)
    return len(layers)
