"""Whole-dataset checks before the first training step, vectorised over the Arrow columns.

train.py runs `validate_training_dataset` on the dataset it is about to train on, so a corrupt row
is reported at start-up with its dataset row number instead of hours later, when its batch is
built, as "row 0" of that batch. Checked for every row (DESIGN.md §1-2):
- `input_ids` and `labels`: no nulls, same length, > 0 tokens (<= `max_length` when given);
  ids in [0, vocab_size); labels IGNORE_INDEX or in [0, vocab_size);
- pack rows, `cu_seqlens`: [0, e1, ..., T] strictly increasing, T the row's length;
- pack rows, `num_sequences` (when stored): the sequences with >= 1 target (a target: a position
  after its sequence's start whose label is not IGNORE_INDEX, as `longalign.pack_geometry.target_mask`);
- pack rows, `loss_weights` (when stored): as long as labels, 1/N_k on the targets of sequence k
  (relative tolerance WEIGHT_RTOL) and 0 elsewhere.
A `cu_seqlens` collapsed to [0, T] therefore fails on `num_sequences` / the weights.
A dataset without any target (e.g. sort_and_group.py --max_length 1) is refused: nothing to train on.

`check_sort_pack_pair` refuses sort/ and pack/ written by different sort_and_group.py runs.
Rows are read in slices of ROWS_PER_SLICE, so temporaries stay a few bytes per token of a slice.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from longalign.constants import IGNORE_INDEX, TOKEN_COLUMNS
from longalign.pack_geometry import sequence_token_weights, target_mask, targets_per_sequence

ROWS_PER_SLICE = 256  # 256 packs of 64k tokens: ~16M tokens of temporaries at a time
WEIGHT_RTOL = 1e-6  # float32 storage of 1/N_k
_SHOWN_ROWS = 5  # bad rows named in a message


class DatasetValidationError(ValueError):
    """A training dataset row breaks DESIGN.md §1-2; the message names the dataset row."""


@dataclass
class _Slice:
    """Flat numpy views of one slice of rows (`first_row` = its first dataset row)."""

    first_row: int
    lengths: np.ndarray  # tokens per row
    token_starts: np.ndarray  # flat offset of each row's first token (len rows + 1)
    ids: np.ndarray
    labels: np.ndarray

    def rows_of(self, positions: np.ndarray) -> np.ndarray:
        """Dataset rows of flat token positions."""
        return self.first_row + np.searchsorted(self.token_starts, positions, side="right") - 1


def _fail(where: str, check: str, bad_rows: np.ndarray, detail: str = "") -> None:
    rows = np.unique(np.asarray(bad_rows))
    if rows.size == 0:
        return
    shown = ", ".join(str(r) for r in rows[:_SHOWN_ROWS].tolist())
    more = f" and {rows.size - _SHOWN_ROWS} more" if rows.size > _SHOWN_ROWS else ""
    raise DatasetValidationError(f"{where}: row {rows[0]}: {check}{detail} (bad rows: {shown}{more}); "
                                 "rebuild the dataset (pre_tokenize.py / sort_and_group.py)")


def _list_values(column: pa.Array, where: str, name: str, first_row: int) -> tuple[np.ndarray, np.ndarray]:
    """(lengths per row, flat values) of a list column slice; nulls are an error."""
    if column.null_count:
        _fail(where, f"{name} is null", first_row + np.flatnonzero(column.is_null().to_numpy(zero_copy_only=False)))
    lengths = pc.list_value_length(column).to_numpy(zero_copy_only=False).astype(np.int64)
    values = column.flatten()
    if values.null_count:
        starts = np.concatenate([[0], np.cumsum(lengths)])
        positions = np.flatnonzero(values.is_null().to_numpy(zero_copy_only=False))
        _fail(where, f"{name} has a null value", first_row + np.searchsorted(starts, positions, side="right") - 1)
    return lengths, values.to_numpy(zero_copy_only=False)


def _token_slice(batch: pa.RecordBatch, first_row: int, where: str, vocab_size: int,
                 max_length: int | None) -> _Slice:
    ids_len, ids = _list_values(batch.column("input_ids"), where, "input_ids", first_row)
    labels_len, labels = _list_values(batch.column("labels"), where, "labels", first_row)
    rows = first_row + np.arange(len(ids_len))
    _fail(where, "labels and input_ids differ in length", rows[ids_len != labels_len])
    _fail(where, "the row has no tokens", rows[ids_len == 0])
    if max_length is not None:
        _fail(where, f"the row is longer than max_length {max_length}", rows[ids_len > max_length])
    part = _Slice(first_row, ids_len, np.concatenate([[0], np.cumsum(ids_len)]), ids, labels)
    bad_ids = np.flatnonzero((ids < 0) | (ids >= vocab_size))
    _fail(where, f"input_ids outside [0, vocab size {vocab_size})", part.rows_of(bad_ids))
    bad_labels = np.flatnonzero((labels != IGNORE_INDEX) & ((labels < 0) | (labels >= vocab_size)))
    _fail(where, f"labels neither {IGNORE_INDEX} nor in [0, vocab size {vocab_size})", part.rows_of(bad_labels))
    return part


def _check_cu_seqlens(part: _Slice, batch: pa.RecordBatch, where: str) -> tuple[np.ndarray, np.ndarray]:
    """(flat sequence starts, sequences per row) once every row's cu_seqlens is valid."""
    counts, cu = _list_values(batch.column("cu_seqlens"), where, "cu_seqlens", part.first_row)
    rows = part.first_row + np.arange(len(counts))
    _fail(where, "cu_seqlens needs at least [0, T]", rows[counts < 2])
    cu = cu.astype(np.int64)
    cu_starts = np.concatenate([[0], np.cumsum(counts)])
    firsts, lasts = cu[cu_starts[:-1]], cu[cu_starts[1:] - 1]
    _fail(where, "cu_seqlens must start at 0", rows[firsts != 0])
    wrong_end = np.flatnonzero(lasts != part.lengths)
    if wrong_end.size:
        first = wrong_end[0]
        _fail(where, "cu_seqlens must end at the row's length", rows[wrong_end],
              f" (it ends at {lasts[first]}, the row has {part.lengths[first]} tokens)")
    steps = np.diff(cu)
    within_row = np.ones(len(steps), dtype=bool)
    within_row[cu_starts[1:-1] - 1] = False  # the step from one row's T to the next row's 0
    bad_steps = np.flatnonzero(within_row & (steps <= 0))
    _fail(where, "cu_seqlens must be strictly increasing (no empty sequence)",
          part.first_row + np.searchsorted(cu_starts, bad_steps, side="right") - 1)
    is_start = np.ones(len(cu), dtype=bool)
    is_start[cu_starts[1:] - 1] = False  # a row's last entry T starts nothing
    sequences_per_row = counts - 1
    return np.repeat(part.token_starts[:-1], sequences_per_row) + cu[is_start], sequences_per_row


