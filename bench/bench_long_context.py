"""Single-GPU long-context reach (issue 19): how long a pack the 1.36B bench model trains, how fast.

    python bench/bench_long_context.py --out long.jsonl                                  # GPU
    python bench/bench_long_context.py --lengths 1048576,2097152 --configs "--recompute full" \
        "--recompute full --tiled_mlp --offload_checkpoints" --out long_fit.jsonl
    python bench/bench_long_context.py --smoke --out /tmp/long.jsonl                     # CPU, tiny

The model, packs and peak are bench_train_step.py's (imported: `build_model`, `synthetic_packs`,
`measured_peak_flops`): random-init Llama (hidden 2048, 24 layers, 16 heads, vocab 32000), bf16,
fused AdamW, the chunked loss, the attention backend chosen by longalign.attention (FlashAttention-4
where installed) unless a configuration names one. A pack of T tokens is T / --document_tokens
of bench_train_step's LongAlign-like 64k packs laid end to end (what sort_and_group.py
--max_length T makes of LongAlign data, whose sequences are at most 64k: attention work grows
like T); --document_tokens 0 makes it one synthetic pack of T tokens (documents up to T tokens:
attention work grows like T^2, a 1M-token step takes minutes). For each configuration (a flag string: --recompute
POLICY, --attn_backend NAME, --tiled_mlp, --offload_checkpoints; longalign/long_context.py) and each
pack length, in ascending order, one child process (this script with --child) trains --warmup +
--steps packs of that length (--long_warmup / --long_steps beyond LONG_LENGTH, where a step takes
tens of seconds) and reports one JSON line: tokens/s and MFU as bench_train_step defines them, and the
memory breakdown in GiB —
    weights, grads, optimizer           sizes of the tensors (bf16 weights and grads, AdamW's two states)
    checkpointed_activations            allocated after the forward minus before it (what backward keeps)
    forward_peak, backward_peak         the allocator's peak in each phase, above the step's start
    loss_chunk_estimate                 2 x chunk x vocab x 4 B of fp32 logits + an fp32 dW (longalign/loss.py)
    peak_allocated, capacity            the step's peak, and the GPU's memory.
A child that runs out of memory reports the phase and PyTorch's message (an `oom` row, not a crash),
and the longer lengths of that configuration are skipped. With --tiled_mlp / --offload_checkpoints
the child first checks its step against plain full recompute on a VERIFY_TOKENS pack (loss and
gradient differences in the row). Children that would start after --budget_s are listed as skipped.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import torch

import bench_train_step as step_bench
from longalign.attention import ENV_VAR as ATTN_ENV, choose_backend
from longalign.collators import PackCollator
from longalign.loss import DEFAULT_CHUNK_TOKENS
from longalign.trainer import matmul_parameters, training_flops

DEFAULT_LENGTHS = (65536, 131072, 262144, 524288, 1048576, 2097152, 4194304)
DOCUMENT_TOKENS, SMOKE_DOCUMENT_TOKENS = 65536, 128
SMOKE_LENGTHS = (256, 512)
DEFAULT_CONFIGS = ("--recompute full", "--recompute full --tiled_mlp --offload_checkpoints")
LONG_LENGTH = 262144  # beyond it, --long_warmup / --long_steps
VERIFY_TOKENS, SMOKE_VERIFY_TOKENS = 8192, 128
CHILD_TIMEOUT_S = 1800
GIB = 2 ** 30


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lengths", default=None, help="comma-separated pack lengths (default DEFAULT_LENGTHS)")
    p.add_argument("--configs", nargs="+", default=None, help="flag strings (default DEFAULT_CONFIGS)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--long_warmup", type=int, default=1)
    p.add_argument("--long_steps", type=int, default=1)
    p.add_argument("--budget_s", type=float, default=540.0, help="start no child after this many seconds")
    p.add_argument("--out", default=None, help="JSON lines, one per (configuration, length)")
    p.add_argument("--smoke", action="store_true", help="tiny CPU run (tests)")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--pack_tokens", type=int, default=65536, help="child: this pack length")
    p.add_argument("--recompute", default="full")
    p.add_argument("--attn_backend", default=None)
    p.add_argument("--tiled_mlp", action="store_true", help="DeepSpeed's TiledMLP in every layer")
    p.add_argument("--offload_checkpoints", action="store_true",
                   help="DeepSpeed's checkpointing with the layer inputs on the CPU (replaces --recompute)")
    p.add_argument("--document_tokens", type=int, default=None,
                   help="length of the synthetic packs laid end to end (default 65536; 0: one pack of T)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.document_tokens is None:
        args.document_tokens = SMOKE_DOCUMENT_TOKENS if args.smoke else DOCUMENT_TOKENS
    return args


# ---------- child: one configuration at one length ----------
def model_args(args) -> argparse.Namespace:
    """bench_train_step's model arguments for this child (its --smoke sizes under --smoke)."""
    argv = ["--smoke"] if args.smoke else []
    model = step_bench.parse_args(argv + ["--recompute", "none" if args.offload_checkpoints else args.recompute])
    model.pack_tokens, model.seed = args.pack_tokens, args.seed
    return model


