"""Collators: dataset rows (DESIGN.md §1-2) -> model batches (DESIGN.md §3) with loss weights.

Target positions and N_k (the targets of sequence k) are those of `longalign.pack_geometry`.

Loss weights w_i (on target positions, 0 elsewhere), one per `--loss_reduction`:
    sequence  : w_i = 1 / N_k          (k the sequence of i; paper Eq. 2 once divided by K)
    pack_mean : w_i = 1 / sum_k N_k    (sum over the pack, or the padded row, i belongs to)
    token     : w_i = 1
The model returns S = sum_i w_i l_i (loss_aggregation="sum"); the trainer divides by a global
count D (longalign/train/trainer.py). Weights are computed from labels and cu_seqlens
(`longalign.pack_geometry`), except the `sequence` weights of a pack row that stores them: its
`loss_weights` column (sort_and_group.py's 1/N_k, as the original trained from its stored
weights; train.py validates it against the labels before the first step) is read as it is.

A pack batch carries its geometry under transformers' packed-attention keyword names
(`FlashAttentionKwargs`, as `DataCollatorWithFlattening(return_flash_attn_kwargs=True)` emits
them): `cu_seq_lens_q` = `cu_seq_lens_k` = [0, e_1, ..., T] (int32) and `max_length_q` =
`max_length_k` = the longest sequence (int). The dataset column keeps its name `cu_seqlens`.

Every batch also carries `batch_counts` (int64, fields COUNT_FIELDS) for the trainer's global
denominators and throughput logs; the trainer removes it before calling the model.

`OriginalWarmup` (train.py --original_warmup_packs) reproduces the original code's first packs,
cut and with doubled weights (README differences).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from longalign.constants import IGNORE_INDEX
from longalign.pack_geometry import (longest_sequence, positions_from_cu_seqlens, sequence_lengths,
                                     sequence_starts, sequence_token_weights, target_mask, targets_per_sequence)

LOSS_REDUCTIONS = ("sequence", "pack_mean", "token")
BATCH_METHODS = ("naive", "sort", "pack")
COUNTS_KEY = "batch_counts"
# sequences with >= 1 target | packs (padded rows) with >= 1 target | target positions |
# real (non-pad) tokens | sum over sequences of length^2 (attention work)
COUNT_FIELDS = ("sequences", "packs", "target_tokens", "tokens", "sum_sq_lengths")
WORK_FIELDS = ("tokens", "sum_sq_lengths")  # what a pack costs, as opposed to what its loss counts
STORED_WEIGHTS_KEY = "loss_weights"  # a pack row's 1/N_k column (DESIGN.md §2), read for `sequence`
ROW_INDEX_KEY = "row_index"  # a pack's index in the stored order (`with_row_index`)
# The original's dataset.py: `if idx < 32: max_length_tmp = 32768 ... self.weights[idx, :32768] * 2`
ORIGINAL_WARMUP_PACKS = 32
ORIGINAL_WARMUP_TOKENS = 32768
ORIGINAL_WARMUP_WEIGHT_SCALE = 2.0


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


def pack_weights_and_counts(labels: torch.Tensor, cu_seqlens: torch.Tensor, reduction: str,
                            stored_weights=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Loss weights (float32) of one pack and its counts (int64, COUNT_FIELDS).

    `stored_weights`: the pack row's `loss_weights` column (sort_and_group.py's 1/N_k, checked
    against these labels by `longalign.data.validation`), used as the `sequence` weights when given.

    labels=[-100 5 6 | -100 7], cu_seqlens=[0 3 5]: N = [2, 1]
        sequence -> [0 .5 .5 | 0 1];  pack_mean -> [0 1/3 1/3 | 0 1/3];  token -> [0 1 1 | 0 1]
    """
    check_reduction(reduction)
    mask = target_mask(labels, sequence_starts(cu_seqlens))
    per_sequence = targets_per_sequence(mask, cu_seqlens)
    total = int(per_sequence.sum())
    if reduction == "sequence" and stored_weights is not None:
        weights = stored_loss_weights(stored_weights, len(labels))
    elif reduction == "sequence":
        weights = sequence_token_weights(labels, cu_seqlens)
    elif reduction == "pack_mean":
        weights = mask.double() / max(total, 1)
    else:
        weights = mask.double()
    lengths = sequence_lengths(cu_seqlens).long()
    counts = torch.tensor([int((per_sequence > 0).sum()), int(total > 0), total,
                           int(lengths.sum()), int((lengths * lengths).sum())], dtype=torch.long)
    return weights.to(torch.float32), counts


def stored_loss_weights(values, length: int) -> torch.Tensor:
    weights = torch.as_tensor(values, dtype=torch.float32)
    if weights.shape != (length,):
        raise ValueError(f"loss_weights: expected {length} values (one per label), got shape {tuple(weights.shape)}")
    return weights


def read_row(row: dict, index: int) -> tuple[torch.Tensor, torch.Tensor]:
    for key in ("input_ids", "labels"):
        if key not in row:
            raise KeyError(f"row {index} has no {key!r} (columns: {sorted(row)}); see DESIGN.md §1-2")
    input_ids = as_long_tensor(row["input_ids"], "input_ids")
    labels = as_long_tensor(row["labels"], "labels")
    if len(input_ids) != len(labels) or len(input_ids) == 0:
        raise ValueError(f"row {index}: {len(input_ids)} input_ids vs {len(labels)} labels (need equal, > 0)")
    return input_ids, labels


