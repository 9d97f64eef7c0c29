"""Sorted batching and packing datasets for long-context SFT (LongAlign, paper §3.2).

    python sort_and_group.py --group_size 8 --train_file ./data/chatglm/10k

reads the pre_tokenize.py dataset at --train_file and writes, each with a stats.json:
- <train_file>/sort: sequences in training order, runs of group_size rows = length-sorted steps;
- <train_file>/pack: packs of <= --max_length tokens with 1/N_k loss weights and cu_seqlens.
Formats: DESIGN.md §2. Policies (too long, empty, no targets, incomplete last group, fewer
sequences than --group_size): longalign/data/token_sequences.py, longalign/data/sorting.py, longalign/data/packing.py.
Refused, nothing written: an input that is itself a sort/ or pack/ output, or sequences none of
which keeps a target token (e.g. --max_length 1).
Both outputs are written complete first, then swapped in one right after the other; both
stats.json carry the same `pair_id`, so a run killed between the two swaps leaves a pair that
train.py refuses (re-run this script to repair it). Replacing outputs: longalign/storage.py.

The original code's batches, rule for rule: --pack_strategy greedy_original --sort_remainder drop
(README "Differences from the original code").
"""
from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path

from longalign.arguments import non_negative_int
from longalign.constants import DEFAULT_GROUP_SIZE, DEFAULT_MAX_LENGTH, PACK_STRATEGIES
from longalign.fault_points import BETWEEN_SORT_AND_PACK, fault_point
from longalign.data.packing import build_pack_table, pack_stats, plan_packs
from longalign.data.sorting import (SORT_REMAINDER_POLICIES, build_sort_table, check_enough_sequences,
                               check_group_size, plan_sort, sort_stats)
from longalign.storage import atomic_dir, check_output_dir, data_files_digest
from longalign.data.token_sequences import (TOO_LONG_POLICIES, check_has_targets, check_not_grouped_output,
                                       format_stats_table, load_token_table, prepare_sequences,
                                       write_table)

STAGE = "sort_and_group"  # the writer named in the output folders' markers (longalign.storage)
OUTPUTS = ("sort", "pack")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train_file", required=True, help="dataset directory written by pre_tokenize.py")
    parser.add_argument("--group_size", type=int, default=DEFAULT_GROUP_SIZE,
                        help="sequences (sort) / packs (pack) per data-parallel step: the GPU count, or "
                             "GPUs / train.py --sequence_parallel_size (which splits each pack over that many)")
    parser.add_argument("--max_length", type=int, default=DEFAULT_MAX_LENGTH,
                        help="tokens per pack (64k: the paper; 128k-512k with train.py --sequence_parallel_size)")
    parser.add_argument("--pack_strategy", choices=PACK_STRATEGIES, default="bfd",
                        help="bfd: best-fit-decreasing, balanced steps; greedy: the paper's walk in stored "
                             "order; greedy_original: the original code's walk rule for rule")
    parser.add_argument("--sort_remainder", choices=SORT_REMAINDER_POLICIES, default="repeat",
                        help="incomplete last sorted group: repeat its members (default) or drop the "
                             "longest N mod group_size sequences as the original does")
    parser.add_argument("--seed", type=non_negative_int, default=42, help="shuffles the order of groups")
    parser.add_argument("--too_long", choices=TOO_LONG_POLICIES, default="truncate",
                        help="what to do with a sequence longer than --max_length")
    parser.add_argument("--repeat_small_dataset", action="store_true",
                        help="allow fewer sequences than --group_size (rows are repeated to fill a group)")
    parser.add_argument("--overwrite_output_dir", action="store_true",
                        help="replace previous sort/ and pack/ even if other files were put in them")
    return parser.parse_args(argv)