def apply_alst(model, args) -> None:
    from longalign import long_context
    if args.tiled_mlp:
        long_context.tile_mlps(model)
    if args.offload_checkpoints:
        long_context.offload_checkpoints_to_cpu(model)


def start_one_rank_deepspeed() -> None:
    """deepspeed.comm on a one-process group (DeepSpeed's checkpointing needs it)."""
    import deepspeed
    from deepspeed.accelerator import get_accelerator
    if not deepspeed.comm.is_initialized():
        port = 29400 + os.getpid() % 500
        deepspeed.init_distributed(dist_backend=get_accelerator().communication_backend_name(),
                                   auto_mpi_discovery=False, init_method=f"tcp://127.0.0.1:{port}",
                                   rank=0, world_size=1)


def long_packs(n: int, tokens: int, document_tokens: int, vocab: int, seed: int) -> list[dict]:
    """n pack rows of `tokens` tokens: synthetic packs of `document_tokens` laid end to end
    (module docstring), or one synthetic pack each when document_tokens is 0 or >= tokens.

    two packs with cu_seqlens [0 5 8] and [0 8] -> [0 5 8 16]
    """
    if not document_tokens or document_tokens >= tokens:
        return step_bench.synthetic_packs(n, tokens, vocab, seed)
    if tokens % document_tokens:
        raise ValueError(f"pack length {tokens} is not a multiple of --document_tokens {document_tokens}")
    parts = step_bench.synthetic_packs(n * (tokens // document_tokens), document_tokens, vocab, seed)
    per_pack = tokens // document_tokens
    return [concatenated(parts[i * per_pack:(i + 1) * per_pack]) for i in range(n)]


def concatenated(rows: list[dict]) -> dict:
    ids, labels, cu = [], [], [0]
    for row in rows:
        ids += row["input_ids"]
        labels += row["labels"]
        cu += [cu[-1] + e for e in row["cu_seqlens"][1:]]
    return {"input_ids": ids, "labels": labels, "cu_seqlens": cu}


def batch_of(row: dict, device) -> dict:
    batch = PackCollator("sequence")([row])
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}


def loss_and_grads(model, batch) -> tuple[float, list[torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    loss = model(**{k: v for k, v in batch.items() if k != "batch_counts"}, loss_reduction="mean").loss
    loss.backward()
    grads = [p.grad.detach().float().clone() for p in model.parameters() if p.grad is not None]
    model.zero_grad(set_to_none=True)
    return float(loss.detach()), grads


def verify_alst(model, args, vocab: int, device) -> dict:
    """Loss / gradient difference of the ALST pieces against plain full recompute, short pack."""
    tokens = SMOKE_VERIFY_TOKENS if args.smoke else VERIFY_TOKENS
    batch = batch_of(step_bench.synthetic_packs(1, tokens, vocab, args.seed + 1)[0], device)
    ref_loss, ref = loss_and_grads(model, batch)
    apply_alst(model, args)
    loss, grads = loss_and_grads(model, batch)
    diff = math.sqrt(sum(float(((a - b) ** 2).sum()) for a, b in zip(grads, ref)))
    norm = math.sqrt(sum(float((b ** 2).sum()) for b in ref))
    return {"verify_tokens": tokens, "loss_rel_diff": abs(loss - ref_loss) / max(abs(ref_loss), 1e-12),
            "grad_rel_diff": diff / max(norm, 1e-12)}


def tensor_gib(tensors) -> float:
    return sum(t.numel() * t.element_size() for t in tensors) / GIB


class MemoryPhases:
    """Allocated / peak memory around the phases of one step (CUDA only; zeros elsewhere)."""

    def __init__(self, device):
        self.cuda = device.type == "cuda"
        self.device = device
        self.values = {}
        self.phase = "build"  # where an out-of-memory error would have happened

    def now(self) -> float:
        return torch.cuda.memory_allocated(self.device) / GIB if self.cuda else 0.0

    def start(self) -> None:
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
        self.values["start"] = self.now()

    def mark(self, phase: str) -> None:
        peak = torch.cuda.max_memory_allocated(self.device) / GIB if self.cuda else 0.0
        self.values[f"{phase}_peak"] = peak - self.values["start"]
        self.values[f"after_{phase}"] = self.now()
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.device)


def train_steps(model, optimizer, batches, device, phases: MemoryPhases) -> list[float]:
    """Forward / backward / optimizer step per batch; seconds of each; phases of the last step."""
    times = []
    for batch in batches:
        step_bench.synchronize(device)
        start = time.perf_counter()
        phases.start()
        phases.phase = "forward"
        loss = model(**{k: v for k, v in batch.items() if k != "batch_counts"}, loss_reduction="mean").loss
        phases.mark("forward")
        phases.phase = "backward"
        loss.backward()
        phases.mark("backward")
        phases.values["grads"] = tensor_gib(p.grad for p in model.parameters() if p.grad is not None)
        phases.phase = "optimizer"
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step_bench.synchronize(device)
        times.append(time.perf_counter() - start)
        phases.values["loss"] = float(loss.detach())
    return times


def memory_breakdown(model, optimizer, phases: MemoryPhases, vocab: int, hidden: int, device) -> dict:
    v = phases.values
    states = [t for s in optimizer.state.values() for t in s.values() if torch.is_tensor(t) and t.dim() > 0]
    out = {"weights": tensor_gib(model.parameters()), "grads": v.get("grads", 0.0), "optimizer": tensor_gib(states),
           "loss_chunk_estimate": (2 * DEFAULT_CHUNK_TOKENS * vocab * 4 + vocab * hidden * 4) / GIB}
    if device.type == "cuda":
        out.update(checkpointed_activations=v["after_forward"] - v["start"], forward_peak=v["forward_peak"],
                   backward_peak=v["backward_peak"], peak_allocated=torch.cuda.max_memory_allocated(device) / GIB,
                   capacity=torch.cuda.mem_get_info(device)[1] / GIB)
    return out


def run_child(args) -> dict:
    device = torch.device("cpu" if args.smoke or not torch.cuda.is_available() else "cuda")
    dtype = torch.float32 if args.smoke else torch.bfloat16
    if args.attn_backend:
        os.environ[ATTN_ENV] = args.attn_backend
    margs = model_args(args)
    long = args.pack_tokens > LONG_LENGTH
    warmup, steps = (args.long_warmup, args.long_steps) if long else (args.warmup, args.steps)
    peak = step_bench.measured_peak_flops(margs.matmul_size, dtype, device)
    if args.offload_checkpoints:
        start_one_rank_deepspeed()
    model = step_bench.build_model(margs, device, dtype)
    row = {"pack_tokens": args.pack_tokens, "recompute": "deepspeed-offload" if args.offload_checkpoints else
           margs.recompute, "tiled_mlp": args.tiled_mlp, "offload_checkpoints": args.offload_checkpoints,
           "attn_backend": choose_backend(device, dtype), "warmup": warmup, "steps": steps,
           "document_tokens": args.document_tokens,
           "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"}
    if args.tiled_mlp or args.offload_checkpoints:
        row.update(verify_alst(model, args, margs.vocab, device))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, betas=(0.9, 0.95), weight_decay=0.0,
                                  fused=device.type == "cuda")
    packs = long_packs(warmup + steps, args.pack_tokens, args.document_tokens, margs.vocab, args.seed)
    batches = [batch_of(p, device) for p in packs]
    phases = MemoryPhases(device)
    try:
        times = train_steps(model, optimizer, batches, device, phases)
    except torch.OutOfMemoryError as error:
        row.update(status="oom", oom_phase=phases.phase, oom_message=str(error)[:600],
                   memory_gib={"weights": tensor_gib(model.parameters())})
        return row
    timed = batches[warmup:]
    tokens = sum(int(b["input_ids"].numel()) for b in timed) / len(timed)
    sum_sq = sum(int(b["batch_counts"][4]) for b in timed) / len(timed)
    seconds = sorted(times[warmup:])[len(timed) // 2]
    flops = training_flops(matmul_parameters(model), margs.layers, margs.hidden, tokens, sum_sq)
    row.update(status="ok", tokens_per_step=tokens, sum_sq_lengths=sum_sq, step_seconds=seconds,
               tokens_per_s=tokens / seconds, mfu=flops / seconds / peak, measured_peak_tflops=peak / 1e12,
               loss_finite=math.isfinite(phases.values["loss"]),
               memory_gib=memory_breakdown(model, optimizer, phases, margs.vocab, margs.hidden, device))
    return row


# ---------- parent: one child per (configuration, length) ----------
def run_one(config: str, length: int, args, tmp: Path, timeout_s: float) -> dict:
    out = tmp / "row.json"
    out.unlink(missing_ok=True)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", "--pack_tokens", str(length),
           "--warmup", str(args.warmup), "--steps", str(args.steps), "--long_warmup", str(args.long_warmup),
           "--long_steps", str(args.long_steps), "--seed", str(args.seed), "--out", str(out),
           "--document_tokens", str(args.document_tokens),
           *(["--smoke"] if args.smoke else []), *shlex.split(config)]
    env = dict(os.environ)
    env.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout_s)
        row = json.loads(out.read_text()) if proc.returncode == 0 and out.exists() else {
            "status": "failed", "error": (proc.stderr or proc.stdout)[-1500:]}
    except subprocess.TimeoutExpired:
        row = {"status": "failed", "error": f"timed out after {timeout_s:.0f} s"}
    return {"config": config, "pack_tokens": length, "wall_s": round(time.perf_counter() - start, 1), **row}


