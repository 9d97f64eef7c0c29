"""Atomic outputs: complete or absent, and readable like any file the user creates."""
import os
import stat

import pytest

from longalign.storage import atomic_dir, write_json_atomic


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
