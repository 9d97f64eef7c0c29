"""What a prediction was made under, and a prediction log that never mixes settings.

A prediction is determined by a *settings record* — the candidate (model path and the
fingerprint of its folder, or server URL, model name and API), its tokenizer (path and
fingerprint), the chat format, the truncation length and unit, the generation parameters, and
what a suite adds (the needle prompt set) — and by the text of its prompt. `settings_key` is
the sha256 of the settings' canonical JSON. `PredictionLog` keeps the settings beside the JSONL
file (`<file>.settings.json`) and in every record (`settings_key`, `prompt_sha256`).

Policy on a mismatch: **refuse**. A log whose settings differ from this run's, a record made
under another key or for another prompt text, a record for an id the run does not know, or two
records for one id raise `PredictionMismatch` naming the file, the line and what differs.
Nothing is regenerated next to the old records and nothing is deleted: the user picks another
output (LongBench-Chat's default output folder is named by the settings key, so a changed
setting never lands in the old folder).

`directory_fingerprint`: sha256 over the top-level files of a model folder that define it
(`MODEL_FILE_SUFFIXES`: configs, generation config, tokenizer files, chat templates, remote code,
weights), each hashed whole; a tokenizer alone is fingerprinted by `TOKENIZER_FILE_SUFFIXES`.
A file of the Hugging Face cache (a symlink to a blob named by its sha256) is identified by that
name without being read; other weights are read once per run to be hashed.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

from longalign.storage import append_jsonl, drop_torn_tail, split_jsonl, write_json_atomic

TOKENIZER_FILE_SUFFIXES = (".json", ".model", ".txt", ".py", ".jinja", ".tiktoken")
MODEL_FILE_SUFFIXES = TOKENIZER_FILE_SUFFIXES + (".safetensors", ".bin", ".pt", ".pth", ".gguf")
HASH_CHUNK_BYTES = 1 << 24
CONTENT_ADDRESS = re.compile(r"^(?:[0-9a-f]{40}|[0-9a-f]{64})$")  # git blob sha1 / LFS sha256 names
SETTINGS_SUFFIX = ".settings.json"
KEY_FIELD, PROMPT_FIELD = "settings_key", "prompt_sha256"


class PredictionMismatch(ValueError):
    """Stored predictions were made under other settings (or are ambiguous): refused."""


def resolve_model_dir(name_or_path: str, suffixes: tuple = MODEL_FILE_SUFFIXES) -> Path:
    """A local folder for a model path or hub id (a hub id resolves to its snapshot in the HF cache,
    downloading the files with these suffixes, as `from_pretrained` would)."""
    path = Path(os.path.expanduser(str(name_or_path)))
    if path.is_dir():
        return path
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(str(name_or_path), allow_patterns=[f"*{suffix}" for suffix in suffixes]))


def file_digest(path: Path) -> str:
    """sha256 of a file, or the content address a Hugging Face cache symlink points to."""
    if path.is_symlink():
        target = Path(os.readlink(path)).name
        if CONTENT_ADDRESS.match(target):
            return f"blob:{target}"
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(HASH_CHUNK_BYTES), b""):
            digest.update(chunk)
    return digest.hexdigest()


def directory_fingerprint(directory: str | os.PathLike, suffixes: tuple = MODEL_FILE_SUFFIXES) -> dict:
    """{"sha256", "files", "bytes"} of the defining files of a model folder (or, with
    TOKENIZER_FILE_SUFFIXES, of the tokenizer in it: weights are then left out)."""
    directory = Path(directory)
    files = sorted(p for p in directory.iterdir()
                   if p.is_file() and not p.name.startswith(".") and p.suffix in suffixes)
    if not files:
        raise FileNotFoundError(f"{directory} holds no model or tokenizer files")
    digest = hashlib.sha256()
    for path in files:
        digest.update(f"{path.name}\0{file_digest(path)}\n".encode("utf-8"))
    return {"sha256": digest.hexdigest(), "files": len(files), "bytes": sum(p.stat().st_size for p in files)}


def canonical_json(obj) -> str:
    return json.dumps(obj, ensure_ascii=False, sort_keys=True, separators=(",", ":"))


def settings_key(settings: dict) -> str:
    return hashlib.sha256(canonical_json(settings).encode("utf-8")).hexdigest()


def prompt_sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _flatten(obj, prefix="") -> dict:
    if not isinstance(obj, dict):
        return {prefix: obj}
    flat = {}
    for key, value in obj.items():
        flat.update(_flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return flat


def settings_diff(old: dict, new: dict) -> list[str]:
    """`"path: old -> new"` for every setting that differs."""
    before, after = _flatten(old), _flatten(new)
    return [f"{name}: {before.get(name)!r} -> {after.get(name)!r}"
            for name in sorted(set(before) | set(after)) if before.get(name) != after.get(name)]


class PredictionLog:
    """Predictions of one settings record: `path` (JSONL, appended) and `path`.settings.json."""

    def __init__(self, path: str | os.PathLike, settings: dict, id_field: str, advice: str):
        self.path, self.id_field = Path(path), id_field
        self.settings = json.loads(canonical_json(settings))  # as it reads back from disk (lists, not tuples)
        self.key = settings_key(self.settings)
        self.settings_path = self.path.with_name(self.path.name + SETTINGS_SUFFIX)
        self.advice = advice  # how to go on after a refusal (suite-specific)

    def _refuse(self, problem: str):
        raise PredictionMismatch(f"{problem}. Predictions are never reused across settings: {self.advice}")

    def check_settings(self) -> None:
        """Refuse when the stored settings differ from this run's (or are unknown)."""
        if self.settings_path.is_file():
            stored = json.loads(self.settings_path.read_text(encoding="utf-8"))
            differences = settings_diff(stored.get("settings", {}), self.settings)
            if differences:
                self._refuse(f"{self.path} holds predictions made under other settings "
                             f"({'; '.join(differences)})")
        elif self.path.is_file() and self.path.stat().st_size:
            self._refuse(f"{self.path} has no {self.settings_path.name} (made by an older version or by hand), "
                         "so what it was made under is unknown")

    def load(self, prompt_hashes: dict | None, repair: bool = True) -> tuple[dict, int]:
        """(records already made under these settings by id, bytes of a torn last line).

        `prompt_hashes` maps every id of this run to the sha256 of its prompt text (None: a reader
        without the prompts, e.g. a scorer, checks settings keys and duplicates only). A last line
        torn by a killed writer is cut from the file when `repair` (a writer about to append),
        else only skipped.
        """
        self.check_settings()
        torn = drop_torn_tail(self.path) if repair else 0
        done, lines = {}, {}
        if not self.path.is_file():
            return done, torn
        text = self.path.read_text(encoding="utf-8")
        if text and not text.endswith("\n"):
            torn = len(text) - (text.rfind("\n") + 1)
            text = text[:len(text) - torn]
        for number, line in enumerate(split_jsonl(text), start=1):
            if line.strip():
                record_id = self._check_record(line, f"{self.path}:{number}", prompt_hashes)
                if record_id in done:
                    raise PredictionMismatch(f"{self.path}:{number}: duplicate {self.id_field} {record_id!r} "
                                             f"(also line {lines[record_id]}); one prediction per "
                                             f"{self.id_field}: remove one")
                done[record_id], lines[record_id] = json.loads(line), number
        return done, torn

    def _check_record(self, line: str, where: str, prompt_hashes: dict | None):
        """The id of one record line, refused unless it was made under this key for this prompt."""
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            self._refuse(f"{where} is not a JSON record")
        record_id = record.get(self.id_field)
        if record.get(KEY_FIELD) != self.key:
            self._refuse(f"{where} was made under settings key {str(record.get(KEY_FIELD))[:12]}, "
                         f"not this run's {self.key[:12]}")
        if prompt_hashes is not None and record_id not in prompt_hashes:
            self._refuse(f"{where} is for {self.id_field} {record_id!r}, which this run does not have")
        if prompt_hashes is not None and record.get(PROMPT_FIELD) != prompt_hashes[record_id]:
            self._refuse(f"{where}: the prompt of {self.id_field} {record_id!r} changed since it was predicted")
        return record_id

    def append(self, record_id, prompt_hash: str, result: dict) -> dict:
        """Write the settings file first (once), then the record, flushed."""
        if not self.settings_path.is_file():
            write_json_atomic(self.settings_path, {"settings_key": self.key, "settings": self.settings})
        record = {self.id_field: record_id, KEY_FIELD: self.key, PROMPT_FIELD: prompt_hash, **result}
        append_jsonl(self.path, record)
        return record


def open_stored_log(path: str | os.PathLike, id_field: str, advice: str) -> PredictionLog:
    """The log at `path` under the settings stored beside it (for a reader such as a scorer)."""
    path = Path(path)
    settings_path = path.with_name(path.name + SETTINGS_SUFFIX)
    if not settings_path.is_file():
        raise PredictionMismatch(f"{path} has no {settings_path.name} (made by an older version or by hand), "
                                 f"so what its predictions were made under is unknown. {advice}")
    stored = json.loads(settings_path.read_text(encoding="utf-8"))
    return PredictionLog(path, stored["settings"], id_field, advice)
