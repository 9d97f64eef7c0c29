"""Pack geometry: the one owner of which labels are targets, 1/N_k, positions, cu_seqlens and the
longest sequence of a flat concatenation of sequences (a pack, or one padded row).

A pack of three sequences (lengths 3, 2, 4; X = IGNORE_INDEX):

    token i        0  1  2 | 3  4 | 5  6  7  8
    labels         X  5  6 | 7  8 | X  X  9  4
    cu_seqlens     [0, 3, 5, 9]          sequence_starts = [0, 3, 5]   longest_sequence = 4
    positions      0  1  2 | 0  1 | 0  1  2  3
    target_mask    .  T  T | .  T | .  .  T  T     (label 7 at token 3 starts a sequence: no target)
    N_k            2       | 1    | 2
    1/N_k weights  0 .5 .5 | 0  1 | 0  0 .5 .5

The model shifts labels by one *within* each sequence, so a sequence's first label is never
predicted (`target_mask`, the only place that rule is written); N_k counts target positions of
sequence k and its tokens weigh 1/N_k (`sequence_loss_weights`, 0 for a sequence without targets).
Functions take numpy arrays or torch tensors (the data stages use numpy, the collators torch) and
compute the same values for both. DESIGN.md §3-4 say how the loss uses them.
"""
from __future__ import annotations

import numpy as np
import torch

from longalign.constants import IGNORE_INDEX


def sequence_starts(cu_seqlens):
    """[0, e_1, ..., T] -> [0, e_1, ..., e_{K-1}]: the first token of each sequence."""
    return cu_seqlens[:-1]


def sequence_lengths(cu_seqlens):
    """[0 3 5 9] -> [3 2 4]."""
    return cu_seqlens[1:] - cu_seqlens[:-1]


def longest_sequence(cu_seqlens) -> int:
    """[0 3 5 9] -> 4 (one device sync for a tensor)."""
    return int(sequence_lengths(cu_seqlens).max())


def target_mask(labels, starts):
    """True where labels != IGNORE_INDEX, except at each sequence's first token (`starts`)."""
    mask = labels != IGNORE_INDEX
    mask[starts] = False
    return mask


def segment_ids(cu_seqlens: torch.Tensor) -> torch.Tensor:
    """Sequence index of every token: cu_seqlens=[0 2 5] -> [0 0 1 1 1]."""
    lengths = sequence_lengths(cu_seqlens)
    return torch.repeat_interleave(torch.arange(len(lengths)), lengths)


def targets_per_sequence(mask, cu_seqlens):
    """N_k: target positions per sequence (int64), from `target_mask` over [0, e_1, ..., T]."""
    if isinstance(mask, torch.Tensor):
        counts = torch.zeros(len(cu_seqlens) - 1, dtype=torch.long)
        return counts.index_add_(0, segment_ids(cu_seqlens), mask.long())
    return np.add.reduceat(mask, np.asarray(sequence_starts(cu_seqlens)), dtype=np.int64)


def sequence_loss_weights(num_targets):
    """Per sequence 1/N_k as float32 (the stored dtype); 0 for a sequence without targets (no 1/0).

    num_targets=[4 0 1] -> [0.25 0. 1.]
    """
    if isinstance(num_targets, torch.Tensor):
        inverse = 1.0 / num_targets.clamp(min=1).double()
        return torch.where(num_targets > 0, inverse, torch.zeros((), dtype=torch.float64)).to(torch.float32)
    num_targets = np.asarray(num_targets)
    weights = np.zeros(len(num_targets), dtype=np.float32)
    has_targets = num_targets > 0
    weights[has_targets] = 1.0 / num_targets[has_targets].astype(np.float64)
    return weights


def sequence_token_weights(labels, cu_seqlens):
    """Per token 1/N_k on the targets of sequence k, 0 elsewhere (float32): the paper's loss weights.

    The drawn example above -> [0 .5 .5 0 1 0 0 .5 .5].
    """
    mask = target_mask(labels, sequence_starts(cu_seqlens))
    weights = sequence_loss_weights(targets_per_sequence(mask, cu_seqlens))
    if isinstance(mask, torch.Tensor):
        return weights[segment_ids(cu_seqlens)] * mask
    return np.repeat(weights, np.asarray(sequence_lengths(cu_seqlens))) * mask


def positions_from_cu_seqlens(cu_seqlens: torch.Tensor, total: int) -> torch.Tensor:
    """Position ids (1, T) that restart at 0 at every sequence start: [0 3 5 9] -> [[0 1 2 0 1 0 1 2 3]]."""
    cu = cu_seqlens.long()
    starts = torch.repeat_interleave(cu[:-1], cu[1:] - cu[:-1], output_size=total)
    return (torch.arange(total, device=cu.device) - starts)[None]


def cu_seqlens_values(member_lengths: np.ndarray, members_per_pack: np.ndarray) -> np.ndarray:
    """The cu_seqlens [0, e1, ..., T] of consecutive packs, concatenated (int32), vectorised.

    member_lengths=[3 2 4], members_per_pack=[2 1] -> [0 3 5 | 0 4]
    """
    ends = np.cumsum(member_lengths, dtype=np.int64)
    pack_starts = np.cumsum(members_per_pack) - members_per_pack
    base = np.where(pack_starts > 0, ends[pack_starts - 1], 0)
    within_pack_ends = ends - np.repeat(base, members_per_pack)
    return np.insert(within_pack_ends, pack_starts, 0).astype(np.int32)
