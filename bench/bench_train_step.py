"""Single-GPU training-step benchmark: random-init ~1.4B Llama on 64k-token packs (issue 8).

    python bench/bench_train_step.py --out bench/train_step.json          # GPU, bf16
    python bench/bench_train_step.py --smoke                              # CPU, tiny, seconds
    python bench/bench_train_step.py --recompute selective --attn_backend flex --compile
    python bench/bench_train_step.py --sweep --out bench/train_sweep.jsonl  # DEFAULT_SWEEP, one process each

One step = forward + backward (recompute policy --recompute: longalign.recompute) + AdamW step on
one packed batch (DESIGN.md §3, built by longalign.collators.PackCollator), bf16 weights, no
offload. Reported as one JSON line (also written to --out): tokens/s, step seconds (median over
--steps after --warmup), peak memory, and MFU = model FLOPs / (step seconds x measured peak), model FLOPs = 6 N T + 6 n_layers d sum L^2
(longalign.trainer.training_flops: attention included, recomputation not counted), the peak being
the best of a bf16 (fp32 with --smoke) square-matmul timing on this device.

Sequence lengths are synthetic, "LongAlign-like": a seeded mixture of short chat turns
(log-uniform in [SHORT_MIN, SHORT_MAX]) and long documents (uniform in [LONG_MIN, pack length]),
LONG_FRACTION of them long, packed greedily into packs of at most --pack_tokens tokens. They are
not the real LongAlign-10k lengths.

--sweep runs configurations (DEFAULT_SWEEP, or the quoted argument strings given) one after the
other, each in a fresh subprocess (no allocator fragmentation carried over, an OOM fails only its
own line; inductor's on-disk cache is shared, so a later compiled run compiles faster), with the
other flags of this command line in common and --warmup 2 --steps 3 unless given. It prints each
result as one JSON line, then a summary table; configurations that would start after
--sweep_budget_s are skipped and listed as such.

--compile compiles each layer's forward with dynamic shapes (pack lengths vary). The attention call
is a graph break (the kernel runs eagerly; flex is compiled on its own), so a layer is two graphs.
The JSON reports dynamo's counters and `recompiled_during_timing`: true means a timed step paid
for compilation (the table marks it).
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from transformers import LlamaConfig

from longalign.collators import PackCollator
from longalign.attention import ENV_VAR as ATTN_ENV, choose_backend
from longalign.constants import IGNORE_INDEX
from longalign.modeling.packed_attention import ATTN_IMPLEMENTATION, register_packed_attention
from longalign.modeling.weighted_lm import LongAlignLlamaForCausalLM
from longalign.recompute import apply_recompute
from longalign.trainer import matmul_parameters, training_flops

REPO = Path(__file__).resolve().parents[1]

SHORT_MIN, SHORT_MAX, LONG_MIN, LONG_FRACTION = 64, 4096, 8192, 0.5
PROMPT_FRACTION = 0.9  # long-context SFT: most tokens are the (unlabelled) document
# Most promising first. Memory (1.4B, 64k, bf16): ~11 GiB weights + grads + AdamW states; per
# layer ~0.25 GiB checkpointed (full), ~1.5 GiB selective (q, k, v, out kept), ~6 GiB none.
DEFAULT_SWEEP = (
    "--recompute full --attn_backend torch_varlen",  # today's baseline (3.49 s, MFU 0.295)
    "--recompute selective --attn_backend torch_varlen",
    "--recompute selective --attn_backend flex",
    "--recompute selective:12 --attn_backend flex",  # 12 selective + 12 not checkpointed
    "--recompute partial:10 --attn_backend flex",
    "--recompute selective --attn_backend flex --compile",
    "--recompute selective:12 --attn_backend flex --compile",
)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--layers", type=int, default=24)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--intermediate", type=int, default=5632)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--pack_tokens", type=int, default=65536)
    p.add_argument("--steps", type=int, default=5, help="timed steps")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    p.add_argument("--matmul_size", type=int, default=8192)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="also write the JSON line here")
    p.add_argument("--smoke", action="store_true", help="tiny CPU run (tests)")
    p.add_argument("--recompute", default="full",
                   help="full | selective | none | partial:K | selective:K (longalign.recompute)")
    p.add_argument("--compile", action="store_true", help="torch.compile each decoder layer (dynamic)")
    p.add_argument("--compile_backend", default="inductor")
    p.add_argument("--attn_backend", default=None, help="sets LONGALIGN_ATTN_BACKEND")
    p.add_argument("--profile", action="store_true",
                   help="after the timed steps, profile one more step: kernel time by category")
    p.add_argument("--sweep", nargs="*", default=None, metavar="CONFIG",
                   help="run each quoted flag string, e.g. \"--recompute full\" (a lone flag needs a "
                        "trailing space), in its own subprocess; none given: DEFAULT_SWEEP")
    p.add_argument("--sweep_budget_s", type=float, default=450.0,
                   help="start no configuration after this many seconds of the sweep")
    args = p.parse_args(argv)
    if args.smoke:
        args.hidden, args.layers, args.heads, args.intermediate, args.vocab = 64, 2, 4, 128, 256
        args.pack_tokens, args.steps, args.warmup, args.matmul_size = 512, 2, 1, 256
    return args


def synthetic_packs(n_packs: int, pack_tokens: int, vocab: int, seed: int) -> list[dict]:
    """Greedy packs of mixed short/long sequences (module docstring), rows as in DESIGN.md §2."""
    g = torch.Generator().manual_seed(seed)
    short_max = min(SHORT_MAX, pack_tokens)
    long_min = min(LONG_MIN, pack_tokens // 2)
    packs = []
    for _ in range(n_packs):
        ids, labels, cu = [], [], [0]
        while True:
            if torch.rand(1, generator=g).item() < LONG_FRACTION:
                length = int(torch.randint(long_min, pack_tokens + 1, (1,), generator=g))
            else:
                log_len = torch.empty(1).uniform_(torch.log(torch.tensor(float(SHORT_MIN))).item(),
                                                  torch.log(torch.tensor(float(short_max))).item(), generator=g)
                length = max(2, int(log_len.exp()))
            if cu[-1] + length > pack_tokens:
                break
            seq = torch.randint(0, vocab, (length,), generator=g)
            prompt = int(length * PROMPT_FRACTION)
            ids += seq.tolist()
            labels += [IGNORE_INDEX] * prompt + seq[prompt:].tolist()
            cu.append(cu[-1] + length)
        if len(cu) == 1:  # nothing fitted: one sequence of the whole pack
            seq = torch.randint(0, vocab, (pack_tokens,), generator=g).tolist()
            ids, labels, cu = seq, seq, [0, pack_tokens]
        packs.append({"input_ids": ids, "labels": labels, "cu_seqlens": cu})
    return packs


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


def build_model(args, device, dtype):
    register_packed_attention()
    config = LlamaConfig(attn_implementation=ATTN_IMPLEMENTATION, hidden_size=args.hidden, num_hidden_layers=args.layers, num_attention_heads=args.heads,
                         num_key_value_heads=args.heads, intermediate_size=args.intermediate,
                         vocab_size=args.vocab, max_position_embeddings=args.pack_tokens)
    torch.manual_seed(args.seed)
    with torch.device(device):  # random init on the GPU: seconds, not a minute of CPU init
        model = LongAlignLlamaForCausalLM(config).to(dtype=dtype)
    apply_recompute(model, args.recompute, compile=args.compile, compile_backend=args.compile_backend)
    model.train()
    return model


def compile_counters() -> dict:
    """Dynamo's running totals: frames compiled, distinct graphs, graph breaks."""
    from torch._dynamo.utils import counters

    return {"frames_compiled": int(counters["frames"]["ok"]),
            "unique_graphs": int(counters["stats"]["unique_graphs"]),
            "graph_breaks": int(sum(counters["graph_break"].values()))}


