"""Single-GPU long-context reach: how long a pack the 1.36B bench model trains, how fast.

    python bench/bench_long_context.py --out long.jsonl                                  # GPU
    python bench/bench_long_context.py --lengths 1048576,2097152 --configs "--recompute full" \
        "--recompute full --tiled_mlp --offload_checkpoints" --out long_fit.jsonl
    python bench/bench_long_context.py --smoke --out /tmp/long.jsonl                     # CPU, tiny

The model and packs are bench_train_step.py's (`build_model`, `synthetic_packs`), the timing and
figures step_timing.py's (`measured_peak_flops`, `time_steps`, `measurement`), imported: random-init Llama (hidden 2048, 24 layers, 16 heads, vocab 32000), bf16,
fused AdamW, the chunked loss, the attention backend chosen by longalign.ops.varlen_attention (FlashAttention-4
where installed) unless a configuration names one. A pack of T tokens is T / --document_tokens
of bench_train_step's LongAlign-like 64k packs laid end to end (what sort_and_group.py
--max_length T makes of LongAlign data, whose sequences are at most 64k: attention work grows
like T); --document_tokens 0 makes it one synthetic pack of T tokens (documents up to T tokens:
attention work grows like T^2, a 1M-token step takes minutes). For each configuration (a flag
string: --recompute POLICY, --attn_backend NAME, --tiled_mlp, --offload_checkpoints; longalign/train/speed/long_context.py) and each
pack length, in ascending order, one child process (this script with --child) trains --warmup +
--steps packs of that length (--long_warmup / --long_steps beyond LONG_LENGTH, where a step takes
tens of seconds) and reports one JSON line: tokens/s, MFU and peak memory as bench_train_step
reports them (step_timing.measurement), and the memory breakdown in GiB (memory_gib) —
    weights, grads, optimizer           sizes of the tensors (bf16 weights and grads, AdamW's two states)
    checkpointed_activations            allocated after the forward minus at the step's start (kept for backward)
    peak_above_step_start               the peak minus the step's start: activations, grads and the
                                        largest transient (a layer's recompute and backward, the loss)
    loss_chunk_estimate                 2 x chunk x vocab x 4 B of fp32 logits + an fp32 dW (longalign/ops/weighted_loss.py)
    peak_allocated, capacity            the allocator's peak over all steps, and the GPU's memory
    host_rss_peak, host_total           this process's peak resident memory (offloaded checkpoints live
                                        there: ~4 KiB per token per layer) and the machine's RAM.
A child that runs out of memory reports the phase and PyTorch's message (an `oom` row, not a crash),
and the longer lengths of that configuration are skipped. With --tiled_mlp / --offload_checkpoints
the child first checks its step against plain full recompute on a --verify_tokens pack (loss and
gradient differences and both gradient norms in the row). Offloaded activations live in host
memory: a child whose offload would take more than HOST_MEMORY_FRACTION of the machine's RAM
(layers x T x the bytes per token the memory model puts on the host: the layer input under
--offload_checkpoints, selective's tensors under --recompute offload) reports status
`host_memory` instead of running (a host out-of-memory kills processes, not just the child). Children run one at a time through config_runs.py, within
--budget_s; those that would start after it are listed as skipped.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import resource
import shlex
from pathlib import Path

import torch

import bench_train_step as step_bench
from config_runs import run_budgeted, run_in_subprocess
from longalign.ops.varlen_attention import ENV_VAR as ATTN_ENV, choose_backend
from longalign.train.collators import PackCollator
from longalign.ops.weighted_loss import DEFAULT_CHUNK_TOKENS
from longalign.train.speed.memory_model import GIB
from longalign.storage import write_bytes_atomic
from step_timing import device_batch, measured_peak_flops, measurement, pack_counts, time_steps

DEFAULT_LENGTHS = (65536, 131072, 262144, 524288, 1048576, 2097152, 4194304)
DOCUMENT_TOKENS, SMOKE_DOCUMENT_TOKENS = 65536, 128
SMOKE_LENGTHS = (256, 512)
DEFAULT_CONFIGS = ("--recompute full", "--recompute full --tiled_mlp --offload_checkpoints")
LONG_LENGTH = 262144  # beyond it, --long_warmup / --long_steps
VERIFY_TOKENS, SMOKE_VERIFY_TOKENS = 8192, 128
HOST_MEMORY_FRACTION = 0.8  # of the machine's RAM, for offloaded activations (pinned or not)
CHILD_TIMEOUT_S = 1800


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
    p.add_argument("--verify_tokens", type=int, default=None,
                   help="pack length of the check against plain full recompute (default VERIFY_TOKENS)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.verify_tokens is None:
        args.verify_tokens = SMOKE_VERIFY_TOKENS if args.smoke else VERIFY_TOKENS
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
    from longalign.train.speed import long_context
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


def loss_and_grads(model, batch) -> tuple[float, list[torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    loss = model(**batch, loss_aggregation="mean").loss
    loss.backward()
    grads = [p.grad.detach().float().clone() for p in model.parameters() if p.grad is not None]
    model.zero_grad(set_to_none=True)
    return float(loss.detach()), grads


def verify_alst(model, args, vocab: int, device) -> dict:
    """Loss / gradient difference of the ALST pieces against plain full recompute (--verify_tokens)."""
    tokens = args.verify_tokens
    row = step_bench.synthetic_packs(1, tokens, vocab, args.seed + 1)[0]
    batch = device_batch(PackCollator("sequence")([row]), device)
    from longalign.ops.recompute import apply_recompute

    policy = "none" if args.offload_checkpoints else args.recompute
    apply_recompute(model, "full")  # the reference: plain full recompute, nothing tiled or offloaded
    ref_loss, ref = loss_and_grads(model, batch)
    apply_recompute(model, policy)
    apply_alst(model, args)
    loss, grads = loss_and_grads(model, batch)
    diff = math.sqrt(sum(float(((a - b) ** 2).sum()) for a, b in zip(grads, ref)))
    norm = math.sqrt(sum(float((b ** 2).sum()) for b in ref))
    return {"verify_tokens": tokens, "loss_rel_diff": abs(loss - ref_loss) / max(abs(ref_loss), 1e-12),
            "grad_rel_diff": diff / max(norm, 1e-12), "verify_loss": loss, "reference_loss": ref_loss,
            "grad_norm": math.sqrt(sum(float((g ** 2).sum()) for g in grads)), "reference_grad_norm": norm}


def host_offload_bytes(margs, args) -> int:
    """Host memory the offloaded activations of one step take (module docstring)."""
    from longalign.modeling.shape import ModelShape
    from longalign.train.speed.memory_model import layer_activation_bytes

    config = step_bench.model_config(margs, margs.layers)
    per_layer = layer_activation_bytes(ModelShape.from_config(config), args.pack_tokens, 2)
    if args.offload_checkpoints:
        return margs.layers * per_layer["full"]
    return margs.layers * per_layer["selective"] if margs.recompute.startswith("offload") else 0


def tensor_gib(tensors) -> float:
    return sum(t.numel() * t.element_size() for t in tensors) / GIB


class InstrumentedStep:
    """The training step, noting the phase it is in and the memory allocated at its boundaries."""

    def __init__(self, model, optimizer, device):
        self.model, self.optimizer, self.device = model, optimizer, device
        self.phase, self.values = "build", {}

    def allocated(self) -> float:
        return torch.cuda.memory_allocated(self.device) / GIB if self.device.type == "cuda" else 0.0

    def __call__(self, batch):
        self.values["start"] = self.allocated()
        self.phase = "forward"
        loss = self.model(**batch, loss_aggregation="mean").loss
        self.values["after_forward"] = self.allocated()
        self.phase = "backward"
        loss.backward()
        self.values["grads"] = tensor_gib(p.grad for p in self.model.parameters() if p.grad is not None)
        self.phase = "optimizer"
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.phase = "between steps"
        return loss.detach()


def memory_breakdown(step: InstrumentedStep, vocab: int, hidden: int, peak_gib) -> dict:
    v = step.values
    states = [t for s in step.optimizer.state.values() for t in s.values() if torch.is_tensor(t) and t.dim() > 0]
    out = {"weights": tensor_gib(step.model.parameters()), "grads": v.get("grads", 0.0), "optimizer": tensor_gib(states),
           "loss_chunk_estimate": (2 * DEFAULT_CHUNK_TOKENS * vocab * 4 + vocab * hidden * 4) / GIB}
    out.update(host_rss_peak=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20,  # KiB -> GiB
               host_total=os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GIB)
    if step.device.type == "cuda":
        out.update(checkpointed_activations=v["after_forward"] - v["start"], step_start=v["start"],
                   peak_above_step_start=peak_gib - v["start"], peak_allocated=peak_gib,
                   capacity=torch.cuda.mem_get_info(step.device)[1] / GIB)
    return out


def run_child(args) -> dict:
    device = torch.device("cpu" if args.smoke or not torch.cuda.is_available() else "cuda")
    dtype = torch.float32 if args.smoke else torch.bfloat16
    if args.attn_backend:
        os.environ[ATTN_ENV] = args.attn_backend
    margs = model_args(args)
    long = args.pack_tokens > LONG_LENGTH
    warmup, steps = (args.long_warmup, args.long_steps) if long else (args.warmup, args.steps)
    host_total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if host_offload_bytes(margs, args) > HOST_MEMORY_FRACTION * host_total:
        return {"pack_tokens": args.pack_tokens, "recompute": margs.recompute, "status": "host_memory",
                "host_offload_gib": host_offload_bytes(margs, args) / GIB, "host_total_gib": host_total / GIB}
    peak = measured_peak_flops(margs.matmul_size, dtype, device)
    if args.offload_checkpoints:
        start_one_rank_deepspeed()
    model = step_bench.build_model(margs, device, dtype, margs.layers, margs.recompute)
    row = {"pack_tokens": args.pack_tokens, "recompute": "deepspeed-offload" if args.offload_checkpoints else
           margs.recompute, "tiled_mlp": args.tiled_mlp, "offload_checkpoints": args.offload_checkpoints,
           "attn_backend": choose_backend(device, dtype), "warmup": warmup, "steps": steps,
           "document_tokens": args.document_tokens}
    if args.tiled_mlp or args.offload_checkpoints or margs.recompute.startswith("offload"):
        row.update(verify_alst(model, args, margs.vocab, device))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, betas=(0.9, 0.95), weight_decay=0.0,
                                  fused=device.type == "cuda")
    rows = long_packs(warmup + steps, args.pack_tokens, args.document_tokens, margs.vocab, args.seed)
    collate = PackCollator("sequence")
    step = InstrumentedStep(model, optimizer, device)
    try:
        timing = time_steps(step, [collate([r]) for r in rows], device, warmup, steps)
    except torch.OutOfMemoryError as error:
        return {**row, "status": "oom", "oom_phase": step.phase, "oom_message": str(error)[:600],
                "memory_gib": {"weights": tensor_gib(model.parameters())}}
    result = measurement(model, margs.layers, margs.hidden, pack_counts(rows)[warmup:], timing, peak, device)
    return {**row, "status": "ok", **result,
            "memory_gib": memory_breakdown(step, margs.vocab, margs.hidden, result["peak_memory_gib"])}


# ---------- parent: one child per (configuration, length) ----------
def child_argv(config: str, length: int, args) -> list[str]:
    return ["--child", "--pack_tokens", str(length), "--warmup", str(args.warmup), "--steps", str(args.steps),
            "--verify_tokens", str(args.verify_tokens),
            "--long_warmup", str(args.long_warmup), "--long_steps", str(args.long_steps), "--seed", str(args.seed),
            "--document_tokens", str(args.document_tokens), *(["--smoke"] if args.smoke else []), *shlex.split(config)]


def run_one(config: str, length: int, args, timeout_s: float) -> dict:
    """One child (config_runs.run_in_subprocess): its row, or status `failed` with the error."""
    result = run_in_subprocess(Path(__file__).resolve(), child_argv(config, length, args), timeout_s)
    return result if "error" not in result else {"status": "failed", **result}


def run_all(args) -> list[dict]:
    """Every (configuration, length), shortest first; after a row that is not ok, the longer
    lengths of that configuration are skipped (config_runs.run_budgeted keeps the budget)."""
    lengths = sorted(int(x) for x in args.lengths.split(",")) if args.lengths else list(
        SMOKE_LENGTHS if args.smoke else DEFAULT_LENGTHS)
    stopped: dict[str, str] = {}

    def one(job: tuple[str, int], timeout_s: float) -> dict:
        config, length = job
        if config in stopped:
            return {"status": "skipped", "reason": stopped[config]}
        row = run_one(config, length, args, timeout_s)
        if row["status"] != "ok":
            stopped[config] = f"{row['status']} at {length} tokens"
        print(json.dumps({"config": config, **row}), flush=True)
        return row

    def save(rows: list[dict]) -> None:  # the whole file each time, atomically (never half a row)
        if args.out:
            write_bytes_atomic(args.out, "".join(json.dumps(r) + "\n" for r in rows).encode())

    jobs = [(config, length) for config in (args.configs or list(DEFAULT_CONFIGS)) for length in lengths]
    rows = run_budgeted(jobs, one, args.budget_s, CHILD_TIMEOUT_S, on_result=save, name=lambda job: job[0],
                        describe=lambda job: {"pack_tokens": job[1]})
    for row in rows:  # run_budgeted's own skip marker, in this script's terms
        if "skipped" in row:
            row.update(status="skipped", reason=row.pop("skipped"))
    save(rows)
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
        write_bytes_atomic(args.out, (json.dumps(row) + "\n").encode())
        return row
    return run_all(args)


if __name__ == "__main__":
    main()
