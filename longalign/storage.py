"""Atomic outputs: every stage writes to a temporary sibling and renames at the end.

An interrupted run therefore never leaves a half-written dataset or JSON file that a later
stage would read: either the old output (or nothing) is there, or the complete new one.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

_logger = logging.getLogger(__name__)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _chmod_like_new(path: Path, mode: int) -> None:
    """mkdtemp/mkstemp create 0700/0600; give outputs the mode a plain create would (umask)."""
    os.chmod(path, mode & ~_umask())


@contextlib.contextmanager
def atomic_dir(final: str | os.PathLike) -> Iterator[Path]:
    """Yield a fresh temporary directory next to `final`; on success it replaces `final`.

    On an exception the temporary directory is removed and `final` is left untouched.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _chmod_like_new(tmp, 0o777)
    old = None
    if final.exists():  # keep the old one until the new one is in place
        old = final.with_name(f".{final.name}.old-{os.getpid()}")
        os.replace(final, old)
    os.replace(tmp, final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def write_bytes_atomic(path: str | os.PathLike, payload: bytes) -> None:
    """Write `payload` to `path` through a temporary sibling and a rename (no partial file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(payload)
        _chmod_like_new(Path(tmp), 0o666)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    """Write `obj` as indented JSON to `path` through a temporary file and a rename."""
    text = json.dumps(obj, indent=2, ensure_ascii=False) + "\n"
    write_bytes_atomic(path, text.encode("utf-8"))


def append_jsonl(path: str | os.PathLike, record: dict) -> None:
    """Append one JSON record as a line and flush it to disk (for resumable outputs)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record, ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())


def drop_torn_tail(path: str | os.PathLike) -> int:
    """Cut a last line left without its newline by a killed writer; return the bytes removed.

    `append_jsonl` writes whole lines, so only a crash mid-write leaves such a tail; appending
    after it would glue the next record onto the torn one. Call before resuming a JSONL output.
    """
    if not os.path.exists(path):
        return 0
    with open(path, "rb+") as f:
        data = f.read()
        if not data or data.endswith(b"\n"):
            return 0
        keep = data.rfind(b"\n") + 1
        f.truncate(keep)
    _logger.warning("%s: removed a torn last line of %d bytes (a killed run)", path, len(data) - keep)
    return len(data) - keep


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """Read a JSONL file written by `append_jsonl`; a torn last line (crash mid-write) is skipped."""
    records = []
    path = Path(path)
    if not path.exists():
        return records
    lines = path.read_text(encoding="utf-8").splitlines()
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if i == len(lines) - 1:  # only the last line can be torn by a crash
                _logger.warning("%s: ignoring a torn last line (a killed run)", path)
                break
            raise ValueError(f"{path}:{i + 1}: corrupt JSON line") from None
    return records
