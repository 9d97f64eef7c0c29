"""Reading and validating conversations: the `messages` and the ShareGPT row formats.

A row (a JSONL line, an element of a JSON array, a parquet or Hugging Face dataset row) is one of

    messages: {"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...]}
    ShareGPT: {"conversations": [{"from": "system"|"human"|"gpt"|..., "value": "..."}, ...]}

ShareGPT speakers map to roles by `SHAREGPT_ROLES` (human/user -> user; gpt/chatgpt/assistant/bard
-> assistant; system -> system). In both formats an optional system turn opens the conversation;
then user and assistant alternate, starting with user. A valid row becomes a `Conversation`
(system prompt or None, complete `(user, assistant)` rounds); a bad one an `InvalidRow` with its
1-based line (or row) number, a kind and a reason, which the caller counts and reports (or stops
at with --strict). The policy is the same for both formats: another speaker (e.g. ShareGPT's
"function_call"), a system turn anywhere but first, roles that do not alternate, or non-string
content make the row invalid, counted by kind; nothing is repaired or dropped silently.

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

from longalign.constants import ZERO_WIDTH_TABLE

SYSTEM, USER, ASSISTANT = "system", "user", "assistant"
MESSAGES, SHAREGPT = "messages", "sharegpt"  # row formats, by the key holding the turns
ROW_FORMAT_KEYS = {MESSAGES: ("messages", "role", "content"), SHAREGPT: ("conversations", "from", "value")}
SHAREGPT_ROLES = {"human": USER, "user": USER, "gpt": ASSISTANT, "chatgpt": ASSISTANT, "assistant": ASSISTANT,
                  "bard": ASSISTANT, "system": SYSTEM}
NO_FORMAT = "none"  # rows whose format cannot be told (malformed JSON, not an object, no turns key)
_DATANUM_PATTERN = re.compile(r"^\s*(\d+)\s*([kK]?)\s*$")
_SURROGATE = re.compile("[\ud800-\udfff]")  # only a lone \\uXXXX escape leaves one in a str
UTF8_BOM = b"\xef\xbb\xbf"

# Kinds of bad rows (keys of the `skipped_invalid_by_kind` counts).
MALFORMED_JSON = "malformed_json"
BAD_UTF8 = "bad_utf8"
NOT_AN_OBJECT = "not_an_object"
MISSING_MESSAGES = "missing_messages"  # neither 'messages' nor 'conversations'
AMBIGUOUS_FORMAT = "ambiguous_format"  # both 'messages' and 'conversations'
BAD_MESSAGES = "bad_messages"  # not a list, empty, or an item that is not an object
UNKNOWN_ROLE = "unknown_role"  # a role / ShareGPT speaker outside the mapping
MISPLACED_SYSTEM = "misplaced_system"  # a system turn that does not open the conversation
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
    system: str | None = None  # the opening system turn's text
    row_format: str = MESSAGES


@dataclass
class InvalidRow:
    line: int
    kind: str
    reason: str
    row_format: str = NO_FORMAT

    def to_report(self, source: str, origin: str, unit: str = "line") -> dict:
        return {"source": source, "origin": origin, unit: self.line, "kind": self.kind, "reason": self.reason}


@dataclass
class SourceRows:
    """What was read from one source (long or short), in input order."""

    origin: str  # file path or hub id, for messages
    rows: list[Conversation | InvalidRow] = field(default_factory=list)
    blank_lines: int = 0
    available: int | None = None  # rows in the source when known (None: reading stopped early)
    byte_order_mark: bool = False  # a UTF-8 BOM started the file (removed before line 1 was parsed)
    container: str = "jsonl"  # jsonl, json_array, parquet, hf_dataset (longalign.data.input_files)
    compression: str | None = None  # "gzip" or None
    unit: str = "line"  # what a row's number counts: "line" (text files) or "row"

    def where(self, number: int) -> str:
        """'file.jsonl:7' or 'file.parquet row 7'."""
        return f"{self.origin}:{number}" if self.unit == "line" else f"{self.origin} row {number}"


def parse_datanum(text: str) -> int:
    """'0k' -> 0, '5k' -> 5000, '10k' -> 10000, '123' -> 123."""
    match = _DATANUM_PATTERN.match(str(text))
    if match is None:
        raise ValueError(f"--datanum must be an integer or '<N>k' (e.g. 0k, 5k, 10k, 123), got {text!r}")
    number, suffix = int(match.group(1)), match.group(2)
    return number * 1000 if suffix else number


def strip_zero_width(text: str) -> tuple[str, int]:
    """Remove U+200B/C/D and U+FEFF; return the cleaned text and how many were removed."""
    cleaned = text.translate(ZERO_WIDTH_TABLE)
    return cleaned, len(text) - len(cleaned)


def _check_turn(index: int, turn: Any, row_format: str) -> tuple[str, str] | InvalidRow:
    """(role, content) of turn `index`, or why it is invalid; names the format's own keys."""
    list_key, role_key, content_key = ROW_FORMAT_KEYS[row_format]
    where = f"{list_key}[{index}]"
    if not isinstance(turn, dict):
        return InvalidRow(0, BAD_MESSAGES, f"{where} is {type(turn).__name__}, not an object", row_format)
    speaker = turn.get(role_key)
    role = SHAREGPT_ROLES.get(speaker) if row_format == SHAREGPT and isinstance(speaker, str) else speaker
    if role not in (SYSTEM, USER, ASSISTANT):
        expected = sorted(SHAREGPT_ROLES) if row_format == SHAREGPT else [SYSTEM, USER, ASSISTANT]
        return InvalidRow(0, UNKNOWN_ROLE, f"{where}.{role_key} is {speaker!r}; expected one of {expected}", row_format)
    content = turn.get(content_key)
    if not isinstance(content, str):
        return InvalidRow(0, NON_STRING_CONTENT,
                          f"{where}.{content_key} is {type(content).__name__}, not a string", row_format)
    surrogate = _SURROGATE.search(content)
    if surrogate is not None:
        return InvalidRow(0, LONE_SURROGATE,
                          f"{where}.{content_key} has a lone UTF-16 surrogate "
                          f"\\u{ord(surrogate.group()):04x} at character {surrogate.start()}: not text "
                          "a tokenizer can encode", row_format)
    return role, content


