"""Collators: dataset rows (DESIGN.md §1-2) -> model batches (DESIGN.md §3) with loss weights.

Target positions. The model shifts labels by one within each sequence, so position i of a
sequence is a target when i is not the sequence's first token and labels[i] != IGNORE_INDEX;
N_k is the number of target positions of sequence k (the first token's label is never used).

Loss weights w_i (on target positions, 0 elsewhere), one per `--loss_reduction`:
    sequence  : w_i = 1 / N_k          (k the sequence of i; paper Eq. 2 once divided by K)
    pack_mean : w_i = 1 / sum_k N_k    (sum over the pack, or the padded row, i belongs to)
    token     : w_i = 1
The model returns S = sum_i w_i l_i (loss_reduction="sum"); the trainer divides by a global
count D (longalign/trainer.py). Weights are computed here from labels and cu_seqlens, so they
always match the positions the loss uses (a stored `loss_weights` column is not read).

A pack batch carries its geometry under transformers' packed-attention keyword names
(`FlashAttentionKwargs`, as `DataCollatorWithFlattening(return_flash_attn_kwargs=True)` emits
them): `cu_seq_lens_q` = `cu_seq_lens_k` = [0, e_1, ..., T] (int32) and `max_length_q` =
`max_length_k` = the longest sequence (int). The dataset column keeps its name `cu_seqlens`.

Every batch also carries `batch_counts` (int64, fields COUNT_FIELDS) for the trainer's global
denominators and throughput logs; the trainer removes it before calling the model.
"""
from __future__ import annotations

from typing import Sequence

import torch

from longalign.attention import positions_from_cu_seqlens
from longalign.constants import IGNORE_INDEX

LOSS_REDUCTIONS = ("sequence", "pack_mean", "token")
BATCH_METHODS = ("naive", "sort", "pack")
COUNTS_KEY = "batch_counts"
# sequences with >= 1 target | packs (padded rows) with >= 1 target | target positions |
# real (non-pad) tokens | sum over sequences of length^2 (attention work)
COUNT_FIELDS = ("sequences", "packs", "target_tokens", "tokens", "sum_sq_lengths")


def check_reduction(reduction: str) -> None:
    if reduction not in LOSS_REDUCTIONS:
        raise ValueError(f"loss reduction must be one of {LOSS_REDUCTIONS}, got {reduction!r}")


def as_long_tensor(values, name: str) -> torch.Tensor:
    tensor = torch.as_tensor(values)
    if tensor.dim() != 1 or (tensor.numel() and tensor.is_floating_point()):
        raise ValueError(f"{name}: expected a 1-D list of integers, got shape {tuple(tensor.shape)} "
                         f"dtype {tensor.dtype}")
    return tensor.to(torch.long)


def check_cu_seqlens(cu_seqlens: torch.Tensor, total: int) -> None:
    """cu_seqlens must be [0, e1, ..., total], strictly increasing."""
    if cu_seqlens.numel() < 2 or cu_seqlens[0] != 0 or cu_seqlens[-1] != total:
        raise ValueError(f"cu_seqlens must run from 0 to the pack length {total}, got "
                         f"{cu_seqlens[:3].tolist()}...{cu_seqlens[-2:].tolist()}")
    if bool((cu_seqlens[1:] <= cu_seqlens[:-1]).any()):
        raise ValueError("cu_seqlens must be strictly increasing (no empty sequences)")


def segment_ids(cu_seqlens: torch.Tensor) -> torch.Tensor:
    """Sequence index of every token: cu_seqlens=[0 2 5] -> [0 0 1 1 1]."""
    lengths = cu_seqlens[1:] - cu_seqlens[:-1]
    return torch.repeat_interleave(torch.arange(len(lengths)), lengths)


