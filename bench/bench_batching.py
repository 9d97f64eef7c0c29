"""Naive vs sorted vs packed batching through train.py on the same sequences.

    python bench/bench_batching.py --num_gpus 2 --out $OUT/batching.json     # 2-4 GPUs, ZeRO-3, bf16
    python bench/bench_batching.py --smoke --num_gpus 1                      # CPU, tiny, no DeepSpeed

1. builds (seeded) a pre_tokenize-style dataset (DESIGN.md §1) of --num_long long sequences
   (default 8k-64k tokens) and --num_short ShareGPT-like ones (100-4k), random token ids, targets
   on the last 10% (long) / 50% (short) as in bench/bench_sort_and_group.py, shuffled;
2. runs the real `sort_and_group.py --group_size <num_gpus>` on it (sort/ and pack/, bfd);
3. saves a random-init Llama (--hidden, --layers, ...) with save_pretrained;
4. trains one epoch of each of naive, sort and pack --pack_loss on it: every method sees exactly
   these sequences (counts are multiples of the GPU count, so nothing is repeated). Each run is
   `train.build_trainer(argv)` + `Trainer.train()` (train.py's own code path; the final save is
   skipped) in a worker process launched by `deepspeed --num_gpus N` (or torchrun), with
   --deepspeed <derived ZeRO-3 config> --bf16 --gradient_checkpointing;
5. writes one JSON: per method the epoch seconds (first micro-step start to last optimizer step
   end, rank 0, CUDA-synchronised), seconds per sequence, tokens/s, per-step seconds and the
   trainer's own logs; speedups naive/pack and naive/sort; and the step-cost table (each
   micro-step's per-rank compute features and measured seconds) that bench/simulate_schedule.py fits.

Optimizer: the ds_config's "optimizer" section is dropped, so the HF Trainer builds torch AdamW
(fused on CUDA) and DeepSpeed JIT-builds no op (its FusedAdam / CPUAdam are not prebuilt in the
wheel). With an offload config, "zero_force_ds_cpu_optimizer": false lets torch AdamW run on the
offloaded fp32 master weights (slow, but no build).
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from bench_sort_and_group import (LONG_RANGE, LONG_TARGET_FRACTION, SHORT_RANGE,
                                        SHORT_TARGET_FRACTION)
from longalign.constants import DEFAULT_MAX_LENGTH, IGNORE_INDEX

REPO = Path(__file__).resolve().parents[1]

METHODS = {"naive": ["--batch_method", "naive"], "sort": ["--batch_method", "sort"],
           "pack": ["--batch_method", "pack", "--pack_loss"]}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--num_gpus", type=int, default=2)
    p.add_argument("--num_long", type=int, default=24)
    p.add_argument("--num_short", type=int, default=144, help="6 short per long, as bench_sort_and_group's mix")
    p.add_argument("--long_range", type=int, nargs=2, default=list(LONG_RANGE))
    p.add_argument("--short_range", type=int, nargs=2, default=list(SHORT_RANGE))
    p.add_argument("--max_length", type=int, default=DEFAULT_MAX_LENGTH, help="pack size")
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--layers", type=int, default=16)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--kv_heads", type=int, default=16)
    p.add_argument("--intermediate", type=int, default=5632)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--ds_config", default="ds_config/stage3_no_offload.json", help="'none': plain DDP")
    p.add_argument("--launcher", choices=("deepspeed", "torchrun"), default=None,
                   help="default: deepspeed with a ds_config, torchrun without")
    p.add_argument("--grad_accum_padded", type=int, default=12, help="naive/sort (scripts/*_sort.sh)")
    p.add_argument("--grad_accum_pack", type=int, default=1, help="pack (scripts/*_pack.sh)")
    p.add_argument("--methods", nargs="+", choices=list(METHODS), default=["naive", "pack", "sort"],
                   help="run order; the JSON is rewritten after each, so a cut-off run keeps naive and pack")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workdir", default=None, help="default: /tmp/bench_batching")
    p.add_argument("--out", default=None, help="write the JSON here (rewritten after each method)")
    p.add_argument("--smoke", action="store_true", help="tiny model and data on CPU, no DeepSpeed")
    args = p.parse_args(argv)
    if args.smoke:
        args.num_long, args.num_short, args.long_range, args.short_range = 2, 6, [192, 512], [16, 96]
        args.max_length, args.hidden, args.layers, args.heads, args.kv_heads = 512, 32, 2, 4, 2
        args.intermediate, args.vocab, args.ds_config, args.launcher = 64, 256, "none", "torchrun"
        args.grad_accum_padded = 2
    if args.launcher is None:
        args.launcher = "torchrun" if args.ds_config == "none" else "deepspeed"
    if (args.num_long + args.num_short) % args.num_gpus:
        p.error("--num_long + --num_short must be a multiple of --num_gpus (same sequences in every method)")
    return args


# ---------- data, model, config ----------
def synthetic_mix(num_long: int, num_short: int, long_range, short_range, seed: int):
    """Shuffled lengths (uniform in each range) and target fractions of the long + short mix."""
    rng = np.random.default_rng(seed)
    lengths = np.concatenate([rng.integers(long_range[0], long_range[1] + 1, num_long),
                              rng.integers(short_range[0], short_range[1] + 1, num_short)])
    fractions = np.concatenate([np.full(num_long, LONG_TARGET_FRACTION), np.full(num_short, SHORT_TARGET_FRACTION)])
    order = rng.permutation(len(lengths))
    return lengths[order], fractions[order]


def write_token_dataset(path: Path, lengths, fractions, vocab: int, seed: int) -> None:
    """DESIGN.md §1 dataset: random ids in [0, vocab), labels = ids on each sequence's tail."""
    import datasets
    import pyarrow as pa

    rng = np.random.default_rng(seed + 1)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    ids = rng.integers(0, vocab, int(offsets[-1]), dtype=np.int32)
    labels = ids.copy()
    prompt_ends = offsets[1:] - np.maximum(1, np.ceil(lengths * fractions).astype(np.int64))
    for start, end in zip(offsets[:-1].tolist(), prompt_ends.tolist()):
        labels[start:end] = IGNORE_INDEX
    offsets32 = pa.array(offsets.astype(np.int32))
    table = pa.table({"input_ids": pa.ListArray.from_arrays(offsets32, pa.array(ids)),
                      "labels": pa.ListArray.from_arrays(offsets32, pa.array(labels))})
    datasets.Dataset(table, fingerprint=f"bench_batching_{seed}").save_to_disk(str(path))
    stats = {"sequences": int(len(lengths)), "tokens": int(offsets[-1]), "synthetic": True}
    (path / "stats.json").write_text(json.dumps(stats))


