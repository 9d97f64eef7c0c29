"""Benchmark the start-up checks of train.py on a synthetic pack dataset (CPU).

    .venv/bin/python bench/bench_validation.py --rows 10000 --pack_tokens 8192

Builds random sequences (lengths uniform in [--min_len, --max_len], half prompt, half reply),
packs them with sort_and_group's own code (best-fit decreasing, 1/N_k weights, cu_seqlens),
keeps the first --rows packs, saves them with save_to_disk in a temporary folder and reloads them
memory-mapped, as train.py does. Then times, --repeats times (median reported):
- `longalign.data.validation.validate_training_dataset` (every row: geometry, ids, weights);
- `longalign.storage.data_files_digest` (the data fingerprint saved with each checkpoint).
Prints one JSON line (and writes it to --out when given).
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

from longalign.constants import IGNORE_INDEX
from longalign.data.packing import build_pack_table, plan_packs
from longalign.storage import data_files_digest
from longalign.data.token_sequences import prepare_sequences
from longalign.data.validation import validate_training_dataset

VOCAB = 32000


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=10_000, help="pack rows in the dataset")
    parser.add_argument("--pack_tokens", type=int, default=8192, help="max tokens per pack")
    parser.add_argument("--min_len", type=int, default=256)
    parser.add_argument("--max_len", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="also write the JSON result here")
    return parser.parse_args(argv)


def random_sequences(count: int, min_len: int, max_len: int, seed: int) -> pa.Table:
    """input_ids/labels rows; the second half of each row is its target reply."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(min_len, max_len + 1, count)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    ids = rng.integers(0, VOCAB, int(offsets[-1]), dtype=np.int32)
    position = np.arange(len(ids)) - np.repeat(offsets[:-1], lengths)
    labels = np.where(position < np.repeat(lengths // 2, lengths), IGNORE_INDEX, ids).astype(np.int32)
    offsets = pa.array(offsets)
    return pa.table({"input_ids": pa.LargeListArray.from_arrays(offsets, pa.array(ids)),
                     "labels": pa.LargeListArray.from_arrays(offsets, pa.array(labels))})


def build_packs(args) -> pa.Table:
    mean_len = (args.min_len + args.max_len) / 2
    count = int(args.rows * args.pack_tokens / mean_len * 1.05) + 1  # a few more than needed
    sequences, _ = prepare_sequences(random_sequences(count, args.min_len, args.max_len, args.seed),
                                     args.pack_tokens, "truncate")
    packs, _ = plan_packs(sequences.lengths, args.pack_tokens, "bfd", 1, args.seed)
    if len(packs) < args.rows:
        raise SystemExit(f"only {len(packs)} packs; raise the sequence count")
    return build_pack_table(sequences, packs[:args.rows])


def timed(function, repeats: int) -> tuple[float, object]:
    seconds, result = [], None
    for _ in range(repeats):
        started = time.perf_counter()
        result = function()
        seconds.append(time.perf_counter() - started)
    return statistics.median(seconds), result


def main(argv=None) -> dict:
    import datasets

    args = parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        datasets.Dataset(build_packs(args)).save_to_disk(tmp)
        dataset = datasets.load_from_disk(tmp)
        validate_s, checked = timed(lambda: validate_training_dataset(dataset, VOCAB, True, "bench"), args.repeats)
        digest_s, _ = timed(lambda: data_files_digest(tmp), args.repeats)
        arrow_bytes = sum(p.stat().st_size for p in Path(tmp).glob("*.arrow"))
    result = {"rows": checked["rows"], "tokens": checked["tokens"], "pack_tokens": args.pack_tokens,
              "validate_seconds": validate_s, "validate_tokens_per_s": checked["tokens"] / validate_s,
              "digest_seconds": digest_s, "arrow_bytes": arrow_bytes, "repeats": args.repeats,
              "machine": f"{platform.processor() or platform.machine()}, {platform.python_version()}"}
    line = json.dumps(result)
    print(line)
    if args.out:
        Path(args.out).write_text(line + "\n")
    return result


if __name__ == "__main__":
    main()
