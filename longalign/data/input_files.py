"""What a --long / --short value names, and reading its rows (data/README.md shows each form).

A value is
- a file: JSONL (one row per line), a JSON array of rows, or parquet, each of them gzip'd or not.
  The container is told from the content, not the name: gzip and parquet by their magic bytes, a
  JSON array by its first non-blank character '[' (a `.json` file holding JSONL reads as JSONL);
- a Hugging Face dataset: a hub id `org/name` or `org/name:split`, or a local dataset folder
  (`folder` or `folder:split`), loaded with `datasets.load_dataset(name, split=split)` (default
  split `train`). A value that names no file is a dataset id only if it looks like one (`org/name`,
  not ending in a data-file suffix), so a mistyped file path is an error, never a download.
Rows are in the messages or the ShareGPT format (`longalign.data.conversations`). A source that cannot
be read as a whole (broken gzip or parquet, a malformed JSON array, no row that is a
conversation) is an `UnreadableSourceError` naming the file and what was expected.
"""
from __future__ import annotations

import gzip
import io
import json
import os
import re
import zlib
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from longalign.data.conversations import (UTF8_BOM, Conversation, SourceRows, drop_byte_order_mark, keep_row, read_lines,
                                     read_rows, validate_row)

JSONL, JSON_ARRAY, PARQUET, HF_DATASET = "jsonl", "json_array", "parquet", "hf_dataset"  # containers
GZIP = "gzip"
GZIP_MAGIC, PARQUET_MAGIC = b"\x1f\x8b", b"PAR1"
DEFAULT_SPLIT = "train"
DATA_FILE_SUFFIXES = (".jsonl", ".json", ".gz", ".parquet", ".txt", ".csv")  # never taken for a dataset id
_DATASET_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_SPLIT = re.compile(r"^[\w.-]+$")
_JSON_SPACE = re.compile(r"[ \t\n\r]*")  # JSON's whitespace
_JSON_ARRAY_START = re.compile(rb"[ \t\n\r]*\[")
PARQUET_BATCH_ROWS = 256
EXPECTED = ("JSONL (one row per line), a JSON array of rows or parquet, gzip'd or not, or a Hugging Face "
            "dataset (org/name[:split] or a local dataset folder), with rows in the messages format "
            "({\"messages\": [{\"role\", \"content\"}]}) or the ShareGPT format ({\"conversations\": "
            "[{\"from\", \"value\"}]}); see data/README.md")
DATA_HELP = "see data/README.md for the input formats and how to obtain LongAlign-10k and ShareGPT"


class UnreadableSourceError(ValueError):
    """A source that cannot be read as a whole (names the file and what was expected)."""


@dataclass(frozen=True)
class SourceSpec:
    """What a --long / --short value names: a file, or a dataset (hub id or local folder)."""

    value: str  # as given
    kind: str  # "file" or "dataset"
    path: str  # the file, the hub id, or the dataset folder
    split: str | None = None  # datasets: the split asked for (None: DEFAULT_SPLIT)

    def identity(self) -> tuple:
        """Equal for two specs that name the same data (the same file through any path)."""
        local = self.kind == "file" or Path(self.path).is_dir()
        where = os.path.realpath(self.path) if local else self.path
        return (self.kind, where) if self.kind == "file" else (self.kind, where, self.split or DEFAULT_SPLIT)


def parse_source(value: str, what: str) -> SourceSpec:
    """A file, a local dataset folder (`folder[:split]`) or a hub id (`org/name[:split]`)."""
    if Path(value).is_file():
        return SourceSpec(value, "file", value)
    name, colon, split = value.rpartition(":")
    if not colon or not _SPLIT.match(split):
        name, split = value, None
    if Path(name).is_dir():
        return SourceSpec(value, "dataset", name, split)
    looks_like_id = _DATASET_ID.match(name) and not name.lower().endswith(DATA_FILE_SUFFIXES)
    if looks_like_id and not name.startswith("."):
        return SourceSpec(value, "dataset", name, split)
    raise FileNotFoundError(f"{what} data file not found: {value}; {DATA_HELP} "
                            "(or run `python -m longalign.demo.data --out DIR` for demo data)")


def read_source(spec: SourceSpec, limit: int | None = None, strict: bool = False,
                dataset_hint: str = "") -> SourceRows:
    """The first `limit` rows of `spec` (all when None), validated."""
    if spec.kind == "dataset":
        return read_dataset(spec, limit, strict, dataset_hint)
    return read_file(spec.path, limit, strict)


# ---- files ----------------------------------------------------------------------------------
def read_file(path: str, limit: int | None = None, strict: bool = False) -> SourceRows:
    """A JSONL, JSON-array or parquet file, gzip'd or not (told from the content)."""
    with open(path, "rb") as f:
        compressed = f.read(len(GZIP_MAGIC)) == GZIP_MAGIC
    source = SourceRows(origin=str(path), compression=GZIP if compressed else None)
    try:
        with (gzip.open(path, "rb") if compressed else open(path, "rb")) as stream:
            start = stream.peek(1 << 16)[:1 << 16]
            if start.startswith(PARQUET_MAGIC):
                source.container, source.unit = PARQUET, "row"
                return _read_parquet(io.BytesIO(stream.read()) if compressed else path, source, limit, strict)
            if _JSON_ARRAY_START.match(start.removeprefix(UTF8_BOM)):
                source.container = JSON_ARRAY
                return _read_json_array(stream.read(), source, limit, strict)
            return read_lines(stream, source, limit, strict)
    except (gzip.BadGzipFile, EOFError, zlib.error) as err:
        raise UnreadableSourceError(f"{path}: a gzip file that cannot be read to its end ({type(err).__name__}: "
                                    f"{err}); expected {EXPECTED}") from err