def target_mask(labels: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
    """True on target positions of a flat sequence concatenation (see module docstring)."""
    mask = labels != IGNORE_INDEX
    mask[cu_seqlens[:-1]] = False  # a sequence's first token is never predicted
    return mask


def pack_weights_and_counts(labels: torch.Tensor, cu_seqlens: torch.Tensor,
                            reduction: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Loss weights (float32) of one pack and its counts (int64, COUNT_FIELDS).

    labels=[-100 5 6 | -100 7], cu_seqlens=[0 3 5]: N = [2, 1]
        sequence -> [0 .5 .5 | 0 1];  pack_mean -> [0 1/3 1/3 | 0 1/3];  token -> [0 1 1 | 0 1]
    """
    check_reduction(reduction)
    mask = target_mask(labels, cu_seqlens)
    segments = segment_ids(cu_seqlens)
    per_sequence = torch.zeros(len(cu_seqlens) - 1, dtype=torch.long).index_add_(0, segments, mask.long())
    total = int(per_sequence.sum())
    if reduction == "sequence":
        scale = 1.0 / per_sequence.clamp(min=1).double()
        weights = mask.double() * scale[segments]
    elif reduction == "pack_mean":
        weights = mask.double() / max(total, 1)
    else:
        weights = mask.double()
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    counts = torch.tensor([int((per_sequence > 0).sum()), int(total > 0), total,
                           int(lengths.sum()), int((lengths * lengths).sum())], dtype=torch.long)
    return weights.to(torch.float32), counts


def read_row(row: dict, index: int) -> tuple[torch.Tensor, torch.Tensor]:
    for key in ("input_ids", "labels"):
        if key not in row:
            raise KeyError(f"row {index} has no {key!r} (columns: {sorted(row)}); see DESIGN.md §1-2")
    input_ids = as_long_tensor(row["input_ids"], "input_ids")
    labels = as_long_tensor(row["labels"], "labels")
    if len(input_ids) != len(labels) or len(input_ids) == 0:
        raise ValueError(f"row {index}: {len(input_ids)} input_ids vs {len(labels)} labels (need equal, > 0)")
    return input_ids, labels


class PackCollator:
    """Pack rows -> one flat batch (DESIGN.md §3); several packs are concatenated.

    Weights are computed per pack before concatenating, so `pack_mean` still averages within
    each pack. Output: input_ids, labels, position_ids, loss_weights (1, T); cu_seq_lens_q and
    cu_seq_lens_k (n+1,) int32; max_length_q and max_length_k (int); batch_counts.
    """

    def __init__(self, reduction: str):
        check_reduction(reduction)
        self.reduction = reduction

    def __call__(self, rows: Sequence[dict]) -> dict:
        if not rows:
            raise ValueError("empty batch")
        ids, labels, weights, positions, ends = [], [], [], [], []
        counts = torch.zeros(len(COUNT_FIELDS), dtype=torch.long)
        offset = 0
        for index, row in enumerate(rows):
            row_ids, row_labels = read_row(row, index)
            if "cu_seqlens" not in row:
                raise KeyError(f"pack row {index} has no 'cu_seqlens' (is --train_file/pack a sort_and_group.py pack?)")
            cu = as_long_tensor(row["cu_seqlens"], "cu_seqlens")
            check_cu_seqlens(cu, len(row_ids))
            row_weights, row_counts = pack_weights_and_counts(row_labels, cu, self.reduction)
            ids.append(row_ids)
            labels.append(row_labels)
            weights.append(row_weights)
            positions.append(positions_from_cu_seqlens(cu, len(row_ids))[0])
            ends.append(cu[1:] + offset)
            offset += len(row_ids)
            counts += row_counts
        cu_seqlens = torch.cat([torch.zeros(1, dtype=torch.long)] + ends).to(torch.int32)
        longest = int((cu_seqlens[1:] - cu_seqlens[:-1]).max())
        return {"input_ids": torch.cat(ids)[None], "labels": torch.cat(labels)[None],
                "position_ids": torch.cat(positions)[None], "loss_weights": torch.cat(weights)[None],
                "cu_seq_lens_q": cu_seqlens, "cu_seq_lens_k": cu_seqlens,
                "max_length_q": longest, "max_length_k": longest, COUNTS_KEY: counts}


class PaddedCollator:
    """Sequence rows -> a batch padded on the right to the longest row (naive and sort).

    Output: input_ids (pad_token_id), labels (IGNORE_INDEX), attention_mask, loss_weights
    (0 on padding), all (B, L); batch_counts. Each row is its own pack, so pack_mean == sequence.
    """

    def __init__(self, reduction: str, pad_token_id: int):
        check_reduction(reduction)
        if not isinstance(pad_token_id, int) or pad_token_id < 0:
            raise ValueError(f"pad_token_id must be a non-negative int, got {pad_token_id!r}")
        self.reduction = reduction
        self.pad_token_id = pad_token_id

    def __call__(self, rows: Sequence[dict]) -> dict:
        if not rows:
            raise ValueError("empty batch")
        parsed = [read_row(row, index) for index, row in enumerate(rows)]
        longest = max(len(ids) for ids, _ in parsed)
        shape = (len(parsed), longest)
        input_ids = torch.full(shape, self.pad_token_id, dtype=torch.long)
        labels = torch.full(shape, IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros(shape, dtype=torch.long)
        loss_weights = torch.zeros(shape, dtype=torch.float32)
        counts = torch.zeros(len(COUNT_FIELDS), dtype=torch.long)
        for b, (row_ids, row_labels) in enumerate(parsed):
            n = len(row_ids)
            cu = torch.tensor([0, n])
            row_weights, row_counts = pack_weights_and_counts(row_labels, cu, self.reduction)
            input_ids[b, :n], labels[b, :n], attention_mask[b, :n] = row_ids, row_labels, 1
            loss_weights[b, :n] = row_weights
            counts += row_counts
        return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask,
                "loss_weights": loss_weights, COUNTS_KEY: counts}


def build_collator(batch_method: str, reduction: str, pad_token_id: int | None = None):
    """The collator of `batch_method` (pad_token_id is needed for naive and sort)."""
    if batch_method == "pack":
        return PackCollator(reduction)
    if batch_method in ("naive", "sort"):
        if pad_token_id is None:
            raise ValueError(f"--batch_method {batch_method} pads batches: a pad token id is needed")
        return PaddedCollator(reduction, pad_token_id)
    raise ValueError(f"--batch_method must be one of {BATCH_METHODS}, got {batch_method!r}")