def _check_order(index: int, role: str, opening: int, row_format: str) -> InvalidRow | None:
    """Turn `index` (after `opening` system turns) must be the next of user/assistant."""
    list_key = ROW_FORMAT_KEYS[row_format][0]
    if role == SYSTEM:
        return None if index == 0 else InvalidRow(
            0, MISPLACED_SYSTEM, f"{list_key}[{index}] is a system turn; a system turn may only open the "
            "conversation", row_format)
    expected = USER if (index - opening) % 2 == 0 else ASSISTANT
    if role != expected:
        return InvalidRow(0, WRONG_ROLE_ORDER, f"{list_key}[{index}] is {'an' if role == ASSISTANT else 'a'} "
                          f"{role} turn; expected {expected!r} (after an optional system turn, roles alternate, "
                          "starting with 'user')", row_format)
    return None


def row_format_of(row: Any) -> str | InvalidRow:
    """MESSAGES or SHAREGPT by the key holding the turns (a key whose value is null is absent)."""
    if not isinstance(row, dict):
        return InvalidRow(0, NOT_AN_OBJECT, f"row is {type(row).__name__}, not a JSON object")
    present = [name for name, (key, _, _) in ROW_FORMAT_KEYS.items() if row.get(key) is not None]
    if not present:
        return InvalidRow(0, MISSING_MESSAGES, "no 'messages' (role/content) or 'conversations' (ShareGPT "
                          "from/value) key")
    if len(present) > 1:
        return InvalidRow(0, AMBIGUOUS_FORMAT, "both 'messages' and 'conversations': which one holds the "
                          "conversation is not clear")
    return present[0]


