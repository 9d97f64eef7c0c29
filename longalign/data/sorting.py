"""Sorted batching (paper §3.2): length-sorted groups of `group_size` sequences, groups shuffled.

Each group is what one data-parallel step trains on, so sorting makes its members similar in
length (little padding, little waiting for the longest GPU); shuffling the groups with a seed
keeps the order of steps random instead of going from longest to shortest.

Remainder policy (`--sort_remainder`), when the number of sequences is not a multiple of
`group_size`:
- `repeat` (default): the last (shortest) group is completed by repeating its own members
  cyclically. Every sequence is kept, the repeated rows are counted in stats.json, and every
  group is complete, which a trainer on world size == group_size needs (otherwise its sampler
  would pad with unrelated rows, as torch's DistributedSampler does, mixing a long sequence
  into a short step).
- `drop`: the original's rule (`original_sorted_group_order`): sorted shortest first, the
  N mod group_size longest sequences are dropped (counted), groups shuffled.

A dataset with fewer sequences than `group_size` cannot fill one group without repeating rows
(100 rows, group_size 1000 -> 1000 rows): `check_enough_sequences` makes that an error unless
the caller opts in (sort_and_group.py --repeat_small_dataset).
"""
from __future__ import annotations

import numpy as np
import pyarrow as pa

from longalign.constants import MATERIALIZE_CHUNK_TOKENS


def check_group_size(group_size: int) -> None:
    if not isinstance(group_size, (int, np.integer)) or group_size < 1:
        raise ValueError(f"group_size must be an integer >= 1, got {group_size!r}")


def check_enough_sequences(num_sequences: int, group_size: int, allow_repeats: bool = False) -> None:
    """Refuse group_size > sequences (every row would be repeated) unless `allow_repeats`."""
    if num_sequences < group_size and not allow_repeats:
        raise ValueError(
            f"--group_size {group_size} is larger than the dataset's {num_sequences} sequences: one "
            f"step needs {group_size} distinct sequences, so rows would be repeated to fill it. Use "
            f"--group_size <= {num_sequences} (fewer GPUs), or pass --repeat_small_dataset to repeat "
            "rows (counted in stats.json)")


def fill_last_group(order: np.ndarray, group_size: int) -> tuple[np.ndarray, int]:
    """Complete the last group of `order` by repeating its own members; return (order, repeats).

    Repeats go right after their original (the first members first), so a group sorted by
    length stays sorted.

    order=[a b c d e], group_size=3 -> groups [a b c] [d e .] -> [a b c d d e], 1 repeat
    """
    check_group_size(group_size)
    order = np.asarray(order, dtype=np.int64)
    missing = (-len(order)) % group_size
    if missing == 0:
        return order, 0
    kept = len(order) - (group_size - missing)
    last_group = order[kept:]
    copies = 1 + missing // len(last_group) + (np.arange(len(last_group)) < missing % len(last_group))
    return np.concatenate([order[:kept], np.repeat(last_group, copies)]), int(missing)


def shuffle_groups(order: np.ndarray, group_size: int, seed: int) -> np.ndarray:
    """Permute whole groups (runs of `group_size`) of a complete `order` with `seed`.

    order=[a b c d e f], group_size=2, permutation (2 0 1) -> [e f a b c d]
    """
    if len(order) % group_size:
        raise ValueError(f"{len(order)} rows do not form complete groups of {group_size}")
    groups = np.asarray(order).reshape(-1, group_size)
    permutation = np.random.default_rng(seed).permutation(len(groups))
    return groups[permutation].reshape(-1)


def sorted_group_order(lengths: np.ndarray, group_size: int, seed: int) -> tuple[np.ndarray, int]:
    """Training order of the sequences: length-sorted complete groups in a seeded random order.

    Returns (order, repeated_rows); `order` indexes `lengths` and may repeat members of the
    shortest group (see the module's remainder policy). Ties keep the input order.

        lengths    = [5 1 9 3 7], group_size = 2
        by length  = [2 4 0 3 1]        (9 7 5 3 1)
        groups     = [2 4] [0 3] [1 1]  (the last is completed with a repeat of 1)
        shuffled   = e.g. [0 3] [1 1] [2 4]  -> order [0 3 1 1 2 4], repeated_rows 1
    """
    check_group_size(group_size)
    lengths = np.asarray(lengths)
    longest_first = np.lexsort((np.arange(len(lengths)), -lengths))
    filled, repeated = fill_last_group(longest_first, group_size)
    return shuffle_groups(filled, group_size, seed), repeated


