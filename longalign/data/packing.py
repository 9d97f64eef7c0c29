"""Packing (paper §3.2): concatenate sequences into packs of at most `max_length` tokens.

A pack is a list of sequence indices. Three strategies:
- `greedy_pack`, the paper's walk: in stored order, append while the pack fits (<= max_length).
- `greedy_original_pack`: the original code's walk rule for rule (its `>=`, its dropped last
  pack, its skipped max_length sequences; see the function), for reproducing its batches.
- `best_fit_decreasing_pack`: longest first, each into the fullest pack that still has room.

        max_length = 10, lengths = [6 5 4 3 2]
        greedy          : [0] [1 2] [3 4]   -> 6 | 9 | 5 tokens, 3 packs
        greedy_original : [0] [1 2]         -> 6 | 9 tokens ([3 4] is the dropped last pack)
        bfd             : [0 2] [1 3 4]     -> 10 | 10 tokens, 2 packs

Loss weighting (paper Eq. 2): each token of sequence k weighs 1/N_k (N_k its target count), so
every sequence counts once in a pack's loss however long it is (`longalign.pack_geometry`). Packs are then completed to
whole groups of `group_size` (one pack per GPU per step) by splitting packs at sequence
boundaries, and for bfd ordered so that the packs of one step have similar attention cost.
"""
from __future__ import annotations

import bisect

import numpy as np
import pyarrow as pa

from longalign.constants import PACK_STRATEGIES
from longalign.pack_geometry import cu_seqlens_values, sequence_token_weights
from longalign.data.sorting import check_group_size, fill_last_group, shuffle_groups, token_chunks


def check_lengths(lengths, max_length: int) -> list[int]:
    lengths = [int(length) for length in lengths]
    bad = [i for i, length in enumerate(lengths) if not 1 <= length <= max_length]
    if bad:
        raise ValueError(f"{len(bad)} sequence lengths outside [1, {max_length}] "
                         f"(first indices: {bad[:5]}); apply the too-long policy before packing")
    return lengths


def greedy_pack(lengths, max_length: int) -> list[list[int]]:
    """The paper's packing: in stored order, start a new pack when the next sequence does not fit.

    lengths=[6 5 4 3 2], max_length=10 -> [[0], [1, 2], [3, 4]]
    """
    packs, current, used = [], [], 0
    for index, length in enumerate(check_lengths(lengths, max_length)):
        if current and used + length > max_length:
            packs.append(current)
            current, used = [], 0
        current.append(index)
        used += length
    if current:  # the last pack is kept
        packs.append(current)
    return packs


def greedy_original_pack(lengths, max_length: int) -> tuple[list[list[int]], dict]:
    """The original sort_and_group.py's packing, reproduced rule for rule; returns (packs, counts).

    In stored order: a sequence of length >= max_length is skipped (the original reads a row
    without padding as too long; after its right truncation that is every over-long sequence);
    a new pack starts when used + length >= max_length (so a pack is never exactly full); the
    last, partial pack is dropped. Every rule is counted.

        lengths=[6 5 4 3 2 10], max_length=10
        6 -> A; 5: 6+5 >= 10 -> B; 4: 5+4 < 10 -> B; 3: 9+3 >= 10 -> C; 2 -> C; 10 skipped
        => [[0], [1, 2]]; [3, 4] (5 tokens) dropped with the last pack
    """
    lengths = check_lengths(lengths, max_length)
    packs, current, used, skipped = [], [], 0, 0
    for index, length in enumerate(lengths):
        if length >= max_length:
            skipped += 1
            continue
        if used + length >= max_length:
            packs.append(current)
            current, used = [], 0
        current.append(index)
        used += length
    counts = {"original_skipped_max_length_sequences": skipped,
              "original_dropped_last_pack_sequences": len(current),
              "original_dropped_last_pack_tokens": used}
    return packs, counts


def best_fit_decreasing_pack(lengths, max_length: int) -> list[list[int]]:
    """Best-fit decreasing: longest first, each into the open pack with the least room that fits.

    O(n log n): the open packs' free space is kept sorted, so the best fit is one bisect.
    Ties (equal lengths, equal free space) go to the lower index, so the result is deterministic.

    lengths=[6 5 4 3 2], max_length=10
        6 -> new pack A (free 4);  5 -> new B (free 5);  4 -> A (free 0, closed)
        3 -> B (free 2);           2 -> B (free 0)      => [[0, 2], [1, 3, 4]]
    """
    lengths = check_lengths(lengths, max_length)
    longest_first = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    packs: list[list[int]] = []
    free_space: list[tuple[int, int]] = []  # sorted (free tokens, pack id) of packs with room
    for index in longest_first:
        length = lengths[index]
        slot = bisect.bisect_left(free_space, (length, -1))
        if slot == len(free_space):
            packs.append([index])
            free, pack_id = max_length - length, len(packs) - 1
        else:
            free, pack_id = free_space.pop(slot)
            packs[pack_id].append(index)
            free -= length
        if free > 0:
            bisect.insort(free_space, (free, pack_id))
    return packs