def run(args) -> dict:
    device = torch.device("cpu" if args.smoke or not torch.cuda.is_available() else "cuda")
    dtype = torch.float32 if args.smoke else torch.bfloat16
    if args.attn_backend:
        os.environ[ATTN_ENV] = args.attn_backend  # read by varlen_attention at every call
    peak = measured_peak_flops(args.matmul_size, dtype, device)
    model = build_model(args, device, dtype)
    # fused: one kernel per parameter group instead of foreach's several (HF's adamw_torch_fused)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, betas=(0.9, 0.95), weight_decay=0.0,
                                  fused=device.type == "cuda")
    collate = PackCollator("sequence")
    n_packs = args.warmup + args.steps + int(args.profile)
    batches = [collate([row]) for row in synthetic_packs(n_packs, args.pack_tokens, args.vocab, args.seed)]

    def train_step(batch):
        loss = model(**batch, loss_reduction="mean").loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times, losses = [], []
    compiled_after_warmup = compile_counters()
    profiled = None
    for i, batch in enumerate(batches):
        batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v
                 for k, v in batch.items() if k != "batch_counts"}
        if i == args.warmup + args.steps:  # the extra --profile pack, after the timed ones
            from step_profile import profile_step

            profiled = profile_step(lambda: train_step(batch), device)
            break
        synchronize(device)
        start = time.perf_counter()
        loss = train_step(batch)
        synchronize(device)
        if i >= args.warmup:
            times.append(time.perf_counter() - start)
            losses.append(loss.item())
        if i + 1 == args.warmup:
            compiled_after_warmup = compile_counters()
    timed = batches[args.warmup:args.warmup + args.steps]
    tokens = statistics.mean(int(b["input_ids"].numel()) for b in timed)
    sum_sq = statistics.mean(int(b["batch_counts"][4]) for b in timed)
    seconds = statistics.median(times)
    layers, width = args.layers, args.hidden
    flops = training_flops(matmul_parameters(model), layers, width, tokens, sum_sq)
    return {"benchmark": "train_step", "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "dtype": str(dtype).replace("torch.", ""), "params": sum(p.numel() for p in model.parameters()),
            "pack_tokens": args.pack_tokens, "tokens_per_step": tokens, "step_seconds": seconds,
            "tokens_per_s": tokens / seconds, "model_tflops_per_step": flops / 1e12,
            "measured_peak_tflops": peak / 1e12, "mfu": flops / seconds / peak,
            "peak_memory_gib": torch.cuda.max_memory_allocated(device) / 2 ** 30 if device.type == "cuda" else None,
            "loss_finite": all(map(lambda v: v == v and abs(v) != float("inf"), losses)),
            "peak_reserved_gib": torch.cuda.max_memory_reserved(device) / 2 ** 30 if device.type == "cuda" else None,
            "steps": args.steps, "warmup": args.warmup, "recompute": args.recompute,
            "gradient_checkpointing": args.recompute != "none", "attn_backend": choose_backend(device, dtype),
            "compile": args.compile, **compile_report(compiled_after_warmup),
            "alloc_conf": os.environ.get("PYTORCH_CUDA_ALLOC_CONF"), "torch": torch.__version__, "smoke": args.smoke,
            "optimizer": "AdamW(fused)" if device.type == "cuda" else "AdamW(foreach)", "profile": profiled}