SORT_REMAINDER_POLICIES = ("repeat", "drop")


def original_sorted_group_order(lengths: np.ndarray, group_size: int, seed: int) -> tuple[np.ndarray, int]:
    """The original sort_and_group.py's sorted batching; returns (order, dropped_rows).

    Shortest first (ties in stored order, where the original's torch.sort is unstable), cut into
    groups of `group_size`, the incomplete last group (the longest sequences) dropped, groups
    shuffled with `seed` (the original's torch.randperm is unseeded).

        lengths = [5 1 9 3 7], group_size = 2
        by length = [1 3 0 4 2]  (1 3 5 7 9);  groups [1 3] [0 4], 2 (9 tokens) dropped
        shuffled  = e.g. [0 4] [1 3]  -> order [0 4 1 3], dropped_rows 1
    """
    check_group_size(group_size)
    lengths = np.asarray(lengths)
    shortest_first = np.argsort(lengths, kind="stable")
    kept = len(lengths) - len(lengths) % group_size
    if kept == 0:
        raise ValueError(f"--sort_remainder drop: {len(lengths)} sequences do not fill one group of {group_size}")
    return shuffle_groups(shortest_first[:kept], group_size, seed), int(len(lengths) - kept)


def group_padding_fractions(lengths_in_order: np.ndarray, group_size: int) -> np.ndarray:
    """Per group: padded tokens / (group_size x longest member), for batches padded to the longest.

    lengths_in_order=[4 2 3 3], group_size=2 -> [1 - 6/8, 1 - 6/6] = [0.25, 0.0]
    """
    groups = np.asarray(lengths_in_order, dtype=np.float64).reshape(-1, group_size)
    return 1.0 - groups.sum(axis=1) / (group_size * groups.max(axis=1))


def token_chunks(lengths_in_order: np.ndarray, chunk_tokens: int = MATERIALIZE_CHUNK_TOKENS):
    """Yield (start, stop) row ranges of about `chunk_tokens` tokens (at least one row each)."""
    ends = np.cumsum(lengths_in_order)
    start = 0
    while start < len(lengths_in_order):
        base = ends[start - 1] if start else 0
        stop = int(np.searchsorted(ends, base + chunk_tokens, side="right"))
        stop = max(stop, start + 1)
        yield start, stop
        start = stop


def build_sort_table(sequences, order: np.ndarray) -> pa.Table:
    """Rows `input_ids`, `labels` (DESIGN.md §2) of `sequences` (a TokenSequences) in `order`."""
    batches = []
    for start, stop in token_chunks(sequences.lengths[order]):
        columns = sequences.take(order[start:stop])
        batches.append(pa.RecordBatch.from_pydict(columns))
    return pa.Table.from_batches(batches)


def plan_sort(lengths: np.ndarray, group_size: int, seed: int, remainder: str) -> tuple[np.ndarray, dict]:
    """Training order of the sorted batches under `remainder` (module docstring) and its counts."""
    if remainder == "drop":
        order, dropped = original_sorted_group_order(lengths, group_size, seed)
        repeated = 0
    elif remainder == "repeat":
        order, repeated = sorted_group_order(lengths, group_size, seed)
        dropped = 0
    else:
        raise ValueError(f"--sort_remainder must be one of {SORT_REMAINDER_POLICIES}, got {remainder!r}")
    return order, {"sort_remainder": remainder, "repeated_rows_to_complete_last_group": repeated,
                   "dropped_rows_incomplete_last_group": dropped}


def sort_stats(sequences, order: np.ndarray, group_size: int, counts: dict) -> dict:
    """What the sort output holds (`counts` from plan_sort), for stats.json and the console."""
    padding = group_padding_fractions(sequences.lengths[order], group_size)
    stored_order, _ = fill_last_group(np.arange(len(sequences.lengths)), group_size)
    unsorted = group_padding_fractions(sequences.lengths[stored_order], group_size)
    return {"group_size": group_size, "rows": int(len(order)), "groups": int(len(padding)),
            **counts,
            "padding_fraction_mean": float(padding.mean()),
            "padding_fraction_worst": float(padding.max()),
            # for comparison: groups cut from the stored order, as naive batching would
            "padding_fraction_mean_unsorted": float(unsorted.mean())}