def _turns_of(row: Any) -> tuple[str, list[tuple[str, str]]] | InvalidRow:
    """(row format, [(role, content), ...]) of a row whose turns are all valid and in order."""
    row_format = row_format_of(row)
    if isinstance(row_format, InvalidRow):
        return row_format
    list_key = ROW_FORMAT_KEYS[row_format][0]
    turns = row[list_key]
    if not isinstance(turns, list) or not turns:
        return InvalidRow(0, BAD_MESSAGES, f"'{list_key}' must be a non-empty list", row_format)
    checked = []
    for index, turn in enumerate(turns):
        result = _check_turn(index, turn, row_format)
        if isinstance(result, InvalidRow):
            return result
        problem = _check_order(index, result[0], int(checked[:1] != [] and checked[0][0] == SYSTEM), row_format)
        if problem is not None:
            return problem
        checked.append(result)
    return row_format, checked


def validate_row(row: Any, line: int) -> Conversation | InvalidRow:
    """Turn one parsed row (either format) into a system prompt and complete rounds, or say why
    it is invalid."""
    found = _turns_of(row)
    if isinstance(found, InvalidRow):
        found.line = line
        return found
    row_format, turns = found
    system = turns[0][1] if turns[0][0] == SYSTEM else None
    dialogue = [content for _, content in turns[int(system is not None):]]
    dropped = len(dialogue) % 2 == 1  # a trailing user turn has no answer to learn from
    rounds, removed = [], 0
    for user, assistant in zip(dialogue[0::2], dialogue[1::2]):
        reply, n_removed = strip_zero_width(assistant)
        rounds.append((user, reply))
        removed += n_removed
    return Conversation(line, rounds, dropped, removed, system, row_format)


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


def keep_row(source: SourceRows, item: Conversation | InvalidRow, strict: bool) -> None:
    """Append a parsed row to `source`; under --strict an invalid row stops the run, naming it."""
    if strict and isinstance(item, InvalidRow):
        raise InvalidInputError(f"{source.where(item.line)}: invalid row ({item.kind}): {item.reason} "
                                "(--strict; drop --strict to skip and count bad rows instead)")
    source.rows.append(item)


def read_lines(stream: Iterable[bytes], source: SourceRows, limit: int | None = None,
               strict: bool = False) -> SourceRows:
    """Parse the first `limit` non-blank lines of a binary stream into `source` (all when None);
    blank lines are counted."""
    for line_no, raw in enumerate(stream, start=1):
        if limit is not None and len(source.rows) >= limit:
            return source
        if line_no == 1 and raw.startswith(UTF8_BOM):
            raw = drop_byte_order_mark(source, raw, strict)
        if not raw.strip():
            source.blank_lines += 1
            continue
        keep_row(source, parse_line(raw, line_no), strict)
    source.available = len(source.rows)
    return source


def read_jsonl(path: str | Path, limit: int | None = None, strict: bool = False) -> SourceRows:
    """Read the first `limit` non-blank lines of the JSONL file `path` (all when None)."""
    with open(path, "rb") as f:
        return read_lines(f, SourceRows(origin=str(path)), limit, strict)


def drop_byte_order_mark(source: SourceRows, raw: bytes, strict: bool) -> bytes:
    """`raw` without its leading UTF-8 BOM, counted (under --strict: an error)."""
    if strict:
        raise InvalidInputError(f"{source.origin}:1: the file starts with a UTF-8 byte-order mark "
                                "(--strict; drop --strict to remove it and count it)")
    source.byte_order_mark = True
    return raw[len(UTF8_BOM):]


def read_rows(rows: Iterable[Any], origin: str, total: int | None = None,
              strict: bool = False) -> SourceRows:
    """Validate already-parsed rows (e.g. an HF dataset); row i is reported as row i + 1."""
    source = SourceRows(origin=origin, available=total, unit="row")
    for index, row in enumerate(rows):
        keep_row(source, validate_row(row, index + 1), strict)
    return source