def pair_id(train_file, settings: dict) -> str:
    """One id for the sort/ and pack/ of one run: the input's data files and the settings."""
    payload = json.dumps({"input": data_files_digest(train_file), **settings}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def save_pair(train_file, sort_output, pack_output, overwrite: bool) -> None:
    """Write sort/ then pack/ complete into temporary folders, then swap pack/ and sort/ in.

    `*_output` = (build_table, stats); the tables are built one at a time (memory).
    """
    policy = {"stage": STAGE, "overwrite": overwrite, "inputs": [train_file]}
    with atomic_dir(Path(train_file) / "sort", **policy) as sort_tmp:
        write_table(sort_output[0](), sort_tmp, sort_output[1])
        with atomic_dir(Path(train_file) / "pack", **policy) as pack_tmp:
            write_table(pack_output[0](), pack_tmp, pack_output[1])
        fault_point(BETWEEN_SORT_AND_PACK)  # pack/ is new, sort/ still old: their pair_ids differ


def sort_and_group(train_file, group_size: int, max_length: int, pack_strategy: str, seed: int,
                   too_long: str, overwrite: bool = False, repeat_small_dataset: bool = False,
                   sort_remainder: str = "repeat") -> dict:
    """Validate everything first (nothing is written on bad input), then write sort/ and pack/."""
    check_group_size(group_size)
    if pack_strategy not in PACK_STRATEGIES:
        raise ValueError(f"--pack_strategy must be one of {PACK_STRATEGIES}, got {pack_strategy!r}")
    for name in OUTPUTS:  # refusals and permissions before any work
        check_output_dir(Path(train_file) / name, STAGE, overwrite, [train_file])
    started = time.perf_counter()
    table = load_token_table(train_file)
    check_not_grouped_output(train_file, table, STAGE)
    sequences, input_counts = prepare_sequences(table, max_length, too_long)
    check_has_targets(sequences, input_counts, train_file, max_length)
    check_enough_sequences(len(sequences.lengths), group_size, repeat_small_dataset)
    settings = {"seed": seed, "max_length": max_length, "group_size": group_size,
                "pack_strategy": pack_strategy, "too_long": too_long, "sort_remainder": sort_remainder}
    common = {"train_file": str(train_file), "seed": seed, "max_length": max_length,
              "pair_id": pair_id(train_file, settings),
              "ignored_columns": [c for c in table.column_names if c not in sequences.columns],
              **input_counts}

    order, sort_counts = plan_sort(sequences.lengths, group_size, seed, sort_remainder)
    packs, pack_counts = plan_packs(sequences.lengths, max_length, pack_strategy, group_size, seed)

    sort_summary = {**common, **sort_stats(sequences, order, group_size, sort_counts)}
    pack_summary = {**common, "pack_strategy": pack_strategy,
                    **pack_stats(packs, sequences.lengths, max_length, group_size, pack_counts)}
    save_pair(train_file, (lambda: build_sort_table(sequences, order), sort_summary),
              (lambda: build_pack_table(sequences, packs), pack_summary), overwrite)
    return {"sort": sort_summary, "pack": pack_summary, "seconds": time.perf_counter() - started}


def main(argv=None) -> None:
    args = parse_args(argv)
    summary = sort_and_group(args.train_file, args.group_size, args.max_length, args.pack_strategy,
                             args.seed, args.too_long, args.overwrite_output_dir, args.repeat_small_dataset,
                             args.sort_remainder)
    print(format_stats_table(f"sort -> {Path(args.train_file) / 'sort'}", summary["sort"]))
    print(format_stats_table(f"pack -> {Path(args.train_file) / 'pack'}", summary["pack"]))
    without = summary["sort"]["sequences_without_targets"]
    if without:
        print(f"warning: {without} of {summary['sort']['sequences']} sequences have no target token "
              f"({summary['sort']['truncated_lost_all_targets']} lost all to truncation at --max_length "
              f"{args.max_length}): kept with zero loss weight (sequences_without_targets in stats.json)",
              file=sys.stderr)
    print(f"done in {summary['seconds']:.1f} s")


if __name__ == "__main__":
    main()
