"""longalign.eval.prediction_keys: fingerprints, settings diffs, a prediction log that refuses to mix settings."""
import hashlib
import json
import os

import pytest

from longalign.eval.prediction_keys import (TOKENIZER_FILE_SUFFIXES, PredictionLog, PredictionMismatch,
                                       directory_fingerprint, file_digest, open_stored_log, prompt_sha256,
                                       settings_diff, settings_key)

SETTINGS = {"candidate": {"model": "/m", "fingerprint": {"sha256": "aa"}}, "generation": {"temperature": 1.0}}


def make_model_dir(path, weights=b"\x00" * 64):
    path.mkdir()
    (path / "config.json").write_text('{"model_type": "llama"}')
    (path / "tokenizer.json").write_text("{}")
    (path / "model.safetensors").write_bytes(weights)
    return path


def test_fingerprint_covers_the_defining_files_only(tmp_path):
    base = directory_fingerprint(make_model_dir(tmp_path / "a"))
    assert (base["files"], base["bytes"]) == (3, len('{"model_type": "llama"}') + 2 + 64)
    other = make_model_dir(tmp_path / "b", weights=b"\x00" * 63 + b"\x01")  # one weight byte differs
    assert directory_fingerprint(other)["sha256"] != base["sha256"]
    (other / "model.safetensors").write_bytes(b"\x00" * 64)
    (other / "README.md").write_text("notes")  # not a model file
    (other / ".cache").write_text("hidden")
    assert directory_fingerprint(other) == base
    assert directory_fingerprint(other, TOKENIZER_FILE_SUFFIXES)["files"] == 2  # weights left out
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no model or tokenizer files"):
        directory_fingerprint(tmp_path / "empty")


def test_hub_cache_symlinks_are_named_by_content(tmp_path):
    blob_name = hashlib.sha256(b"weights").hexdigest()
    (tmp_path / "blobs").mkdir()
    (tmp_path / "blobs" / blob_name).write_bytes(b"weights")
    os.symlink(f"blobs/{blob_name}", tmp_path / "model.safetensors")
    assert file_digest(tmp_path / "model.safetensors") == f"blob:{blob_name}"  # not read
    os.symlink("blobs/plain-name", tmp_path / "other.bin")
    (tmp_path / "blobs" / "plain-name").write_bytes(b"weights")
    assert file_digest(tmp_path / "other.bin") == blob_name  # read and hashed


def test_settings_key_and_diff():
    changed = {**SETTINGS, "generation": {"temperature": 0.5}}
    assert settings_key(SETTINGS) == settings_key(json.loads(json.dumps(SETTINGS)))
    assert settings_key(changed) != settings_key(SETTINGS)
    assert settings_diff(SETTINGS, changed) == ["generation.temperature: 1.0 -> 0.5"]


def test_log_refuses_other_settings_and_keeps_the_file(tmp_path):
    path = tmp_path / "preds.jsonl"
    log = PredictionLog(path, SETTINGS, "id", advice="use another file")
    log.append("a", prompt_sha256("pa"), {"response": "x"})
    assert log.load({"a": prompt_sha256("pa")})[0]["a"]["response"] == "x"
    before = path.read_bytes()
    other = PredictionLog(path, {**SETTINGS, "generation": {"temperature": 0.5}}, "id", advice="use another file")
    with pytest.raises(PredictionMismatch, match="temperature: 1.0 -> 0.5.*use another file"):
        other.load({"a": prompt_sha256("pa")})
    with pytest.raises(PredictionMismatch, match="which this run does not have"):
        log.load({"b": prompt_sha256("pb")})
    with pytest.raises(PredictionMismatch, match="prompt of id 'a' changed"):
        log.load({"a": prompt_sha256("changed")})
    assert path.read_bytes() == before


def test_reader_skips_a_torn_tail_without_cutting_it(tmp_path):
    path = tmp_path / "preds.jsonl"
    log = PredictionLog(path, SETTINGS, "id", advice="x")
    log.append("a", prompt_sha256("pa"), {"response": "x"})
    with open(path, "a") as f:
        f.write('{"id": "b", "resp')
    stored = open_stored_log(path, "id", advice="x")
    done, torn = stored.load(None, repair=False)
    assert list(done) == ["a"] and torn == len('{"id": "b", "resp') and path.read_text().endswith('"resp')
    assert log.load({"a": prompt_sha256("pa")})[1] == torn and path.read_text().endswith("\n")  # a writer cuts it
