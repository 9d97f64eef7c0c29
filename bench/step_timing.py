"""How a training step is timed and reported: shared by bench_train_step.py and bench_peers.py.

    timing = time_steps(train_step, batches, device, warmup=2, steps=3)
    row = measurement(model, layers, width, pack_counts(rows)[2:5], timing, measured_peak_flops(...), device)

Step seconds are the median of the timed steps (device synchronised around each); peak memory is
torch.cuda.max_memory_allocated over warm-up and timed steps (reset before the first); MFU =
longalign.train.trainer.training_flops (6 N T + 6 n_layers d sum L^2: the same count for every system
run on the same packs and model, recomputation not counted) / (step seconds x the bf16 matmul peak
measured in the same process before the model is built).
"""
from __future__ import annotations

import os
import statistics
import time

import torch

from longalign.train.collators import PackCollator
from longalign.train.speed.memory_model import GIB
from longalign.train.trainer import matmul_parameters, training_flops


def measured_peak_flops(size: int, dtype: torch.dtype, device: torch.device, repeats: int = 10,
                        per_timing: int = 20) -> float:
    """Best FLOP/s of `per_timing` back-to-back (size x size) @ (size x size) matmuls, over
    `repeats` timings. Run before the model is built: an idle, unfragmented GPU (measured after
    training, single matmuls read 697-768 TFLOP/s on one H200, launch gaps included)."""
    a = torch.randn(size, size, dtype=dtype, device=device)
    b = torch.randn(size, size, dtype=dtype, device=device)
    a @ b  # warm-up: cuBLAS heuristics and workspace
    best = float("inf")
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        for _ in range(per_timing):
            a @ b
        synchronize(device)
        best = min(best, (time.perf_counter() - start) / per_timing)
    del a, b
    return 2.0 * size ** 3 / best


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def compile_counters() -> dict:
    """Dynamo's running totals: frames compiled, distinct graphs, graph breaks."""
    from torch._dynamo.utils import counters

    return {"frames_compiled": int(counters["frames"]["ok"]),
            "unique_graphs": int(counters["stats"]["unique_graphs"]),
            "graph_breaks": int(sum(counters["graph_break"].values()))}


def device_batch(batch: dict, device) -> dict:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items() if k != "batch_counts"}


def time_steps(train_step, batches: list[dict], device, warmup: int, steps: int, profile: bool = False) -> dict:
    """Run `train_step(batch)` on each batch; times and losses of the steps after `warmup`, compile
    counters after warm-up, and (profile) one more batch under the profiler. Peak memory is reset
    first, so it covers warm-up and timed steps."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times, losses, profiled = [], [], None
    compiled_after_warmup = compile_counters()
    for i, batch in enumerate(batches):
        batch = device_batch(batch, device)
        if i == warmup + steps:  # the extra --profile pack, after the timed ones
            if profile:
                from step_profile import profile_step

                profiled = profile_step(lambda: train_step(batch), device)
            break
        synchronize(device)
        start = time.perf_counter()
        loss = train_step(batch)
        synchronize(device)
        if i >= warmup:
            times.append(time.perf_counter() - start)
            losses.append(float(loss))
        if i + 1 == warmup:
            compiled_after_warmup = compile_counters()
    return {"times": times, "losses": losses, "compiled_after_warmup": compiled_after_warmup, "profile": profiled}


def pack_counts(rows: list[dict]) -> list[tuple[int, int]]:
    """(tokens, sum of squared sequence lengths) of each pack row: the FLOP count's inputs."""
    counts = [PackCollator("sequence")([row])["batch_counts"] for row in rows]
    return [(int(c[3]), int(c[4])) for c in counts]


def measurement(model, layers: int, width: int, timed_counts: list[tuple[int, int]], timing: dict, peak: float,
                device) -> dict:
    """The figures every step benchmark reports (module docstring: MFU, peak memory)."""
    tokens = statistics.mean(t for t, _ in timed_counts)
    sum_sq = statistics.mean(s for _, s in timed_counts)
    seconds = statistics.median(timing["times"])
    flops = training_flops(matmul_parameters(model), layers, width, tokens, sum_sq)
    cuda = device.type == "cuda"
    return {"device": torch.cuda.get_device_name(device) if cuda else "cpu",
            "params": sum(p.numel() for p in model.parameters()), "tokens_per_step": tokens,
            "step_seconds": seconds, "step_times": timing["times"], "tokens_per_s": tokens / seconds,
            "model_tflops_per_step": flops / 1e12, "measured_peak_tflops": peak / 1e12, "mfu": flops / seconds / peak,
            "peak_memory_gib": torch.cuda.max_memory_allocated(device) / GIB if cuda else None,
            "peak_reserved_gib": torch.cuda.max_memory_reserved(device) / GIB if cuda else None,
            "loss_finite": all(v == v and abs(v) != float("inf") for v in timing["losses"]),
            **compile_report(timing["compiled_after_warmup"]), "profile": timing["profile"],
            "alloc_conf": os.environ.get("PYTORCH_CUDA_ALLOC_CONF"), "torch": torch.__version__}


def compile_report(after_warmup: dict) -> dict:
    """Compile totals, and whether anything (re)compiled during the timed steps (then the step
    time includes compilation: raise --warmup or look at the recompile reasons). Reported without
    --compile too: flex compiles its kernel, and recompiles once for dynamic shapes on the 2nd pack."""
    now = compile_counters()
    return {"compile_counters": now,
            "recompiled_during_timing": now["frames_compiled"] > after_warmup["frames_compiled"]}