def split_packs_to_fill_groups(packs: list[list[int]], lengths, group_size: int) -> tuple[list[list[int]], int]:
    """Split packs at sequence boundaries until len(packs) is a multiple of group_size.

    Each split takes the pack with the most sequences and cuts it where its tokens halve; the
    second half follows the first. Returns (packs, splits); splits < the number needed means no
    pack had two sequences left (the caller then repeats packs: see `fill_last_group`).

    packs=[[0 1 2], [3]], lengths=[2 2 2 9], group_size=3 -> [[0], [1 2], [3]], 1 split
    """
    check_group_size(group_size)
    packs = [list(pack) for pack in packs]
    splits = 0
    while len(packs) % group_size:
        most = max(range(len(packs)), key=lambda p: (len(packs[p]), -p))
        if len(packs[most]) < 2:
            break
        pack_lengths = np.asarray([lengths[i] for i in packs[most]])
        ends = np.cumsum(pack_lengths)[:-1]  # candidate cuts after member 1 .. n-1
        cut = 1 + int(np.argmin(np.abs(2 * ends - pack_lengths.sum())))
        packs[most:most + 1] = [packs[most][:cut], packs[most][cut:]]
        splits += 1
    return packs, splits


def attention_costs(packs: list[list[int]], lengths) -> np.ndarray:
    """Attention cost of each pack, sum of l_k^2 over its sequences (block-diagonal attention)."""
    lengths = np.asarray(lengths, dtype=np.int64)
    return np.array([int((lengths[pack] ** 2).sum()) for pack in packs], dtype=np.int64)


def balanced_group_order(costs: np.ndarray, group_size: int, seed: int) -> tuple[np.ndarray, int]:
    """Pack order whose runs of `group_size` have similar cost; groups shuffled with `seed`.

    Sorting by cost and cutting into consecutive groups minimises the sum over steps of the
    slowest member's cost. Returns (order, repeated packs completing the last group).

    costs=[9 1 8 2], group_size=2 -> groups [0 2] (9 8), [3 1] (2 1) -> shuffled, e.g. [3 1 0 2]
    """
    costs = np.asarray(costs)
    heaviest_first = np.lexsort((np.arange(len(costs)), -costs))
    filled, repeated = fill_last_group(heaviest_first, group_size)
    return shuffle_groups(filled, group_size, seed), repeated


def group_imbalance(costs_in_order: np.ndarray, group_size: int) -> np.ndarray:
    """Per step of `group_size` packs: max / mean cost (1.0 = nobody waits).

    costs_in_order=[4 2 3 3], group_size=2 -> [4/3, 1.0]
    """
    groups = np.asarray(costs_in_order, dtype=np.float64).reshape(-1, group_size)
    return groups.max(axis=1) / groups.mean(axis=1)


def plan_packs(lengths, max_length: int, strategy: str, group_size: int, seed: int) -> tuple[list[list[int]], dict]:
    """Packs in training order (runs of `group_size` = one step) and the counts of how they came.

    greedy keeps the paper's creation order; bfd is ordered by `balanced_group_order`. Both are
    first completed to whole groups by `split_packs_to_fill_groups` (then, only if no pack can be
    split, by repeating packs of the last group, counted as `repeated_packs`). greedy_original
    keeps the original's creation order and, as its LMPackDataset does with the GPU count,
    drops the packs past the last whole group (counted).
    """
    if strategy == "greedy_original":
        return plan_original_packs(lengths, max_length, group_size)
    if strategy == "greedy":
        packs = greedy_pack(lengths, max_length)
    elif strategy == "bfd":
        packs = best_fit_decreasing_pack(lengths, max_length)
    else:
        raise ValueError(f"unknown pack strategy {strategy!r}; expected one of {PACK_STRATEGIES}")
    packs_before = len(packs)
    packs, splits = split_packs_to_fill_groups(packs, lengths, group_size)
    if strategy == "bfd":
        order, repeated = balanced_group_order(attention_costs(packs, lengths), group_size, seed)
    else:
        order, repeated = fill_last_group(np.arange(len(packs)), group_size)
    counts = {"packs_before_completing_groups": packs_before,
              "packs_split_to_complete_groups": splits, "repeated_packs": repeated}
    return [packs[p] for p in order], counts


