"""Sorted batching and packing datasets for long-context SFT (LongAlign, paper §3.2).

    python sort_and_group.py --group_size 8 --train_file ./data/chatglm/10k

reads the pre_tokenize.py dataset at --train_file and writes, each with a stats.json:
- <train_file>/sort: sequences in training order, runs of group_size rows = length-sorted steps;
- <train_file>/pack: packs of <= --max_length tokens with 1/N_k loss weights and cu_seqlens.
Formats: DESIGN.md §2. Policies (too long, empty, no targets, incomplete last group):
longalign/token_sequences.py, longalign/sorting.py, longalign/packing.py.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

from longalign.constants import DEFAULT_GROUP_SIZE, DEFAULT_MAX_LENGTH, PACK_STRATEGIES
from longalign.packing import build_pack_table, pack_stats, plan_packs
from longalign.sorting import build_sort_table, check_group_size, sort_stats, sorted_group_order
from longalign.token_sequences import (TOO_LONG_POLICIES, format_stats_table, load_token_table,
                                       prepare_sequences, save_table)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train_file", required=True, help="dataset directory written by pre_tokenize.py")
    parser.add_argument("--group_size", type=int, default=DEFAULT_GROUP_SIZE,
                        help="sequences (sort) / packs (pack) per data-parallel step")
    parser.add_argument("--max_length", type=int, default=DEFAULT_MAX_LENGTH, help="tokens per pack")
    parser.add_argument("--pack_strategy", choices=PACK_STRATEGIES, default="bfd")
    parser.add_argument("--seed", type=int, default=42, help="shuffles the order of groups")
    parser.add_argument("--too_long", choices=TOO_LONG_POLICIES, default="truncate",
                        help="what to do with a sequence longer than --max_length")
    return parser.parse_args(argv)


def sort_and_group(train_file, group_size: int, max_length: int, pack_strategy: str,
                   seed: int, too_long: str) -> dict:
    """Validate everything first (nothing is written on bad input), then write sort/ and pack/."""
    check_group_size(group_size)
    if pack_strategy not in PACK_STRATEGIES:
        raise ValueError(f"--pack_strategy must be one of {PACK_STRATEGIES}, got {pack_strategy!r}")
    started = time.perf_counter()
    table = load_token_table(train_file)
    sequences, input_counts = prepare_sequences(table, max_length, too_long)
    common = {"train_file": str(train_file), "seed": seed, "max_length": max_length,
              "ignored_columns": [c for c in table.column_names if c not in sequences.columns],
              **input_counts}

    order, repeated = sorted_group_order(sequences.lengths, group_size, seed)
    sort_summary = {**common, **sort_stats(sequences, order, group_size, repeated)}
    save_table(build_sort_table(sequences, order), Path(train_file) / "sort", sort_summary)

    packs, pack_counts = plan_packs(sequences.lengths, max_length, pack_strategy, group_size, seed)
    pack_summary = {**common, "pack_strategy": pack_strategy,
                    **pack_stats(packs, sequences.lengths, max_length, group_size, pack_counts)}
    save_table(build_pack_table(sequences, packs), Path(train_file) / "pack", pack_summary)
    return {"sort": sort_summary, "pack": pack_summary, "seconds": time.perf_counter() - started}


def main(argv=None) -> None:
    args = parse_args(argv)
    summary = sort_and_group(args.train_file, args.group_size, args.max_length,
                             args.pack_strategy, args.seed, args.too_long)
    print(format_stats_table(f"sort -> {Path(args.train_file) / 'sort'}", summary["sort"]))
    print(format_stats_table(f"pack -> {Path(args.train_file) / 'pack'}", summary["pack"]))
    print(f"done in {summary['seconds']:.1f} s")


if __name__ == "__main__":
    main()
