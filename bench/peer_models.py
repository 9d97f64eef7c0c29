"""The peers of bench_peers.py: stock transformers Llama (+ Liger) on the project's packs, and the
LM-head loss of the project against Liger's fused linear cross-entropy (bench_peers.py docstring).

    result = stock_run(bench_train_step.parse_args([...]), "flex_attention", liger=True, flash_kwargs=False)
    result = loss_comparison(bench_train_step.parse_args([...]))
"""
from __future__ import annotations

import statistics
import time

import torch
import transformers
from transformers import DataCollatorWithFlattening, LlamaForCausalLM

import bench_train_step
from step_timing import measured_peak_flops, measurement, pack_counts, synchronize, time_steps
from longalign.train.collators import PackCollator
from longalign.train.speed.liger import liger_weighted_loss
from longalign.ops.weighted_loss import causal_lm_loss
from longalign.train.speed.memory_model import GIB

LOSS_INIT_STD = 0.02  # LM-head weights of the loss comparison (transformers' initializer_range)


def device_and_dtype(targs) -> tuple[torch.device, torch.dtype]:
    cuda = torch.cuda.is_available() and not targs.smoke
    return torch.device("cuda" if cuda else "cpu"), torch.bfloat16 if cuda else torch.float32


def flattened_features(row: dict) -> list[dict]:
    """A pack row -> its sequences as separate features, the input of DataCollatorWithFlattening."""
    cu = row["cu_seqlens"]
    return [{"input_ids": row["input_ids"][s:e], "labels": row["labels"][s:e]} for s, e in zip(cu[:-1], cu[1:])]


def stock_run(targs, attn_implementation: str, liger: bool, flash_kwargs: bool) -> dict:
    """One timed stock-transformers configuration on bench_train_step's packs and model shape."""
    device, dtype = device_and_dtype(targs)
    if liger:  # before any work: a missing package fails the row at once
        from liger_kernel.transformers import apply_liger_kernel_to_llama
    peak = measured_peak_flops(targs.matmul_size, dtype, device)
    rows = bench_train_step.synthetic_packs(targs.warmup + targs.steps, targs.pack_tokens, targs.vocab, targs.seed)
    counts = pack_counts(rows)
    torch.manual_seed(targs.seed)
    with torch.device(device):
        model = LlamaForCausalLM(bench_train_step.model_config(targs, targs.layers, attn_implementation)).to(dtype)
    if liger:  # liger's defaults for Llama: RoPE, RMSNorm, SwiGLU, fused linear cross-entropy
        apply_liger_kernel_to_llama(model=model)
    model.gradient_checkpointing_enable()  # what the Trainer does for --gradient_checkpointing
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, betas=(0.9, 0.95), weight_decay=0.0,
                                  fused=device.type == "cuda")
    collate = DataCollatorWithFlattening(return_flash_attn_kwargs=flash_kwargs)

    def train_step(batch):
        loss = model(**batch).loss  # transformers' own loss (or Liger's fused one)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    timing = time_steps(train_step, [collate(flattened_features(r)) for r in rows], device, targs.warmup, targs.steps)
    result = measurement(model, targs.layers, targs.hidden, counts[targs.warmup:], timing, peak, device)
    return {**result, "attention": attn_implementation, "attn_backend": attn_implementation,
            "recompute": "gradient_checkpointing", "compile": False, "liger": liger, "flash_kwargs": flash_kwargs,
            "transformers": transformers.__version__, "predicted_peak_gib": None}


def _time_loss(fn, hidden0, weight0, batch: dict, device, warmup: int, reps: int) -> dict:
    """Forward + backward of fn's mean loss: median seconds, peak memory above the inputs, results."""
    times, base = [], 0
    for i in range(warmup + reps):
        hidden, weight = hidden0.detach().requires_grad_(True), weight0.detach().requires_grad_(True)
        if i == warmup and device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device)
        synchronize(device)
        start = time.perf_counter()
        loss = fn(hidden, weight, batch["labels"], batch["loss_weights"], batch["cu_seq_lens_q"], reduction="mean")
        loss.backward()
        synchronize(device)
        if i >= warmup:
            times.append(time.perf_counter() - start)
    peak = (torch.cuda.max_memory_allocated(device) - base) / GIB if device.type == "cuda" else None
    return {"seconds": statistics.median(times), "peak_extra_gib": peak, "loss": float(loss.detach()),
            "_grads": (hidden.grad.float(), weight.grad.float())}


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp(min=1e-30))


def loss_comparison(targs) -> dict:
    """LongAlign's chunked weighted loss against Liger's fused CE (reduction none) + the same weights,
    on the first timed pack: hidden states N(0, 1), head N(0, LOSS_INIT_STD^2)."""
    device, dtype = device_and_dtype(targs)
    rows = bench_train_step.synthetic_packs(targs.warmup + 1, targs.pack_tokens, targs.vocab, targs.seed)
    pack = PackCollator("sequence")([rows[targs.warmup]])
    batch = {k: pack[k].to(device) for k in ("labels", "loss_weights", "cu_seq_lens_q")}
    g = torch.Generator().manual_seed(targs.seed)
    tokens = pack["input_ids"].shape[1]
    hidden0 = torch.randn(1, tokens, targs.hidden, generator=g).to(device, dtype)
    weight0 = (torch.randn(targs.vocab, targs.hidden, generator=g) * LOSS_INIT_STD).to(device, dtype)
    results = {}
    for name, fn in (("project_chunked", causal_lm_loss), ("liger_fused_none_weighted", liger_weighted_loss)):
        try:
            results[name] = _time_loss(fn, hidden0, weight0, batch, device, targs.warmup, targs.steps)
        except Exception as error:  # recorded in the row (a missing package, a kernel failure); the other runs on
            results[name] = {"error": f"{type(error).__name__}: {error}"}
    ours, theirs = results["project_chunked"], results["liger_fused_none_weighted"]
    agreement = None
    if "_grads" in ours and "_grads" in theirs:
        agreement = {"loss": abs(theirs["loss"] - ours["loss"]) / abs(ours["loss"]),
                     "grad_hidden": _relative(theirs["_grads"][0], ours["_grads"][0]),
                     "grad_head": _relative(theirs["_grads"][1], ours["_grads"][1]),
                     "speedup_liger": ours["seconds"] / theirs["seconds"]}
    for r in results.values():
        r.pop("_grads", None)
    return {"tokens": tokens, "vocab": targs.vocab, "hidden": targs.hidden, "dtype": str(dtype), "losses": results,
            "agreement": agreement, "transformers": transformers.__version__, "torch": torch.__version__}