def run_sort_and_group(train_file: Path, group_size: int, max_length: int, seed: int) -> None:
    command = [sys.executable, str(REPO / "sort_and_group.py"), "--train_file", str(train_file),
               "--group_size", str(group_size), "--max_length", str(max_length), "--seed", str(seed)]
    subprocess.run(command, cwd=REPO, check=True, stdout=subprocess.DEVNULL)


def save_random_llama(path: Path, args) -> int:
    """Random-init Llama (bf16 on disk unless --smoke) saved with save_pretrained; returns #params."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=args.hidden, num_hidden_layers=args.layers, num_attention_heads=args.heads,
                         num_key_value_heads=args.kv_heads, intermediate_size=args.intermediate,
                         vocab_size=args.vocab, max_position_embeddings=args.max_length, pad_token_id=0,
                         bos_token_id=1, eos_token_id=2)
    torch.manual_seed(args.seed)
    model = LlamaForCausalLM(config)
    if not args.smoke:
        model = model.to(torch.bfloat16)
    model.save_pretrained(str(path))
    return sum(p.numel() for p in model.parameters())


def zero_config(base: dict) -> dict:
    """The ds_config without its "optimizer" (torch AdamW from the Trainer: no JIT-built op)."""
    config = {k: v for k, v in base.items() if k != "optimizer"}
    offload = config.get("zero_optimization", {}).get("offload_optimizer", {}).get("device", "none")
    if offload not in (None, "none"):
        config["zero_force_ds_cpu_optimizer"] = False  # torch AdamW on CPU instead of DeepSpeedCPUAdam
    return config


# ---------- launching train.py's trainer ----------
def train_argv(args, method: str, train_file: Path, model_dir: Path, out_dir: Path, ds_path) -> list[str]:
    grad_accum = args.grad_accum_pack if method == "pack" else args.grad_accum_padded
    argv = ["--model_name_or_path", str(model_dir), "--train_file", str(train_file), "--output_dir", str(out_dir),
            *METHODS[method], "--num_train_epochs", "1", "--per_device_train_batch_size", "1",
            "--gradient_accumulation_steps", str(grad_accum), "--learning_rate", "1e-5",
            "--lr_scheduler_type", "constant", "--gradient_checkpointing", "--logging_steps", "1",
            "--save_strategy", "no", "--report_to", "none", "--disable_tqdm", "true", "--seed", str(args.seed)]
    if ds_path is not None:
        argv += ["--deepspeed", str(ds_path)]
    if not args.smoke:
        argv += ["--bf16"]  # ZeRO-3: bf16 weights (train.load_model); DDP: fp32 masters + bf16 autocast
    if args.smoke:
        argv += ["--use_cpu", "--dataloader_num_workers", "0"]
        if args.num_gpus > 1:
            argv += ["--ddp_backend", "gloo"]
    return argv


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_command(args, spec_path: Path) -> list[str]:
    script = [str(Path(__file__).resolve()), "worker", str(spec_path)]
    if args.num_gpus == 1 and args.launcher == "torchrun":
        return [sys.executable] + script  # one process: no launcher needed
    if args.launcher == "deepspeed":
        return [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(args.num_gpus),
                "--master_port", str(free_port()), "--no_local_rank"] + script
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(args.num_gpus),
            "--master_port", str(free_port())] + script


def run_method(args, method: str, paths: dict) -> Path:
    """Train one epoch of `method` in launched workers; returns the run directory."""
    run_dir = paths["work"] / f"run_{method}"
    if run_dir.is_dir():  # this bench's own folder from an earlier run (train.py refuses a used output)
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True)
    spec = {"argv": train_argv(args, method, paths["data"], paths["model"], run_dir / "out", paths["ds"]),
            "run_dir": str(run_dir)}
    spec_path = run_dir / "spec.json"
    spec_path.write_text(json.dumps(spec))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    if args.smoke:
        env["OMP_NUM_THREADS"] = "1"
    # Never use NVLink multicast (the GPU machines' rule), whatever environment the launcher builds.
    env.update(NCCL_NVLS_ENABLE="0", TORCH_SYMM_MEM_DISABLE_MULTICAST="1", NVSHMEM_DISABLE_NVLS="1")
    log = run_dir / "log.txt"
    with open(log, "w") as handle:
        status = subprocess.run(launch_command(args, spec_path), cwd=REPO, env=env, stdout=handle,
                                stderr=subprocess.STDOUT).returncode
    if status != 0:
        raise RuntimeError(f"{method} run failed (status {status}); last lines of {log}:\n"
                           + "".join(log.read_text().splitlines(keepends=True)[-40:]))
    return run_dir


# ---------- worker side: timing inside the trainer ----------
def batch_cost_features(inputs: dict) -> dict:
    """What one rank computes on in a micro-batch: (cost_tokens, cost_sum_sq) plus real counts.

    Packed (cu_seq_lens_q): sum l and sum l^2 over its sequences (block-diagonal attention). Padded
    (B, L): B L and B L^2, since the padded rows are computed too.
    """
    from longalign.train.collators import COUNT_FIELDS, COUNTS_KEY

    counts = dict(zip(COUNT_FIELDS, (int(v) for v in inputs[COUNTS_KEY].tolist())))
    if "cu_seq_lens_q" in inputs:
        rows = int(inputs["cu_seq_lens_q"].numel()) - 1
        cost_tokens, cost_sum_sq = counts["tokens"], counts["sum_sq_lengths"]
    else:
        rows, length = (int(n) for n in inputs["input_ids"].shape)
        cost_tokens, cost_sum_sq = rows * length, rows * length * length
    return {"cost_tokens": cost_tokens, "cost_sum_sq": cost_sum_sq, "tokens": counts["tokens"],
            "sequences": rows}


def instrument(trainer) -> dict:
    """Wrap training_step (synchronised timing per micro-step) and time every optimizer step end."""
    import torch
    from transformers import TrainerCallback

    def sync():
        if torch.cuda.is_available() and trainer.args.device.type == "cuda":
            torch.cuda.synchronize(trainer.args.device)

    record = {"micro_steps": [], "step_ends": []}
    original = trainer.training_step
    from step_profile import MicroStepProfiler

    profiler = MicroStepProfiler.from_env(trainer.args.process_index)

    def timed_training_step(model, inputs, num_items_in_batch=None):
        features = batch_cost_features(inputs)
        optimizer_step = bool(trainer.accelerator.sync_gradients)
        profiler.before(len(record["micro_steps"]))
        sync()
        start = time.perf_counter()
        loss = original(model, inputs, num_items_in_batch)
        sync()
        profiler.after(len(record["micro_steps"]))
        record["micro_steps"].append({**features, "start": start, "seconds": time.perf_counter() - start,
                                      "optimizer_step": optimizer_step})
        return loss

    class StepEnd(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            sync()
            record["step_ends"].append(time.perf_counter())

    trainer.training_step = timed_training_step
    trainer.add_callback(StepEnd())
    return record


def worker_main(spec_path: str) -> None:
    import train

    from longalign.train.trainer import close_process_group

    spec = json.loads(Path(spec_path).read_text())
    trainer = train.build_trainer(spec["argv"])
    record = instrument(trainer)
    trainer.train()
    rank = trainer.args.process_index
    record["world_size"] = trainer.args.world_size
    if rank == 0:
        record["log_history"] = trainer.state.log_history
    Path(spec["run_dir"], f"record_rank{rank}.json").write_text(json.dumps(record))
    close_process_group()


# ---------- parent side: merging and summarising ----------
def merge_records(records: list[dict], method: str) -> tuple[dict, list[dict]]:
    """(summary of one method, its step-cost rows) from every rank's record (rank order)."""
    if len({len(r["micro_steps"]) for r in records}) != 1:
        raise ValueError(f"{method}: ranks ran different numbers of micro-steps")
    rank0 = records[0]
    start, ends = rank0["micro_steps"][0]["start"], rank0["step_ends"]
    step_seconds = np.diff([start] + ends).tolist()
    rows = []
    for index, per_rank in enumerate(zip(*(r["micro_steps"] for r in records))):
        rows.append({"method": method, "micro_step": index, "seconds": max(m["seconds"] for m in per_rank),
                     "optimizer_step": per_rank[0]["optimizer_step"],
                     "ranks": [{k: m[k] for k in ("cost_tokens", "cost_sum_sq", "tokens", "sequences")}
                               for m in per_rank]})
    sequences = sum(r["sequences"] for row in rows for r in row["ranks"])
    tokens = sum(r["tokens"] for row in rows for r in row["ranks"])
    epoch = ends[-1] - start
    final = [e for e in rank0.get("log_history", []) if "train_runtime" in e]
    # after the first optimizer step: no one-off start-up costs (allocator, NCCL, kernels)
    first_step_micro = next(i for i, row in enumerate(rows) if row["optimizer_step"]) + 1
    steady_sequences = sum(r["sequences"] for row in rows[first_step_micro:] for r in row["ranks"])
    summary = {"epoch_seconds": epoch, "sequences_trained": sequences, "tokens_trained": tokens,
               "seconds_per_sequence": epoch / sequences, "tokens_per_s": tokens / epoch,
               "optimizer_steps": len(ends), "micro_steps": len(rows), "step_seconds": step_seconds,
               "steady_seconds_per_sequence": (ends[-1] - ends[0]) / steady_sequences if steady_sequences else None,
               "train_runtime": final[0]["train_runtime"] if final else None,
               "trainer_logs": [e for e in rank0.get("log_history", []) if "loss" in e]}
    return summary, rows