def run_all(args) -> list[dict]:
    import tempfile

    lengths = sorted(int(x) for x in args.lengths.split(",")) if args.lengths else list(
        SMOKE_LENGTHS if args.smoke else DEFAULT_LENGTHS)
    configs = args.configs or list(DEFAULT_CONFIGS)
    rows, start = [], time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for config in configs:
            stopped = None
            for length in lengths:
                elapsed = time.perf_counter() - start
                if stopped:
                    row = {"config": config, "pack_tokens": length, "status": "skipped", "reason": stopped}
                elif elapsed > args.budget_s:
                    row = {"config": config, "pack_tokens": length, "status": "skipped",
                           "reason": f"budget {args.budget_s:.0f} s spent"}
                else:
                    row = run_one(config, length, args, Path(tmp), CHILD_TIMEOUT_S)
                    if row["status"] != "ok":
                        stopped = f"{row['status']} at {length} tokens"
                rows.append(row)
                print(json.dumps(row), flush=True)
    print(summary_table(rows), flush=True)
    return rows


def summary_table(rows: list[dict]) -> str:
    lines = [f"{'config':<55} {'tokens':>8} {'step_s':>8} {'tok/s':>8} {'mfu':>6} {'peakGiB':>8} {'ckptGiB':>8}"]
    for r in rows:
        head = f"{r['config']:<55} {r['pack_tokens']:>8}"
        if r["status"] != "ok":
            lines.append(f"{head} {r['status']}: {r.get('reason') or r.get('oom_phase') or r.get('error', '')[-60:]}")
            continue
        m = r["memory_gib"]
        lines.append(f"{head} {r['step_seconds']:8.2f} {r['tokens_per_s']:8.0f} {r['mfu']:6.3f} "
                     f"{m.get('peak_allocated', 0):8.1f} {m.get('checkpointed_activations', 0):8.1f}")
    return "\n".join(lines)


def main(argv=None):
    args = parse_args(argv)
    if args.child:
        row = run_child(args)
        Path(args.out).write_text(json.dumps(row) + "\n")
        return row
    rows = run_all(args)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text("".join(json.dumps(r) + "\n" for r in rows))
    return rows


if __name__ == "__main__":
    main()