def _line_counter(text: str):
    """line_of(position) for increasing positions of `text` (1-based lines)."""
    state = {"pos": 0, "line": 1}

    def line_of(position: int) -> int:
        state["line"] += text.count("\n", state["pos"], position)
        state["pos"] = position
        return state["line"]
    return line_of


def _json_text(data: bytes, source: SourceRows, strict: bool) -> str:
    if data.startswith(UTF8_BOM):
        data = drop_byte_order_mark(source, data, strict)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data[:err.start].count(b"\n") + 1
        raise UnreadableSourceError(f"{source.origin}:{line}: not UTF-8 ({err.reason} at byte {err.start}); a JSON "
                                    f"array is read as a whole; expected {EXPECTED}") from err


def _read_json_array(data: bytes, source: SourceRows, limit: int | None, strict: bool) -> SourceRows:
    """Rows of a JSON array, element by element; each row's number is the line it starts on."""
    text, decoder = _json_text(data, source, strict), json.JSONDecoder()
    line_of = _line_counter(text)
    pos = _JSON_SPACE.match(text).end() + 1  # after '['
    while True:
        pos = _JSON_SPACE.match(text, pos).end()
        if text.startswith("]", pos) and not source.rows:
            break
        if limit is not None and len(source.rows) >= limit:
            return source  # available stays unknown: the rest is not read
        try:
            row, end = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as err:
            raise UnreadableSourceError(f"{source.origin}:{err.lineno}:{err.colno}: malformed JSON array ({err.msg}); "
                                        f"a JSON array is read as a whole; expected {EXPECTED}") from err
        keep_row(source, validate_row(row, line_of(pos)), strict)
        pos = _JSON_SPACE.match(text, end).end()
        if text.startswith(",", pos):
            pos += 1
            continue
        if not text.startswith("]", pos):
            line = text.count("\n", 0, pos) + 1
            raise UnreadableSourceError(f"{source.origin}:{line}: malformed JSON array (expected ',' or ']' after "
                                        f"a row); expected {EXPECTED}")
        break
    if _JSON_SPACE.match(text, pos + 1).end() != len(text):
        raise UnreadableSourceError(f"{source.origin}: text after the JSON array's closing ']'; expected {EXPECTED}")
    source.available = len(source.rows)
    return source


def _read_parquet(file, source: SourceRows, limit: int | None, strict: bool) -> SourceRows:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(file)
    except (pa.ArrowException, OSError) as err:
        raise UnreadableSourceError(f"{source.origin}: not a readable parquet file ({err}); "
                                    f"expected {EXPECTED}") from err
    source.available = parquet.metadata.num_rows
    number = 0
    for batch in parquet.iter_batches(batch_size=PARQUET_BATCH_ROWS):
        for row in batch.to_pylist():
            if limit is not None and number >= limit:
                return source
            number += 1
            keep_row(source, validate_row(row, number), strict)
    return source


# ---- datasets -------------------------------------------------------------------------------
def read_dataset(spec: SourceSpec, limit: int | None, strict: bool, hint: str = "") -> SourceRows:
    """Rows of a hub dataset or local dataset folder through `datasets.load_dataset`."""
    import datasets

    split = spec.split or DEFAULT_SPLIT
    origin = (spec.path if Path(spec.path).is_dir() else f"hf:{spec.path}") + (f":{spec.split}" if spec.split else "")
    try:
        dataset = datasets.load_dataset(spec.path, split=split)
    except Exception as err:  # re-raised with the context a user needs (offline, no cache, no such split...)
        raise RuntimeError(f"loading the dataset {spec.path!r} (split {split!r}) with datasets.load_dataset failed "
                           f"({type(err).__name__}: {err}). {hint or DATA_HELP}") from err
    total = len(dataset)
    selected = dataset.select(range(min(limit, total))) if limit is not None else dataset
    source = read_rows(iter(selected), origin=origin, total=total, strict=strict)
    source.container = HF_DATASET
    return source


# ---- whole-source checks --------------------------------------------------------------------
def check_usable(source: SourceRows, flag: str) -> None:
    """Refuse a source of which no row read is a conversation (a wrong format, not bad rows)."""
    if not source.rows or any(isinstance(row, Conversation) for row in source.rows):
        return
    kinds = dict(Counter(row.kind for row in source.rows).most_common())
    first = source.rows[0]
    raise UnreadableSourceError(f"{flag} {source.origin}: none of the {len(source.rows)} rows read is a "
                                f"conversation (invalid rows by kind: {kinds}; first: {source.where(first.line)}: "
                                f"{first.reason}); expected {EXPECTED}")


def row_format_counts(source: SourceRows) -> dict[str, int]:
    """Rows read, by row format (messages, sharegpt, none: format not told)."""
    return dict(sorted(Counter(row.row_format for row in source.rows).items()))