def with_row_index(dataset):
    """`dataset` (a datasets.Dataset) with a column ROW_INDEX_KEY = 0, 1, ... (stored order)."""
    return dataset.add_column(ROW_INDEX_KEY, list(range(len(dataset))))


@dataclass(frozen=True)
class OriginalWarmup:
    """The original's first packs (its dataset.py), a memory saver for its first steps.

    The packs at stored index < `packs` are cut to their first `tokens` tokens (a sequence that
    crosses the cut keeps its head). With `sequence` weights, their 1/N_k (N_k of the uncut
    sequences) are multiplied by `weight_scale` and the step's K still counts the sequences of
    the uncut packs (the original's `nums`, summed from the stored weights); with `pack_mean` the
    original took the plain token mean of the cut pack, which the cut row gives.

        tokens=4, row [a b c | d e f] (cu [0 3 6]), sequence weights [0 .5 .5 | 0 .5 .5]
        -> row [a b c | d] (cu [0 3 4]), weights [0 1 1 | 0], counts: 2 sequences, 4 tokens
    """

    packs: int = ORIGINAL_WARMUP_PACKS
    tokens: int = ORIGINAL_WARMUP_TOKENS
    weight_scale: float = ORIGINAL_WARMUP_WEIGHT_SCALE
    reductions = ("sequence", "pack_mean")  # the original's two pack losses (--pack_loss or not)

    def applies(self, row: dict, index: int) -> bool:
        if ROW_INDEX_KEY not in row:
            raise KeyError(f"pack row {index} has no {ROW_INDEX_KEY!r}: wrap the dataset with with_row_index()")
        return int(row[ROW_INDEX_KEY]) < self.packs

    def cut(self, ids: torch.Tensor, labels: torch.Tensor, cu: torch.Tensor, reduction: str, stored_weights=None):
        """(ids, labels, cu_seqlens, weights, counts) of one warm-up pack."""
        full_weights, full_counts = pack_weights_and_counts(labels, cu, reduction, stored_weights)
        if len(ids) > self.tokens:
            ids, labels = ids[:self.tokens], labels[:self.tokens]
            cu = torch.cat([cu[cu < self.tokens], torch.tensor([self.tokens])])
        weights, counts = pack_weights_and_counts(labels, cu, reduction)
        if reduction == "sequence":
            weights = full_weights[:len(ids)] * self.weight_scale
            work = [COUNT_FIELDS.index(field) for field in WORK_FIELDS]
            full_counts[work] = counts[work]  # the loss counts the uncut packs, the work is the cut one
            counts = full_counts
        return ids, labels, cu, weights, counts


class PackCollator:
    """Pack rows -> one flat batch (DESIGN.md §3); several packs are concatenated.

    Weights are computed per pack before concatenating, so `pack_mean` still averages within
    each pack. Output: input_ids, labels, position_ids, loss_weights (1, T); cu_seq_lens_q and
    cu_seq_lens_k (n+1,) int32; max_length_q and max_length_k (int); batch_counts.
    `warmup`: the original's first packs (OriginalWarmup); rows then need ROW_INDEX_KEY.
    """

    def __init__(self, reduction: str, warmup: OriginalWarmup | None = None):
        check_reduction(reduction)
        if warmup is not None and reduction not in warmup.reductions:
            raise ValueError(f"the original's warm-up packs exist for the reductions {warmup.reductions}, "
                             f"not {reduction!r}")
        self.reduction = reduction
        self.warmup = warmup

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
            stored = row.get(STORED_WEIGHTS_KEY)
            if self.warmup is not None and self.warmup.applies(row, index):
                row_ids, row_labels, cu, row_weights, row_counts = self.warmup.cut(row_ids, row_labels, cu,
                                                                                   self.reduction, stored)
            else:
                row_weights, row_counts = pack_weights_and_counts(row_labels, cu, self.reduction, stored)
            ids.append(row_ids)
            labels.append(row_labels)
            weights.append(row_weights)
            positions.append(positions_from_cu_seqlens(cu, len(row_ids))[0])
            ends.append(cu[1:] + offset)
            offset += len(row_ids)
            counts += row_counts
        cu_seqlens = torch.cat([torch.zeros(1, dtype=torch.long)] + ends).to(torch.int32)
        longest = longest_sequence(cu_seqlens)
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


def build_collator(batch_method: str, reduction: str, pad_token_id: int | None = None,
                   original_warmup: bool = False):
    """The collator of `batch_method` (pad_token_id is needed for naive and sort);
    `original_warmup`: pack only, the original's first packs (OriginalWarmup)."""
    if original_warmup and batch_method != "pack":
        raise ValueError(f"--original_warmup_packs cuts packs: it needs --batch_method pack, not {batch_method}")
    if batch_method == "pack":
        return PackCollator(reduction, OriginalWarmup() if original_warmup else None)
    if batch_method in ("naive", "sort"):
        if pad_token_id is None:
            raise ValueError(f"--batch_method {batch_method} pads batches: a pad token id is needed")
        return PaddedCollator(reduction, pad_token_id)
    raise ValueError(f"--batch_method must be one of {BATCH_METHODS}, got {batch_method!r}")