def plan_original_packs(lengths, max_length: int, group_size: int) -> tuple[list[list[int]], dict]:
    """greedy_original packs in creation order, cut to whole groups of `group_size`.

    lengths=[6 5 4 3 2 10], max_length=10, group_size=2 -> [[0], [1, 2]], nothing cut
    """
    check_group_size(group_size)
    packs, counts = greedy_original_pack(lengths, max_length)
    kept = len(packs) - len(packs) % group_size
    if kept == 0:
        raise ValueError(f"greedy_original made {len(packs)} packs: not one whole group of {group_size}")
    counts.update(packs_before_completing_groups=len(packs), packs_split_to_complete_groups=0,
                  repeated_packs=0, original_dropped_incomplete_group_packs=len(packs) - kept,
                  original_dropped_incomplete_group_sequences=sum(len(pack) for pack in packs[kept:]))
    return packs[:kept], counts


def build_pack_table(sequences, packs: list[list[int]]) -> pa.Table:
    """Pack rows of DESIGN.md §2 from `sequences` (a TokenSequences), one row per pack, unpadded."""
    members = np.fromiter((i for pack in packs for i in pack), dtype=np.int64)
    members_per_pack = np.array([len(pack) for pack in packs], dtype=np.int64)
    first_member = np.concatenate([[0], np.cumsum(members_per_pack)])
    pack_tokens = np.add.reduceat(sequences.lengths[members], first_member[:-1])
    batches = []
    for start, stop in token_chunks(pack_tokens):  # bounded temporaries, int32 offsets
        batches.append(pack_batch(sequences, members[first_member[start]:first_member[stop]],
                                  members_per_pack[start:stop]))
    return pa.Table.from_batches(batches)


def pack_batch(sequences, members: np.ndarray, members_per_pack: np.ndarray) -> pa.RecordBatch:
    """One Arrow batch of consecutive packs; `members` are their sequences, pack after pack."""
    member_lengths = sequences.lengths[members]
    first_member = np.cumsum(members_per_pack) - members_per_pack
    pack_ends = np.cumsum(np.add.reduceat(member_lengths, first_member))
    token_offsets = pa.array(np.concatenate([[0], pack_ends]).astype(np.int32))
    labels = sequences.gather("labels", members)
    weights = sequence_token_weights(labels, np.concatenate([[0], np.cumsum(member_lengths)]))
    cu_offsets = np.concatenate([[0], np.cumsum(members_per_pack + 1)]).astype(np.int32)
    has_targets = sequences.num_targets[members] > 0
    return pa.RecordBatch.from_pydict({
        "input_ids": pa.ListArray.from_arrays(token_offsets, pa.array(sequences.gather("input_ids", members))),
        "labels": pa.ListArray.from_arrays(token_offsets, pa.array(labels)),
        "loss_weights": pa.ListArray.from_arrays(token_offsets, pa.array(weights)),
        "cu_seqlens": pa.ListArray.from_arrays(pa.array(cu_offsets),
                                               pa.array(cu_seqlens_values(member_lengths, members_per_pack))),
        "num_sequences": pa.array(np.add.reduceat(has_targets, first_member, dtype=np.int64).astype(np.int32)),
    })


def pack_stats(packs: list[list[int]], lengths, max_length: int, group_size: int, counts: dict) -> dict:
    """What the pack output holds, for stats.json and the console."""
    lengths = np.asarray(lengths, dtype=np.int64)
    tokens = np.array([lengths[pack].sum() for pack in packs], dtype=np.int64)
    imbalance = group_imbalance(attention_costs(packs, lengths), group_size)
    return {"group_size": group_size, "max_length": max_length, "packs": len(packs),
            **counts, "groups": int(len(imbalance)),
            "sequences_per_pack_mean": float(np.mean([len(pack) for pack in packs])),
            "pack_tokens_max": int(tokens.max()),
            "packing_efficiency": float(tokens.sum() / (len(packs) * max_length)),
            "attention_cost_imbalance_mean": float(imbalance.mean()),
            "attention_cost_imbalance_worst": float(imbalance.max())}