def _check_pack_weights(part: _Slice, batch: pa.RecordBatch, where: str, seq_starts: np.ndarray,
                        sequences_per_row: np.ndarray, targets: np.ndarray) -> None:
    flat_cu = np.append(seq_starts, len(part.labels))
    per_sequence = targets_per_sequence(targets, flat_cu)
    seq_row_starts = np.concatenate([[0], np.cumsum(sequences_per_row)[:-1]])
    rows = part.first_row + np.arange(len(part.lengths))
    names = batch.schema.names
    if "num_sequences" in names:
        stored = batch.column("num_sequences").to_numpy(zero_copy_only=False).astype(np.int64)
        expected = np.add.reduceat(per_sequence > 0, seq_row_starts, dtype=np.int64)
        _fail(where, "num_sequences differs from the sequences with targets in cu_seqlens/labels",
              rows[stored != expected])
    if "loss_weights" in names:
        weight_len, weights = _list_values(batch.column("loss_weights"), where, "loss_weights", part.first_row)
        _fail(where, "loss_weights and labels differ in length", rows[weight_len != part.lengths])
        expected = sequence_token_weights(part.labels, flat_cu)
        wrong = ~(np.abs(weights - expected) <= WEIGHT_RTOL * expected)  # NaN counts as wrong
        _fail(where, "loss_weights are not 1/N_k on the targets of each sequence and 0 elsewhere",
              part.rows_of(np.flatnonzero(wrong)))


