"""Tokenized sequences as flat Arrow columns: loading, validation and the too-long policy.

`sort_and_group.py` reads a dataset written by pre_tokenize.py (DESIGN.md §1) and never loops
over tokens in Python: lengths and target counts come from the Arrow list offsets and a numpy
pass over the flat label values, and rows are gathered as one numpy slice per sequence
from the memory-mapped values.

Policies (each counted in the returned `counts`, never applied silently):
- a sequence longer than `max_length`: `truncate` keeps its first `max_length` tokens,
  `skip` leaves it out, `error` stops before anything is written;
- an empty sequence (0 tokens) carries nothing to train on and is left out;
- a sequence without target tokens (all labels IGNORE_INDEX, possibly after truncation) is kept
  with zero loss weight, so nothing is lost and no 1/N_k divides by zero (counted:
  `sequences_without_targets`, `truncated_lost_all_targets`; sort_and_group.py warns);
- no sequence with a target at all (`check_has_targets`, e.g. --max_length 1): an error, nothing
  written.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from longalign.constants import TOKEN_COLUMNS
from longalign.pack_geometry import target_mask
from longalign.storage import OUTPUT_MARKER, read_output_marker, write_json_atomic

TOO_LONG_POLICIES = ("truncate", "skip", "error")


@dataclass
class FlatColumn:
    """One list column as flat numpy values per Arrow chunk plus, per row, where it starts."""

    values: list[np.ndarray]  # zero-copy views of each chunk's flat values (memory-mapped)
    chunk: np.ndarray  # per row: index of its chunk
    start: np.ndarray  # per row: offset of its first token in that chunk's values

    @classmethod
    def from_arrow(cls, column: pa.ChunkedArray) -> "FlatColumn":
        values, chunk_ids, starts = [], [], []
        for index, chunk in enumerate(column.chunks):
            flat = chunk.flatten()  # respects slicing of the chunk
            if flat.null_count:
                raise ValueError(f"a list column has {flat.null_count} null tokens")
            lengths = row_lengths(pa.chunked_array([chunk]))
            values.append(flat.to_numpy(zero_copy_only=False))
            chunk_ids.append(np.full(len(lengths), index, dtype=np.int64))
            starts.append(np.cumsum(lengths) - lengths)
        empty = np.zeros(0, dtype=np.int64)
        return cls(values, np.concatenate(chunk_ids) if values else empty,
                   np.concatenate(starts) if values else empty)

    def gather(self, rows: np.ndarray, lengths: np.ndarray) -> np.ndarray:
        """The first `lengths[i]` tokens of each row in `rows`, concatenated, as int32.

        One numpy slice per row (never a per-token index): memcpy speed, only the output is
        allocated. Taking a prefix is how truncation keeps the first max_length tokens.
        """
        pieces = [self.values[c][s:s + n] for c, s, n in zip(
            self.chunk[rows].tolist(), self.start[rows].tolist(), np.asarray(lengths).tolist())]
        tokens = np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.int32)
        return as_int32(tokens)


@dataclass
class TokenSequences:
    """The sequences kept for training: source `rows`, `lengths` after the too-long policy and
    `num_targets` (labels != IGNORE_INDEX within those lengths)."""

    columns: dict[str, FlatColumn]
    rows: np.ndarray
    lengths: np.ndarray
    num_targets: np.ndarray

    def gather(self, name: str, positions: np.ndarray) -> np.ndarray:
        """Flat int32 tokens of column `name` for the sequences at `positions`, in that order."""
        return self.columns[name].gather(self.rows[positions], self.lengths[positions])

    def take(self, positions: np.ndarray) -> dict[str, pa.Array]:
        """The sequences at `positions` (in that order) as list<int32> columns input_ids, labels."""
        offsets = pa.array(np.concatenate([[0], np.cumsum(self.lengths[positions])]).astype(np.int32))
        return {name: pa.ListArray.from_arrays(offsets, pa.array(self.gather(name, positions)))
                for name in self.columns}


def as_int32(tokens: np.ndarray) -> np.ndarray:
    """`tokens` as int32 (DESIGN.md §1); an out-of-range id is an error, not a wrap-around."""
    if tokens.dtype == np.int32:
        return tokens
    info = np.iinfo(np.int32)
    if tokens.size and (tokens.min() < info.min or tokens.max() > info.max):
        raise ValueError("token values outside the int32 range")
    return tokens.astype(np.int32)


def load_token_table(path: str | Path) -> pa.Table:
    """Open a pre_tokenize.py dataset directory and check its columns; raise a clear error."""
    import datasets

    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"--train_file {path}: no such dataset directory")
    check_has_rows(path)
    try:
        dataset = datasets.load_from_disk(str(path))
    except FileNotFoundError as err:
        raise FileNotFoundError(f"--train_file {path}: not a dataset saved with save_to_disk ({err})") from err
    if not isinstance(dataset, datasets.Dataset):
        raise ValueError(f"--train_file {path}: expected one Dataset, found {type(dataset).__name__}")
    if dataset._indices is not None:  # a selected/shuffled view: make rows physical
        dataset = dataset.flatten_indices()
    table = dataset.data.table
    check_token_columns(table, path)
    return table


def grouped_output_reasons(path: str | Path, table: pa.Table, stage: str) -> list[str]:
    """Why the dataset at `path` is itself a sorted/packed output of `stage` (empty: it is not)."""
    path = Path(path)
    reasons = []
    if "cu_seqlens" in table.column_names:
        reasons.append("its rows carry cu_seqlens (each row is a pack of sequences)")
    if (read_output_marker(path) or {}).get("stage") == stage:
        reasons.append(f"its {OUTPUT_MARKER} names {stage} as its writer")
    try:
        stats = json.loads((path / "stats.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        stats = None
    if isinstance(stats, dict) and "pair_id" in stats:
        reasons.append(f"its stats.json has the pair_id {stage} writes")
    return reasons


def check_not_grouped_output(path: str | Path, table: pa.Table, stage: str) -> None:
    """Refuse a sort/ or pack/ output as input: its packs would be re-packed as single sequences
    (attention and 1/N_k crossing sequence boundaries), written into a nested sort/ and pack/."""
    reasons = grouped_output_reasons(path, table, stage)
    if reasons:
        raise ValueError(f"--train_file {path} is a {stage} output ({'; '.join(reasons)}): sorting or packing it "
                         "again would treat each pack as one sequence. Give the pre_tokenize.py dataset it was "
                         f"made from (--train_file {Path(path).parent}); nothing written")


def check_has_rows(path: Path) -> None:
    """An empty dataset has no Arrow file, and datasets' load_from_disk fails on it with an IndexError."""
    try:
        data_files = json.loads((path / "state.json").read_text(encoding="utf-8")).get("_data_files")
    except (OSError, ValueError):
        return  # not a save_to_disk folder: load_from_disk says so
    if data_files == []:
        raise ValueError(f"--train_file {path}: the dataset has no rows (nothing to sort or pack)")