def compile_report(after_warmup: dict) -> dict:
    """Compile totals, and whether anything (re)compiled during the timed steps (then the step
    time includes compilation: raise --warmup or look at the recompile reasons). Reported without
    --compile too: flex compiles its kernel, and recompiles once for dynamic shapes on the 2nd pack."""
    now = compile_counters()
    return {"compile_counters": now,
            "recompiled_during_timing": now["frames_compiled"] > after_warmup["frames_compiled"]}


SWEEP_STEPS = ["--warmup", "2", "--steps", "3"]  # per configuration, overridable by the command line
CONFIG_TIMEOUT_S, SWEEP_GRACE_S = 300, 120


def _common_argv(argv: list[str]) -> list[str]:
    """The command line minus --sweep (and its configuration strings), --out, --sweep_budget_s."""
    out, i = [], 0
    while i < len(argv):
        tok = argv[i]
        if tok == "--sweep":
            i += 1
            while i < len(argv) and (" " in argv[i] or not argv[i].startswith("-")):
                i += 1
            continue
        if tok in ("--out", "--sweep_budget_s"):
            i += 2
            continue
        if not tok.startswith(("--out=", "--sweep_budget_s=", "--sweep=")):
            out.append(tok)
        i += 1
    return out


def run_config(config: str, common: list[str], timeout_s: float, tmp: Path) -> dict:
    """One configuration in a fresh Python process; its JSON result, or the error."""
    out = tmp / "result.json"
    out.unlink(missing_ok=True)
    cmd = [sys.executable, str(Path(__file__).resolve()), *SWEEP_STEPS, *common, *shlex.split(config),
           "--out", str(out)]
    env = dict(os.environ)
    env.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")  # less fragmentation
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout_s)
        error = None if proc.returncode == 0 and out.exists() else (proc.stderr or proc.stdout)[-1500:]
    except subprocess.TimeoutExpired:
        error = f"timed out after {timeout_s:.0f} s"
    result = json.loads(out.read_text()) if error is None else {"error": error}
    return {"config": config, "wall_s": round(time.perf_counter() - start, 1), **result}


def summary_table(results: list[dict]) -> str:
    rows = [f"{'config':<58} {'step_s':>7} {'tok/s':>8} {'mfu':>6} {'peakGiB':>8} {'wall_s':>7}"]
    for r in results:
        if "error" in r or "skipped" in r:
            status = r.get("skipped") or "FAILED: " + r["error"].strip().splitlines()[-1][:60]
            rows.append(f"{r['config']:<58} {status}")
            continue
        mem = r["peak_memory_gib"]
        flag = " (recompiled while timed)" if r.get("recompiled_during_timing") else ""
        rows.append(f"{r['config']:<58} {r['step_seconds']:7.3f} {r['tokens_per_s']:8.0f} {r['mfu']:6.3f} "
                    f"{mem if mem is None else round(mem, 1)!s:>8} {r['wall_s']:7.1f}{flag}")
    return "\n".join(rows)


def sweep(args, argv: list[str]) -> list[dict]:
    """Run each configuration in turn (module docstring); print JSON lines and the table."""
    import tempfile

    configs = args.sweep or list(DEFAULT_SWEEP)
    common, results, start = _common_argv(argv), [], time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for config in configs:
            elapsed = time.perf_counter() - start
            if elapsed > args.sweep_budget_s:
                result = {"config": config, "skipped": f"skipped: sweep budget {args.sweep_budget_s:.0f} s spent"}
            else:
                timeout = min(CONFIG_TIMEOUT_S, args.sweep_budget_s + SWEEP_GRACE_S - elapsed)
                result = run_config(config, common, timeout, Path(tmp))
            results.append(result)
            print(json.dumps(result), flush=True)
    print(summary_table(results), flush=True)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text("".join(json.dumps(r) + "\n" for r in results))
    return results


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    if args.sweep is not None:
        return sweep(args, argv)
    result = run(args)
    line = json.dumps(result)
    print(line, flush=True)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(line + "\n")
    return result


if __name__ == "__main__":
    main()