def _table_of(dataset) -> pa.Table:
    if isinstance(dataset, pa.Table):
        return dataset
    if getattr(dataset, "_indices", None) is not None:
        dataset = dataset.flatten_indices()
    return dataset.data.table


def dataset_directory(dataset) -> Path:
    """The folder a `datasets.load_from_disk` dataset was read from (its Arrow files' folder)."""
    files = {Path(f["filename"]).parent for f in dataset.cache_files}
    if len(files) != 1:
        raise ValueError(f"expected a dataset loaded from one folder, found {sorted(map(str, files))}")
    return files.pop()


def validate_training_dataset(dataset, vocab_size: int, pack: bool, where: str,
                              max_length: int | None = None) -> dict:
    """Check every row (module docstring); raise DatasetValidationError naming the first bad row.

    `dataset`: a datasets.Dataset or a pyarrow Table. Returns {"rows", "tokens", "targets"}.
    """
    table = _table_of(dataset)
    needed = list(TOKEN_COLUMNS) + (["cu_seqlens"] if pack else [])
    missing = [name for name in needed if name not in table.column_names]
    if missing:
        raise DatasetValidationError(f"{where}: missing column(s) {missing}; found {table.column_names} "
                                     "(DESIGN.md §1-2)")
    if table.num_rows == 0:
        raise DatasetValidationError(f"{where}: the dataset has no rows")
    columns = needed + [name for name in ("num_sequences", "loss_weights") if pack and name in table.column_names]
    tokens, targets, first_row = 0, 0, 0
    for batch in table.select(columns).to_batches(max_chunksize=ROWS_PER_SLICE):
        part = _token_slice(batch, first_row, where, vocab_size, max_length)
        if pack:
            seq_starts, sequences_per_row = _check_cu_seqlens(part, batch, where)
            mask = target_mask(part.labels, seq_starts)
            _check_pack_weights(part, batch, where, seq_starts, sequences_per_row, mask)
        else:
            mask = target_mask(part.labels, part.token_starts[:-1])
        tokens += int(part.lengths.sum())
        targets += int(mask.sum())
        first_row += batch.num_rows
    if targets == 0:
        raise DatasetValidationError(
            f"{where}: no row has a target token (every label the loss would use is {IGNORE_INDEX}): training "
            "would run at loss 0 and save an unchanged model. Rebuild the dataset (pre_tokenize.py / "
            "sort_and_group.py with a --max_length that keeps the replies)")
    return {"rows": first_row, "tokens": tokens, "targets": targets}


def check_sort_pack_pair(train_file: str | Path) -> None:
    """Refuse <train_file>/sort and /pack whose stats.json come from different sort_and_group.py
    runs (a run killed between its two swaps)."""
    ids = {}
    for name in ("sort", "pack"):
        stats_file = Path(train_file) / name / "stats.json"
        if stats_file.is_file():
            ids[name] = json.loads(stats_file.read_text(encoding="utf-8")).get("pair_id")
    if len(ids) == 2 and ids["sort"] != ids["pack"]:
        raise DatasetValidationError(
            f"{train_file}: sort/ (pair_id {ids['sort']}) and pack/ (pair_id {ids['pack']}) come from different "
            "sort_and_group.py runs (one was interrupted between its two outputs); re-run "
            f"`sort_and_group.py --train_file {train_file}` with the settings you want")
