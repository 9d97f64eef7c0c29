"""Atomic outputs: every stage writes to a temporary sibling and swaps it in at the end.

An interrupted run never leaves a half-written dataset or JSON file that a later stage would
read: at every moment the output path holds the old complete output (or nothing) or the new
complete one. Directories are swapped with Linux's atomic rename exchange (renameat2
RENAME_EXCHANGE); where that is missing, with two renames, and a run killed between them is
repaired by the next run (the old output is put back). Leftover `.NAME.tmp-PID@HOST.*` folders
of killed runs are removed by the next run writing NAME.

What a stage may replace (`check_output_dir`, also run before any work starts):
- nothing there, or an empty folder: written;
- a folder this stage wrote before (its `.longalign_output.json` marker names the stage and the
  entries it wrote): replaced whole; if something else was put in it since (sort/ and pack/ in
  a pre_tokenize output, a user's file), only with `overwrite` (--overwrite_output_dir);
- never, not even with `overwrite`: a regular file, a folder without this stage's marker
  (unrelated, or another stage's), a folder that holds one of the stage's inputs, the current
  directory or one of its parents;
- the folder it would be created in must be writable (probed with a real temporary folder).
"""
from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import hashlib
import json
import logging
import os
import secrets
import shutil
import socket
import tempfile
import time
from pathlib import Path
from typing import Any, Iterable, Iterator

from longalign.fault_points import (BETWEEN_RENAMES, NEW_OUTPUT_COMPLETE, OLD_OUTPUT_SWAPPED_OUT,
                                    fault_point, rename_exchange_disabled)

_logger = logging.getLogger(__name__)

OUTPUT_MARKER = ".longalign_output.json"
DEFAULT_STAGE = "output"
_TMP, _OLD = "tmp", "old"  # kinds of leftover siblings: .NAME.tmp-PID@HOST.x / .NAME.old-PID@HOST.x
_AT_FDCWD, _RENAME_EXCHANGE = -100, 2  # <fcntl.h>, <linux/fs.h>
_LISTED_ENTRIES = 5  # entries named in a refusal message
_RAW_LINE_SEPARATORS = {ord(ch): f"\\u{ord(ch):04x}" for ch in "\u0085\u2028\u2029"}  # see jsonl_line


class OutputRefusedError(ValueError):
    """An output path a stage must not write (see the module docstring); nothing was written."""


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _chmod_like_new(path: Path, mode: int) -> None:
    """mkdtemp/mkstemp create 0700/0600; give outputs the mode a plain create would (umask)."""
    os.chmod(path, mode & ~_umask())


# ---- what a stage may replace ------------------------------------------------------------
def _listing(names: list[str]) -> str:
    shown = ", ".join(names[:_LISTED_ENTRIES])
    return shown + (f" and {len(names) - _LISTED_ENTRIES} more" if len(names) > _LISTED_ENTRIES else "")