def load_run(run_dir: Path, method: str) -> tuple[dict, list[dict]]:
    files = sorted(run_dir.glob("record_rank*.json"), key=lambda p: int(p.stem.removeprefix("record_rank")))
    records = [json.loads(p.read_text()) for p in files]
    if not records or len(records) != records[0]["world_size"]:
        raise FileNotFoundError(f"{run_dir}: expected one record per rank, found {len(records)}")
    return merge_records(records, method)


def speedups(methods: dict) -> dict:
    """naive seconds/sequence over each other method's (> 1: faster than naive)."""
    if "naive" not in methods:
        return {}
    base = methods["naive"]["seconds_per_sequence"]
    return {f"speedup_{m}_vs_naive": base / s["seconds_per_sequence"] for m, s in methods.items() if m != "naive"}


def check_deepspeed() -> None:
    """Fail in seconds, not after the data and model are built, when DeepSpeed cannot import."""
    proc = subprocess.run([sys.executable, "-c", "import deepspeed"], capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit("--ds_config needs deepspeed, which does not import here (carry its wheels, or "
                         "pass --ds_config none for plain DDP):\n" + proc.stderr[-2000:])


def prepare(args) -> tuple[dict, dict]:
    """Dataset, sort/pack, model and ZeRO config in the work directory; returns (paths, facts)."""
    work = Path(args.workdir or "/tmp/bench_batching")
    work.mkdir(parents=True, exist_ok=True)
    paths = {"work": work, "data": work / "data", "model": work / "model", "ds": None}
    lengths, fractions = synthetic_mix(args.num_long, args.num_short, args.long_range, args.short_range, args.seed)
    lengths = np.minimum(lengths, args.max_length)
    write_token_dataset(paths["data"], lengths, fractions, args.vocab, args.seed)
    run_sort_and_group(paths["data"], args.num_gpus, args.max_length, args.seed)
    params = save_random_llama(paths["model"], args)
    if args.ds_config != "none":
        paths["ds"] = work / "ds_config.json"
        paths["ds"].write_text(json.dumps(zero_config(json.loads((REPO / args.ds_config).read_text())), indent=2))
    pack_stats = json.loads((paths["data"] / "pack" / "stats.json").read_text())
    facts = {"sequences": int(len(lengths)), "tokens": int(lengths.sum()), "lengths": lengths.tolist(),
             "params": params, "packs": pack_stats["packs"], "packing_efficiency": pack_stats["packing_efficiency"]}
    return paths, facts


def main(argv=None) -> dict:
    args = parse_args(argv)
    started = time.perf_counter()
    if args.ds_config != "none" or args.launcher == "deepspeed":
        check_deepspeed()
    paths, facts = prepare(args)
    result = {"benchmark": "batching", "config": {k: v for k, v in vars(args).items() if k not in ("out",)},
              "data": facts, "prepare_seconds": time.perf_counter() - started, "methods": {}, "step_costs": []}
    for method in args.methods:
        summary, rows = load_run(run_method(args, method, paths), method)
        if summary["sequences_trained"] != facts["sequences"]:
            summary["warning"] = f"trained {summary['sequences_trained']} sequences, dataset has {facts['sequences']}"
        result["methods"][method] = summary
        result["step_costs"] += rows
        result.update(speedups(result["methods"]))
        print(f"{method}: {summary['epoch_seconds']:.1f} s, {summary['seconds_per_sequence']:.4f} s/sequence, "
              f"{summary['tokens_per_s']:.0f} tokens/s", file=sys.stderr, flush=True)
        if args.out:
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps(result))
    result["total_seconds"] = time.perf_counter() - started
    if args.out:
        Path(args.out).write_text(json.dumps(result))
    print(json.dumps({k: v for k, v in result.items() if k.startswith("speedup")}
                     | {m: round(s["seconds_per_sequence"], 5) for m, s in result["methods"].items()}))
    return result


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "worker":
        worker_main(sys.argv[2])
    else:
        main()
