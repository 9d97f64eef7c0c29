"""A needle prompt folder, written and read as one unit.

prompt.py writes every prompt file, `stats.json` and `manifest.json` into a temporary folder
and then replaces the whole prompt folder (`longalign.storage.atomic_dir`), so prompts of an
earlier configuration never remain beside new ones. A folder that exists but holds no
manifest (not written by prompt.py) is refused, never replaced. The manifest lists every
prompt id with the sha256 of its prompt text; `prompt_set_sha256` (over those) identifies the
set, and pred.py keys its predictions by it. pred.py reads exactly the files the manifest
lists and refuses a folder whose files disagree with it.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from longalign.eval.prediction_keys import canonical_json, prompt_sha256
from longalign.storage import atomic_dir, write_json_atomic

MANIFEST = "manifest.json"
STATS = "stats.json"
PROMPT_GLOB = "len*_depth*.json"


class PromptSetError(ValueError):
    """A prompt folder is not one prompt.py wrote, or its files disagree with its manifest."""


def prompt_set_sha256(prompt_hashes: dict) -> str:
    return hashlib.sha256(canonical_json(sorted(prompt_hashes.items())).encode("utf-8")).hexdigest()


def write_prompt_set(save_dir: str | os.PathLike, records: list[dict], stats: dict, config: dict) -> dict:
    """Replace `save_dir` with these prompts, their stats and manifest; return the manifest."""
    save_dir = Path(save_dir)
    if save_dir.exists() and not (save_dir / MANIFEST).is_file() and (not save_dir.is_dir() or any(save_dir.iterdir())):
        raise PromptSetError(f"{save_dir} exists and was not written by prompt.py (no {MANIFEST}); "
                             "it is not replaced: pass another save_dir / --save_dir")
    ids = [record["id"] for record in records]
    if len(set(ids)) != len(ids):
        raise PromptSetError(f"duplicate prompt ids {sorted({i for i in ids if ids.count(i) > 1})}")
    hashes = {record["id"]: prompt_sha256(record["prompt"]) for record in records}
    manifest = {"prompt_set_sha256": prompt_set_sha256(hashes), "prompts": hashes, "config": config}
    with atomic_dir(save_dir) as tmp:
        for record in records:
            write_json_atomic(tmp / f"{record['id']}.json", record)
        write_json_atomic(tmp / STATS, stats)
        write_json_atomic(tmp / MANIFEST, manifest)
    return manifest


def read_prompt_set(prompt_dir: str | os.PathLike) -> tuple[dict, list[dict]]:
    """(manifest, prompt records in id order), checked against each other."""
    prompt_dir = Path(prompt_dir)
    if not (prompt_dir / MANIFEST).is_file():
        hint = "run Needle_test/prompt.py first" if not any(prompt_dir.glob(PROMPT_GLOB)) else \
            f"it has prompt files but no {MANIFEST} (an older prompt.py): run Needle_test/prompt.py again"
        raise FileNotFoundError(f"no prompt set in {prompt_dir}: {hint}")
    manifest = json.loads((prompt_dir / MANIFEST).read_text(encoding="utf-8"))
    listed = manifest["prompts"]
    strays = sorted(p.stem for p in prompt_dir.glob(PROMPT_GLOB) if p.stem not in listed)
    if strays:
        raise PromptSetError(f"{prompt_dir}: prompt files not in its {MANIFEST}: {strays[:5]}")
    records = []
    for prompt_id in sorted(listed):
        path = prompt_dir / f"{prompt_id}.json"
        if not path.is_file():
            raise PromptSetError(f"{prompt_dir}: {path.name} is listed in {MANIFEST} but missing")
        record = json.loads(path.read_text(encoding="utf-8"))
        if record.get("id") != prompt_id or prompt_sha256(record["prompt"]) != listed[prompt_id]:
            raise PromptSetError(f"{path}: does not match {MANIFEST} (edited after prompt.py wrote it?)")
        records.append(record)
    return manifest, records


def needle_of(manifest: dict) -> dict:
    """The needle and retrieval question a prompt set was built with (from its manifest)."""
    made_with = manifest.get("config") or {}
    return {"needle": made_with.get("needle"), "retrieval_question": made_with.get("retrieval_question")}