def read_output_marker(folder: str | os.PathLike) -> dict | None:
    """The marker a stage left in its output folder, or None (absent or unreadable)."""
    try:
        marker = json.loads((Path(folder) / OUTPUT_MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return marker if isinstance(marker, dict) and isinstance(marker.get("entries"), list) else None


def _refuse_cwd_and_inputs(final: Path, inputs: Iterable) -> None:
    cwd = Path.cwd().resolve()
    if final == cwd or final in cwd.parents:
        raise OutputRefusedError(
            f"output folder {final} is the current directory or one of its parents: a stage swaps "
            "its output folder in whole, which cannot be done to the folder you run from; pass a "
            "new folder such as ./out")
    for item in inputs:
        if item is None or not os.path.lexists(item):
            continue  # hub ids and defaults that do not exist hold nothing
        path = Path(item).resolve()
        if path == final or final in path.parents:
            raise OutputRefusedError(
                f"output folder {final} holds the input {path}: a stage never writes over its own "
                "inputs (not even with --overwrite_output_dir); choose another output folder")


def _check_existing(final: Path, stage: str, overwrite: bool) -> None:
    """Raise OutputRefusedError unless `final` may be (re)placed by `stage` (module docstring)."""
    if not os.path.lexists(final):
        return
    if not final.is_dir():
        raise OutputRefusedError(f"output path {final} is an existing file, not a folder: {stage} "
                                 "writes a folder there and never replaces a file; choose another path")
    entries = sorted(os.listdir(final))
    if not entries:
        return
    marker = read_output_marker(final)
    if marker is None or marker.get("stage") != stage:
        what = (f"a {marker.get('stage')} output" if marker else
                f"not an output of {stage} (it has no {OUTPUT_MARKER}; outputs of older versions have none)")
        raise OutputRefusedError(
            f"output folder {final} already exists and is {what}; it holds {_listing(entries)}. {stage} "
            "never replaces a folder it did not create: choose another output folder or remove it yourself")
    foreign = [e for e in entries if e != OUTPUT_MARKER and e not in marker["entries"]]
    if foreign and not overwrite:
        raise OutputRefusedError(
            f"output folder {final} is a previous {stage} output, but it also holds {_listing(foreign)}, "
            f"which {stage} did not write; replacing the folder would delete them. Move them away, "
            "choose another output folder, or pass --overwrite_output_dir to replace the folder with them")


def _probe_writable(final: Path, stage: str) -> None:
    """Create and remove a real temporary folder where the output will be created."""
    existing = final.parent
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise OutputRefusedError(f"cannot create output folder {final}: {existing} is a file")
    try:
        probe = tempfile.mkdtemp(prefix=_leftover_prefix(final, _TMP), dir=existing)
    except OSError as err:
        raise OutputRefusedError(f"cannot write in {existing} ({err.strerror}): {stage} checks this "
                                 "before it starts; choose a writable output folder") from err
    os.rmdir(probe)


def check_output_dir(final: str | os.PathLike, stage: str = DEFAULT_STAGE, overwrite: bool = False,
                     inputs: Iterable = ()) -> Path:
    """Refuse, before any work, what `atomic_dir` would refuse at the end; returns the resolved path.

    Also removes leftovers of killed runs writing `final` (see `clean_leftovers`).
    """
    final = Path(final).resolve()
    _refuse_cwd_and_inputs(final, inputs)
    clean_leftovers(final)
    _check_existing(final, stage, overwrite)
    _probe_writable(final, stage)
    return final


# ---- leftovers of killed runs ------------------------------------------------------------
def _leftover_prefix(final: Path, kind: str) -> str:
    return f".{final.name}.{kind}-{os.getpid()}@{socket.gethostname()}."


def _leftover_owner(name: str, final_name: str) -> tuple[str, int, str] | None:
    """(kind, pid, host) of a `.NAME.KIND-PID@HOST.x` sibling of NAME, else None."""
    prefix = f".{final_name}."
    if not name.startswith(prefix):
        return None
    kind, _, tail = name[len(prefix):].partition("-")
    pid, _, host_and_suffix = tail.partition("@")
    if kind not in (_TMP, _OLD) or not pid.isdigit() or "." not in host_and_suffix:
        return None
    return kind, int(pid), host_and_suffix.rsplit(".", 1)[0]


def _process_is_gone(pid: int, host: str) -> bool:
    if host != socket.gethostname() or pid == os.getpid():
        return False  # another machine's run (shared filesystem), or ours: leave it
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False  # alive, another user's
    return False


def clean_leftovers(final: str | os.PathLike) -> list[str]:
    """Remove the temporary siblings of `final` left by killed runs on this machine; returns
    what was done. A killed two-rename swap left the old output aside: it is put back."""
    final = Path(final)
    done = []
    if not final.parent.is_dir():
        return done
    for entry in sorted(final.parent.iterdir()):
        owner = _leftover_owner(entry.name, final.name)
        if owner is None or not _process_is_gone(owner[1], owner[2]):
            continue
        if owner[0] == _OLD and not os.path.lexists(final):
            os.rename(entry, final)
            done.append(f"restored {final} from {entry.name} (a run was killed while swapping outputs)")
        else:
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
            done.append(f"removed {entry} (left by a killed run, pid {owner[1]})")
    for line in done:
        _logger.warning(line)
    return done


# ---- the swap ------------------------------------------------------------------------------
@functools.lru_cache(maxsize=1)
def _renameat2():
    try:
        function = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError, TypeError):
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    return function


def exchange_paths(a: Path, b: Path) -> bool:
    """Atomically swap two existing paths (Linux RENAME_EXCHANGE); False where unsupported."""
    function = None if rename_exchange_disabled() else _renameat2()
    if function is None:
        return False
    if function(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):  # this filesystem cannot
        return False
    raise OSError(code, os.strerror(code), str(b))


def _swap_in(new: Path, final: Path) -> None:
    """Put the complete folder `new` at `final`; whatever was there is removed afterwards."""
    if not os.path.lexists(final) or not any(final.iterdir()):
        os.replace(new, final)  # nothing there, or an empty folder: one rename
        return
    if exchange_paths(new, final):  # `new` now names the old output
        fault_point(OLD_OUTPUT_SWAPPED_OUT)
        shutil.rmtree(new)
        return
    old = final.with_name(_leftover_prefix(final, _OLD) + secrets.token_hex(4))
    os.rename(final, old)
    try:
        fault_point(BETWEEN_RENAMES)  # killed here: the next run puts `old` back (clean_leftovers)
        os.rename(new, final)
    except BaseException:
        os.rename(old, final)
        raise
    fault_point(OLD_OUTPUT_SWAPPED_OUT)
    shutil.rmtree(old)


def _write_marker(folder: Path, stage: str) -> None:
    entries = sorted(name for name in os.listdir(folder) if name != OUTPUT_MARKER)
    write_json_atomic(folder / OUTPUT_MARKER, {
        "stage": stage, "entries": entries,
        "written": {"host": socket.gethostname(), "pid": os.getpid(),
                    "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}})


@contextlib.contextmanager
def atomic_dir(final: str | os.PathLike, *, stage: str = DEFAULT_STAGE, overwrite: bool = False,
               inputs: Iterable = ()) -> Iterator[Path]:
    """Yield a fresh temporary folder next to `final`; on success it replaces `final` atomically.

    `stage` names the writer in the folder's marker; `overwrite` and `inputs` as in the module
    docstring (checked first, and again before the swap). On an exception the temporary folder
    is removed and `final` is left untouched.
    """
    final = check_output_dir(final, stage, overwrite, inputs)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=_leftover_prefix(final, _TMP), dir=final.parent))
    try:
        yield tmp
        _write_marker(tmp, stage)
        _chmod_like_new(tmp, 0o777)
        fault_point(NEW_OUTPUT_COMPLETE)
        _check_existing(final, stage, overwrite)  # nothing appeared there while we worked
        _swap_in(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise

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


def jsonl_line(record: dict) -> str:
    """One record as a JSONL line: UTF-8 text kept, the line separators other than newline that JSON
    leaves raw (U+0085, U+2028, U+2029; `str.splitlines` cuts at them) written as escapes."""
    return json.dumps(record, ensure_ascii=False).translate(_RAW_LINE_SEPARATORS) + "\n"


def split_jsonl(text: str) -> list[str]:
    """The lines of a JSONL text: split at newline (LF) only (never `str.splitlines`, which also cuts at
    U+0085, U+2028, U+2029 inside a record's strings). A text ending in LF ends with ""."""
    return text.split("\n")


def append_jsonl(path: str | os.PathLike, record: dict) -> None:
    """Append one JSON record as a line and flush it to disk (for resumable outputs)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        f.write(jsonl_line(record))
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
    lines = split_jsonl(path.read_text(encoding="utf-8"))
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if i == len(lines) - 1:  # only a last line without its LF can be torn by a crash
                _logger.warning("%s: ignoring a torn last line (a killed run)", path)
                break
            raise ValueError(f"{path}:{i + 1}: corrupt JSON line") from None
    return records


def data_files_digest(folder: str | os.PathLike, pattern: str = "*.arrow") -> str:
    """sha256 over the names, sizes and bytes of `folder`'s data files, in name order."""
    digest = hashlib.sha256()
    for path in sorted(Path(folder).glob(pattern)):
        digest.update(f"{path.name}\0{path.stat().st_size}\0".encode())
        with open(path, "rb") as f:
            digest.update(hashlib.file_digest(f, "sha256").digest())
    return digest.hexdigest()