def check_token_columns(table: pa.Table, where: str | Path) -> None:
    """Raise ValueError unless `table` has integer-list columns input_ids and labels."""
    missing = [name for name in TOKEN_COLUMNS if name not in table.column_names]
    if missing:
        raise ValueError(f"{where}: missing column(s) {missing}; found {table.column_names} "
                         f"(expected a dataset written by pre_tokenize.py, DESIGN.md §1)")
    for name in TOKEN_COLUMNS:
        column_type = table.schema.field(name).type
        is_list = pa.types.is_list(column_type) or pa.types.is_large_list(column_type)
        if not is_list or not pa.types.is_integer(column_type.value_type):
            raise ValueError(f"{where}: column {name!r} has type {column_type}, expected a list of integers")
        if table.column(name).null_count:
            raise ValueError(f"{where}: column {name!r} has {table.column(name).null_count} null rows")


def row_lengths(column: pa.ChunkedArray) -> np.ndarray:
    """Length of every list in `column`, read from the Arrow offsets (no token is touched)."""
    return pc.list_value_length(column).to_numpy(zero_copy_only=False).astype(np.int64)


def count_targets(labels: FlatColumn, full_lengths: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Per row, labels != IGNORE_INDEX among its first `lengths` tokens, the first token excluded.

    The model shifts labels by one within each sequence, so a sequence's first label is never
    predicted; leaving it out makes N_k (and 1/N_k) match the positions the loss uses (the same
    rule: `longalign.pack_geometry.target_mask`). One vectorised reduceat per chunk over whole
    rows; only the (few) rows cut shorter than `full_lengths` by truncation are recounted.
    """
    counts = np.zeros(len(full_lengths), dtype=np.int64)
    for index, values in enumerate(labels.values):
        rows = np.flatnonzero((labels.chunk == index) & (full_lengths > 0))  # starts must increase
        if rows.size:
            is_target = target_mask(values, labels.start[rows])
            counts[rows] = np.add.reduceat(is_target, labels.start[rows], dtype=np.int64)
    for row in np.flatnonzero(lengths < full_lengths).tolist():
        prefix = labels.values[labels.chunk[row]][labels.start[row]:labels.start[row] + lengths[row]]
        counts[row] = int(target_mask(prefix, [0]).sum())
    return counts


def prepare_sequences(table: pa.Table, max_length: int, too_long: str) -> tuple[TokenSequences, dict]:
    """Apply the empty / too-long / no-target policies; return the kept sequences and counts."""
    if too_long not in TOO_LONG_POLICIES:
        raise ValueError(f"--too_long must be one of {TOO_LONG_POLICIES}, got {too_long!r}")
    if max_length < 1:
        raise ValueError(f"--max_length must be >= 1, got {max_length}")
    full_lengths = row_lengths(table.column("input_ids"))
    mismatched = np.flatnonzero(full_lengths != row_lengths(table.column("labels")))
    if mismatched.size:
        raise ValueError(f"{mismatched.size} rows have len(labels) != len(input_ids) "
                         f"(first rows: {mismatched[:5].tolist()})")
    too_long_rows = np.flatnonzero(full_lengths > max_length)
    if too_long_rows.size and too_long == "error":
        raise ValueError(f"{too_long_rows.size} sequences are longer than --max_length {max_length} "
                         f"(first rows: {too_long_rows[:5].tolist()}); use --too_long truncate|skip")
    columns = {name: FlatColumn.from_arrow(table.column(name)) for name in TOKEN_COLUMNS}
    keep = full_lengths > 0
    lengths = full_lengths
    if too_long == "skip":
        keep &= full_lengths <= max_length
    else:  # truncate (error has raised above): keep the first max_length tokens
        lengths = np.minimum(full_lengths, max_length)
    num_targets = count_targets(columns["labels"], full_lengths, lengths)
    truncated = too_long_rows if too_long == "truncate" else too_long_rows[:0]
    counts = {"input_rows": int(len(full_lengths)), "empty_skipped": int((full_lengths == 0).sum()),
              "too_long": int(too_long_rows.size), "too_long_policy": too_long,
              "too_long_truncated": int(truncated.size),
              "too_long_skipped": int(too_long_rows.size) if too_long == "skip" else 0,
              "truncated_tokens_dropped": int((full_lengths[truncated] - max_length).sum()),
              "truncated_lost_all_targets": int((num_targets[truncated] == 0).sum())}
    rows = np.flatnonzero(keep)
    if rows.size == 0:
        raise ValueError(f"no sequences left to write after the policies: {counts}")
    sequences = TokenSequences(columns, rows, lengths[rows], num_targets[rows])
    counts.update(sequences=int(rows.size), tokens=int(sequences.lengths.sum()),
                  sequences_without_targets=int((sequences.num_targets == 0).sum()))
    return sequences, counts


def check_has_targets(sequences: TokenSequences, counts: dict, where: str | Path, max_length: int) -> None:
    """Refuse sequences none of which keeps a target token: an output with nothing to train on."""
    if int(sequences.num_targets.sum()) == 0:
        raise ValueError(
            f"--train_file {where}: none of the {counts['sequences']} sequences keeps a target token with "
            f"--max_length {max_length} ({counts['truncated_lost_all_targets']} lost all their targets to "
            "truncation): nothing to train on, nothing written. Use a --max_length that keeps the replies")


def write_table(table: pa.Table, folder: str | Path, stats: dict) -> None:
    """Write `table` as a datasets Arrow directory plus stats.json into the existing `folder`."""
    import datasets

    # An explicit fingerprint: without one, datasets hashes the whole in-memory table (seconds
    # and a full extra copy for gigabytes of tokens). It only names caches, so hashing the stats
    # (input path, seed, policies, counts) is enough.
    fingerprint = hashlib.sha256(json.dumps(stats, sort_keys=True).encode()).hexdigest()[:16]
    datasets.Dataset(table, fingerprint=fingerprint).save_to_disk(str(folder))
    write_json_atomic(Path(folder) / "stats.json", stats)


def format_stats_table(title: str, stats: dict) -> str:
    """Two aligned columns `key  value` (nested dicts as compact JSON) for the console."""
    width = max(len(key) for key in stats)
    lines = [f"== {title} =="]
    for key, value in stats.items():
        shown = json.dumps(value) if isinstance(value, (dict, list)) else value
        if isinstance(value, float):
            shown = f"{value:.4f}"
        lines.append(f"  {key:<{width}}  {shown}")
    return "\n".join(lines)
