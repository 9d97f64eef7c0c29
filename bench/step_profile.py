"""Where the GPU time of one training step goes: kernel time by category (bench_train_step --profile).

    from step_profile import profile_step
    report = profile_step(lambda: one_training_step(), device)

The step runs once under torch.profiler (CUDA activity on a GPU, CPU ops otherwise); each kernel's
self time is summed into the first CATEGORIES entry whose patterns its name contains
(case-insensitive), else into "other". Also returned: the 20 most expensive kernels and the
profiled wall time, so `sum(categories) / wall` says how busy the GPU was (1.0 = never idle).
`MicroStepProfiler` does the same for bench_batching's DeepSpeed runs, as op tables.
Names are matched, not guessed from the op: cuBLAS GEMMs on Hopper are `nvjet_*` or `sm90_xmma_*`,
FlashAttention kernels `flash_*`, cuDNN attention `cudnn_*sdpa*`, compiled flex `*flex_attention*`,
inductor-fused elementwise code `triton_*`.
"""
from __future__ import annotations

import os
import time
from pathlib import Path

import torch

CATEGORIES = (
    ("attention", ("flash", "fmha", "sdpa", "flex_attention", "attention", "varlen")),
    ("gemm", ("gemm", "nvjet", "xmma", "cutlass", "matmul", "splitk")),
    ("optimizer", ("adam", "multi_tensor", "foreach")),
    ("compiled_elementwise", ("triton_",)),
    ("communication", ("nccl",)),
    ("elementwise", ("elementwise", "vectorized", "reduce", "copy", "cat", "index", "softmax", "fill")),
)


def categorize(name: str) -> str:
    """The category of a kernel name (see CATEGORIES), "other" when nothing matches."""
    lowered = name.lower()
    for category, patterns in CATEGORIES:
        if any(p in lowered for p in patterns):
            return category
    return "other"


def _self_time_us(event, cuda: bool) -> float:
    """GPU self time on CUDA (host-side runtime calls such as cudaDeviceSynchronize have none and
    drop out), CPU self time otherwise."""
    attrs = ("self_device_time_total", "self_cuda_time_total") if cuda else ("self_cpu_time_total",)
    for attr in attrs:
        value = getattr(event, attr, None)
        if value:
            return float(value)
    return 0.0


def summarize(kernel_times: dict[str, float], wall_s: float, top: int = 20) -> dict:
    """{kernel name: self seconds} -> categories, top kernels, busy fraction."""
    categories: dict[str, float] = {}
    for name, seconds in kernel_times.items():
        key = categorize(name)
        categories[key] = categories.get(key, 0.0) + seconds
    busy = sum(categories.values())
    ranked = sorted(kernel_times.items(), key=lambda kv: -kv[1])[:top]
    return {"wall_s": wall_s, "kernel_s": busy, "busy_fraction": busy / wall_s if wall_s else None,
            "categories_s": dict(sorted(categories.items(), key=lambda kv: -kv[1])),
            "top_kernels": [{"name": n[:160], "s": s, "category": categorize(n)} for n, s in ranked]}


def profile_step(step, device: torch.device) -> dict:
    """Run `step()` once under the profiler; its kernel-time breakdown (module docstring)."""
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CUDA] if cuda else [ProfilerActivity.CPU]
    with profile(activities=activities) as prof:
        start = time.perf_counter()
        step()
        if cuda:
            torch.cuda.synchronize(device)
        wall = time.perf_counter() - start
    kernel_times: dict[str, float] = {}
    for event in prof.key_averages():
        seconds = _self_time_us(event, cuda) / 1e6
        if seconds > 0:
            kernel_times[event.key] = kernel_times.get(event.key, 0.0) + seconds
    return summarize(kernel_times, wall)


class MicroStepProfiler:
    """$BENCH_PROFILE_MICRO_STEPS=A:B profiles micro-steps A..B-1 (CPU ops and CUDA kernels) and
    writes rank 0's top ops by self CPU and by self CUDA time to $BENCH_PROFILE_OUT (or
    profile_rank0.txt in the working directory). Unset: does nothing."""

    def __init__(self, first: int | None, stop: int | None, out: Path, rank: int):
        self.first, self.stop, self.out, self.rank, self.prof = first, stop, out, rank, None

    @classmethod
    def from_env(cls, rank: int):
        spec = os.environ.get("BENCH_PROFILE_MICRO_STEPS")
        first, stop = (int(x) for x in spec.split(":")) if spec else (None, None)
        out = Path(os.environ.get("BENCH_PROFILE_OUT", "profile_rank0.txt"))
        return cls(first, stop, out, rank)

    def before(self, index: int) -> None:
        if index == self.first:
            from torch.profiler import ProfilerActivity, profile

            self.prof = profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA])
            self.prof.__enter__()

    def after(self, index: int) -> None:
        if self.prof is None or index + 1 != self.stop:
            return
        self.prof.__exit__(None, None, None)
        if self.rank == 0:
            events = self.prof.key_averages()
            tables = [f"micro-steps {self.first}..{self.stop - 1}, sorted by {key}\n"
                      + events.table(sort_by=key, row_limit=35, max_name_column_width=70)
                      for key in ("self_cpu_time_total", "self_cuda_time_total")]
            self.out.write_text("\n\n".join(tables))
        self.prof = None
