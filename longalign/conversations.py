"""Reading and validating conversations in the `messages` format.

Input rows (JSONL lines, or rows of the HF dataset THUDM/LongAlign-10k) look like
`{"messages": [{"role": "user", "content": "..."}, {"role": "assistant", "content": "..."}, ...]}`.
A valid row becomes a list of complete `(user, assistant)` rounds; a bad row becomes an
`InvalidRow` carrying its 1-based line number and a reason, so the caller can count and report
it (or stop at it with --strict). Nothing is dropped without being counted.

Two encodings problems legal in JSON are handled here, before any tokenizer sees the text:
- a lone UTF-16 surrogate escape (`"\\ud800"` without its pair) decodes to a str no UTF-8
  encoder (or tokenizer) accepts: the row is invalid (`lone_surrogate`), counted with its line;
- a UTF-8 byte-order mark at the start of a file would make its first line malformed JSON: it
  is removed and counted (`SourceRows.byte_order_mark`); under --strict both stop the run,
  naming file and line.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from longalign.constants import ZERO_WIDTH_CHARS

USER, ASSISTANT = "user", "assistant"
_ZERO_WIDTH_TABLE = str.maketrans({ch: None for ch in ZERO_WIDTH_CHARS})
_DATANUM_PATTERN = re.compile(r"^\s*(\d+)\s*([kK]?)\s*$")
_SURROGATE = re.compile("[\ud800-\udfff]")  # only a lone \\uXXXX escape leaves one in a str
UTF8_BOM = b"\xef\xbb\xbf"

# Kinds of bad rows (keys of the `skipped_invalid_by_kind` counts).
MALFORMED_JSON = "malformed_json"
BAD_UTF8 = "bad_utf8"
NOT_AN_OBJECT = "not_an_object"
MISSING_MESSAGES = "missing_messages"
BAD_MESSAGES = "bad_messages"  # not a list, empty, or an item that is not an object
UNKNOWN_ROLE = "unknown_role"
WRONG_ROLE_ORDER = "wrong_role_order"
NON_STRING_CONTENT = "non_string_content"
LONE_SURROGATE = "lone_surrogate"


class InvalidInputError(ValueError):
    """A bad row met under --strict."""


@dataclass
class Conversation:
    """A valid row: complete rounds plus what cleaning did to it (for the stats)."""

    line: int
    rounds: list[tuple[str, str]]
    dropped_trailing_user: bool = False
    zero_width_removed: int = 0


@dataclass
class InvalidRow:
    line: int
    kind: str
    reason: str

    def to_report(self, source: str, origin: str) -> dict:
        return {"source": source, "origin": origin, "line": self.line, "kind": self.kind,
                "reason": self.reason}


@dataclass
class SourceRows:
    """What was read from one source (long or short), in input order."""

    origin: str  # file path or hub id, for messages
    rows: list[Conversation | InvalidRow] = field(default_factory=list)
    blank_lines: int = 0
    available: int | None = None  # rows in the source when known (None: reading stopped early)
    byte_order_mark: bool = False  # a UTF-8 BOM started the file (removed before line 1 was parsed)


def parse_datanum(text: str) -> int:
    """'0k' -> 0, '5k' -> 5000, '10k' -> 10000, '123' -> 123."""
    match = _DATANUM_PATTERN.match(str(text))
    if match is None:
        raise ValueError(f"--datanum must be an integer or '<N>k' (e.g. 0k, 5k, 10k, 123), got {text!r}")
    number, suffix = int(match.group(1)), match.group(2)
    return number * 1000 if suffix else number


def strip_zero_width(text: str) -> tuple[str, int]:
    """Remove U+200B/C/D and U+FEFF; return the cleaned text and how many were removed."""
    cleaned = text.translate(_ZERO_WIDTH_TABLE)
    return cleaned, len(text) - len(cleaned)


def _check_message(index: int, message: Any) -> InvalidRow | None:
    if not isinstance(message, dict):
        return InvalidRow(0, BAD_MESSAGES, f"messages[{index}] is {type(message).__name__}, not an object")
    role = message.get("role")
    if role not in (USER, ASSISTANT):
        return InvalidRow(0, UNKNOWN_ROLE, f"messages[{index}].role is {role!r}; expected 'user' or 'assistant'")
    expected = USER if index % 2 == 0 else ASSISTANT
    if role != expected:
        return InvalidRow(0, WRONG_ROLE_ORDER, f"messages[{index}].role is {role!r}; expected {expected!r} "
                          "(roles must alternate, starting with 'user')")
    content = message.get("content")
    if not isinstance(content, str):
        return InvalidRow(0, NON_STRING_CONTENT,
                          f"messages[{index}].content is {type(content).__name__}, not a string")
    surrogate = _SURROGATE.search(content)
    if surrogate is not None:
        return InvalidRow(0, LONE_SURROGATE,
                          f"messages[{index}].content has a lone UTF-16 surrogate "
                          f"\\u{ord(surrogate.group()):04x} at character {surrogate.start()}: not text "
                          "a tokenizer can encode")
    return None


def _messages_of(row: Any) -> list | InvalidRow:
    if not isinstance(row, dict):
        return InvalidRow(0, NOT_AN_OBJECT, f"row is {type(row).__name__}, not a JSON object")
    if "messages" not in row:
        return InvalidRow(0, MISSING_MESSAGES, "no 'messages' key")
    messages = row["messages"]
    if not isinstance(messages, list) or not messages:
        return InvalidRow(0, BAD_MESSAGES, "'messages' must be a non-empty list")
    return messages


def validate_row(row: Any, line: int) -> Conversation | InvalidRow:
    """Turn one parsed row into complete rounds, or say why it is invalid."""
    messages = _messages_of(row)
    if isinstance(messages, InvalidRow):
        messages.line = line
        return messages
    for index, message in enumerate(messages):
        problem = _check_message(index, message)
        if problem is not None:
            problem.line = line
            return problem
    dropped = len(messages) % 2 == 1  # a trailing user turn has no answer to learn from
    rounds, removed = [], 0
    for user_msg, assistant_msg in zip(messages[0::2], messages[1::2]):
        reply, n_removed = strip_zero_width(assistant_msg["content"])
        rounds.append((user_msg["content"], reply))
        removed += n_removed
    return Conversation(line, rounds, dropped, removed)


def parse_line(raw: bytes, line: int) -> Conversation | InvalidRow:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        return InvalidRow(line, BAD_UTF8, f"not UTF-8: {err}")
    try:
        row = json.loads(text)
    except json.JSONDecodeError as err:
        return InvalidRow(line, MALFORMED_JSON, f"malformed JSON: {err.msg} at column {err.colno}")
    return validate_row(row, line)


def _keep(source: SourceRows, item: Conversation | InvalidRow, strict: bool) -> None:
    if strict and isinstance(item, InvalidRow):
        raise InvalidInputError(f"{source.origin}:{item.line}: invalid row ({item.kind}): {item.reason} "
                                "(--strict; drop --strict to skip and count bad rows instead)")
    source.rows.append(item)


def read_jsonl(path: str | Path, limit: int | None = None, strict: bool = False) -> SourceRows:
    """Read the first `limit` non-blank lines of `path` (all when None); blank lines are counted."""
    path = Path(path)
    source = SourceRows(origin=str(path))
    with open(path, "rb") as f:
        for line_no, raw in enumerate(f, start=1):
            if limit is not None and len(source.rows) >= limit:
                return source
            if line_no == 1 and raw.startswith(UTF8_BOM):
                raw = _drop_byte_order_mark(source, raw, strict)
            if not raw.strip():
                source.blank_lines += 1
                continue
            _keep(source, parse_line(raw, line_no), strict)
    source.available = len(source.rows)
    return source


def _drop_byte_order_mark(source: SourceRows, raw: bytes, strict: bool) -> bytes:
    if strict:
        raise InvalidInputError(f"{source.origin}:1: the file starts with a UTF-8 byte-order mark "
                                "(--strict; drop --strict to remove it and count it)")
    source.byte_order_mark = True
    return raw[len(UTF8_BOM):]


def read_rows(rows: Iterable[Any], origin: str, total: int | None = None,
              strict: bool = False) -> SourceRows:
    """Validate already-parsed rows (e.g. an HF dataset); row i is reported as line i + 1."""
    source = SourceRows(origin=origin, available=total)
    for index, row in enumerate(rows):
        _keep(source, validate_row(row, index + 1), strict)
    return source
