"""Atomic outputs: complete or absent, readable like any file the user creates, and never in place
of something the stage did not write."""
import json
import os
import socket
import stat
import subprocess

import pytest

from helpers.line_separators import LINE_SEPARATORS
from longalign.storage import (OUTPUT_MARKER, OutputRefusedError, append_jsonl, atomic_dir, check_output_dir,
                               clean_leftovers, data_files_digest, read_jsonl, write_json_atomic)


def test_outputs_get_the_umask_mode_not_the_temp_files_private_one(tmp_path):
    old = os.umask(0o022)
    try:
        with atomic_dir(tmp_path / "out") as d:
            (d / "x").write_text("1")
        write_json_atomic(tmp_path / "s.json", {"a": 1})
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "out").stat().st_mode) == 0o755
    assert stat.S_IMODE((tmp_path / "s.json").stat().st_mode) == 0o644


def test_a_failed_write_leaves_the_old_output_and_no_temp(tmp_path):
    write_json_atomic(tmp_path / "s.json", {"a": 1})
    with pytest.raises(TypeError):
        write_json_atomic(tmp_path / "s.json", {"a": object()})
    with pytest.raises(RuntimeError):
        with atomic_dir(tmp_path / "out"):
            raise RuntimeError("interrupted")
    assert (tmp_path / "s.json").read_text().strip().endswith("}")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.json"]


# ---- what a stage may replace (the CLI-level cases are in test_faults_data.py) -----------
def write_output(folder, stage="s", files=("a",), **policy):
    with atomic_dir(folder, stage=stage, **policy) as tmp:
        for name in files:
            (tmp / name).write_text(name)


def test_a_stage_replaces_its_own_output_and_nothing_else(tmp_path):
    out = tmp_path / "out"
    write_output(out, files=("a",))
    write_output(out, files=("b",))  # its own previous output: replaced whole
    assert sorted(p.name for p in out.iterdir()) == [OUTPUT_MARKER, "b"]
    (out / "user.txt").write_text("mine")
    with pytest.raises(OutputRefusedError, match=r"also holds user\.txt.*--overwrite_output_dir"):
        write_output(out, files=("c",))
    assert (out / "b").exists()
    write_output(out, files=("c",), overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == [OUTPUT_MARKER, "c"]
    with pytest.raises(OutputRefusedError, match="is a s output"):
        write_output(out, stage="other", overwrite=True)


@pytest.mark.parametrize("make, message", [
    (lambda p: p.write_text("x"), "is an existing file"),
    (lambda p: (p.mkdir(), (p / "f").write_text("x")), "not an output of s"),
])
def test_a_file_or_an_unrelated_folder_is_never_replaced(tmp_path, make, message):
    target = tmp_path / "target"
    make(target)
    with pytest.raises(OutputRefusedError, match=message):
        write_output(target, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["target"]  # and no temporary left


def test_an_empty_folder_is_used(tmp_path):
    (tmp_path / "out").mkdir()
    write_output(tmp_path / "out")
    assert (tmp_path / "out" / "a").read_text() == "a"


def test_inputs_and_the_working_directory_are_never_outputs(tmp_path, monkeypatch):
    out = tmp_path / "out"
    write_output(out)
    (out / "input.jsonl").write_text("{}")
    with pytest.raises(OutputRefusedError, match="holds the input"):
        check_output_dir(out, "s", overwrite=True, inputs=[out / "input.jsonl", "hub/id-that-is-no-path"])
    monkeypatch.chdir(out)
    for path in (".", "..", "/"):
        with pytest.raises(OutputRefusedError, match="current directory"):
            check_output_dir(path, "s", overwrite=True)


@pytest.mark.subprocess
def test_leftovers_of_dead_runs_are_removed_and_live_ones_kept(tmp_path):
    final = tmp_path / "out"
    dead = _dead_pid()
    host = socket.gethostname()
    (tmp_path / f".out.tmp-{dead}@{host}.abc").mkdir()
    (tmp_path / f".out.tmp-{os.getpid()}@{host}.abc").mkdir()  # ours: alive
    (tmp_path / f".out.tmp-{dead}@other-host.abc").mkdir()  # another machine's: unknown
    (tmp_path / f".out.old-{dead}@{host}.abc").mkdir()  # a killed two-rename swap: the old output
    done = clean_leftovers(final)
    assert len(done) == 2 and final.is_dir()  # the old output is put back at its path
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([
        f".out.tmp-{os.getpid()}@{host}.abc", f".out.tmp-{dead}@other-host.abc", "out"])


def _dead_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


@pytest.mark.parametrize("exchange", [True, False])
def test_the_swap_works_with_and_without_rename_exchange(tmp_path, monkeypatch, exchange):
    if not exchange:
        monkeypatch.setenv("LONGALIGN_NO_RENAME_EXCHANGE", "1")
    out = tmp_path / "out"
    write_output(out, files=("a",))
    write_output(out, files=("b",))
    assert (out / "b").exists() and not (out / "a").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_data_files_digest_follows_the_bytes(tmp_path):
    (tmp_path / "data-0.arrow").write_bytes(b"abc")
    first = data_files_digest(tmp_path)
    (tmp_path / "stats.json").write_text("{}")  # not a data file
    assert data_files_digest(tmp_path) == first
    (tmp_path / "data-0.arrow").write_bytes(b"abd")
    assert data_files_digest(tmp_path) != first


@pytest.mark.parametrize("separator", LINE_SEPARATORS)
def test_a_line_separator_in_a_record_stays_inside_it(tmp_path, separator):
    """The audit: a model answer with U+2028 was cut in two by splitlines(); every resume then failed."""
    path = tmp_path / "log.jsonl"
    records = [{"id": 1, "text": f"one{separator}two"}, {"id": 2, "text": f"{separator}中文{separator}"}]
    for record in records:
        append_jsonl(path, record)
    assert read_jsonl(path) == records
    assert path.read_bytes().count(b"\n") == 2 and separator not in path.read_text(encoding="utf-8")
    # a file an older version wrote with the separators raw reads too
    raw = tmp_path / "raw.jsonl"
    raw.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    assert separator in raw.read_text(encoding="utf-8") and read_jsonl(raw) == records
    append_jsonl(raw, {"id": 3})
    assert [r["id"] for r in read_jsonl(raw)] == [1, 2, 3]


def test_those_are_all_the_separators_json_leaves_raw():
    splitting = [chr(i) for i in range(0x110000) if len(f"a{chr(i)}b".splitlines()) > 1]
    assert [ch for ch in splitting if ch in json.dumps(ch, ensure_ascii=False)] == LINE_SEPARATORS
