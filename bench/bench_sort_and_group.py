"""Benchmark sort_and_group.py on a synthetic LongAlign-like length mix.

    .venv/bin/python bench/bench_sort_and_group.py [--long_distribution uniform|loguniform]

Builds (seeded, untimed) a pre_tokenize-style dataset of 10k long sequences of 8k-64k tokens and
60k short ones of 100-4k, in shuffled order; long ones have targets on their last 10% (an answer
after a long document), short ones on their second half. Then runs the sort_and_group.py CLI
once per pack strategy as a subprocess (both outputs written to disk, interpreter start-up
included) and prints one JSON line with bfd_efficiency, greedy_efficiency and
sort_and_group_seconds (the wall time of the default bfd run).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

from longalign.constants import DEFAULT_MAX_LENGTH, IGNORE_INDEX

REPO = Path(__file__).resolve().parents[1]

# The mix of the issue: LongAlign-10k's long data plus ShareGPT-like short chats.
NUM_LONG, LONG_RANGE = 10_000, (8_192, 65_536)
NUM_SHORT, SHORT_RANGE = 60_000, (100, 4_096)
LONG_TARGET_FRACTION, SHORT_TARGET_FRACTION = 0.1, 0.5
SYNTHETIC_VOCAB = 32_000
BUILD_BATCH_ROWS = 5_000


def synthetic_lengths(seed: int, long_distribution: str) -> tuple[np.ndarray, np.ndarray]:
    """Shuffled sequence lengths and each one's target fraction."""
    rng = np.random.default_rng(seed)
    low, high = LONG_RANGE
    if long_distribution == "uniform":
        long = rng.integers(low, high + 1, NUM_LONG)
    else:  # log-uniform: more short-ish long documents, as in real long-context data
        long = np.exp(rng.uniform(np.log(low), np.log(high), NUM_LONG)).astype(np.int64)
    short = rng.integers(SHORT_RANGE[0], SHORT_RANGE[1] + 1, NUM_SHORT)
    lengths = np.concatenate([long, short])
    fractions = np.concatenate([np.full(NUM_LONG, LONG_TARGET_FRACTION),
                                np.full(NUM_SHORT, SHORT_TARGET_FRACTION)])
    shuffle = rng.permutation(len(lengths))
    return lengths[shuffle], fractions[shuffle]


def synthetic_batch(lengths: np.ndarray, target_fractions: np.ndarray, first_token: int) -> pa.RecordBatch:
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    input_ids = (np.arange(offsets[-1], dtype=np.int64) + first_token) % SYNTHETIC_VOCAB
    input_ids = input_ids.astype(np.int32)
    labels = input_ids.copy()
    prompt_ends = offsets[1:] - np.ceil(lengths * target_fractions).astype(np.int64)
    for start, prompt_end in zip(offsets[:-1].tolist(), prompt_ends.tolist()):
        labels[start:prompt_end] = IGNORE_INDEX  # one slice per sequence, not per token
    return pa.RecordBatch.from_pydict({
        "input_ids": pa.ListArray.from_arrays(pa.array(offsets), pa.array(input_ids)),
        "labels": pa.ListArray.from_arrays(pa.array(offsets), pa.array(labels))})


def write_synthetic_dataset(path: Path, lengths: np.ndarray, target_fractions: np.ndarray) -> None:
    """Save as pre_tokenize.py would (DESIGN.md §1), built in batches to bound memory."""
    import datasets

    batches, first_token = [], 0
    for start in range(0, len(lengths), BUILD_BATCH_ROWS):
        stop = start + BUILD_BATCH_ROWS
        batches.append(synthetic_batch(lengths[start:stop], target_fractions[start:stop], first_token))
        first_token += int(lengths[start:stop].sum())
    # an explicit fingerprint: otherwise datasets hashes every token of the in-memory table
    datasets.Dataset(pa.Table.from_batches(batches), fingerprint="synthetic").save_to_disk(str(path))


def run_cli(train_file: Path, strategy: str, group_size: int, seed: int) -> tuple[float, float, float, dict]:
    """Wall seconds, CPU seconds (user + system), peak RSS (GiB), pack stats of one CLI run."""
    command = [sys.executable, str(REPO / "sort_and_group.py"), "--train_file", str(train_file),
               "--group_size", str(group_size), "--pack_strategy", strategy, "--seed", str(seed),
               "--max_length", str(DEFAULT_MAX_LENGTH)]
    started = time.perf_counter()
    process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL)
    _, status, usage = os.wait4(process.pid, 0)  # rusage of this child alone
    seconds = time.perf_counter() - started
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"{' '.join(command)} failed with status {status}")
    stats = json.loads((train_file / "pack" / "stats.json").read_text())
    return seconds, usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 2**20, stats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--long_distribution", choices=("uniform", "loguniform"), default="uniform")
    parser.add_argument("--group_size", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--record", action="store_true", help="merge the figures into bench/results.json")
    parser.add_argument("--workdir", default=None, help="where to build the data (default: a temp dir)")
    args = parser.parse_args()
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="bench_sort_and_group_"))
    train_file = workdir / "synthetic"
    try:
        lengths, fractions = synthetic_lengths(args.seed, args.long_distribution)
        started = time.perf_counter()
        write_synthetic_dataset(train_file, lengths, fractions)
        print(f"built {len(lengths)} sequences, {int(lengths.sum())} tokens "
              f"in {time.perf_counter() - started:.1f} s (untimed)", file=sys.stderr)
        results = {}
        for strategy in ("greedy", "bfd"):  # bfd last: its outputs stay for inspection
            seconds, cpu_seconds, peak_gib, stats = run_cli(train_file, strategy, args.group_size, args.seed)
            results[strategy] = (seconds, stats, peak_gib, cpu_seconds)
            print(f"{strategy}: {seconds:.1f} s wall, {cpu_seconds:.1f} s CPU, peak RSS {peak_gib:.1f} GiB, "
                  f"load average {os.getloadavg()[0]:.1f}, {json.dumps(stats)}",
                  file=sys.stderr)
        figures = {
            "long_distribution": args.long_distribution, "sequences": int(len(lengths)),
            "tokens": int(lengths.sum()),
            "bfd_efficiency": results["bfd"][1]["packing_efficiency"],
            "greedy_efficiency": results["greedy"][1]["packing_efficiency"],
            "bfd_attention_imbalance_mean": results["bfd"][1]["attention_cost_imbalance_mean"],
            "greedy_attention_imbalance_mean": results["greedy"][1]["attention_cost_imbalance_mean"],
            "bfd_sequences_per_pack": results["bfd"][1]["sequences_per_pack_mean"],
            "sort_and_group_seconds": round(results["bfd"][0], 2),
            "greedy_sort_and_group_seconds": round(results["greedy"][0], 2),
            "sort_and_group_cpu_seconds": round(results["bfd"][3], 2),
            "bfd_peak_rss_gib": round(results["bfd"][2], 2)}
        print(json.dumps(figures))
        if args.record:
            from results import record  # bench/ is on sys.path when run as a script

            numeric = {f"sort_and_group.{args.long_distribution}.{k}": v for k, v in figures.items()
                       if isinstance(v, (int, float))}
            record(numeric, source=" ".join([Path(sys.executable).name] + sys.argv),
                   machine=f"{os.cpu_count()} CPU cores, load average {os.getloadavg()[0]:.1f}")
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
