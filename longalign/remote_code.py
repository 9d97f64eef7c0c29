"""The one door to code a model or tokenizer folder ships: nothing runs without trust_remote_code.

`load_tokenizer` checks a local folder's JSON files and its `auto_map` before transformers runs
anything; `remote_code_guard` turns transformers' own refusal (configs, models) into
`RemoteCodeRequired`, a ValueError naming --trust_remote_code.
"""
from __future__ import annotations

import json
from pathlib import Path

from longalign.json_files import check_json_files

REMOTE_CODE_HINT = "trust_remote_code"  # transformers' refusal names the argument


class RemoteCodeRequired(ValueError):
    """A model or tokenizer folder needs its own Python code and --trust_remote_code was not given."""


def remote_code_guard(path: str, load):
    """Run `load()`; transformers' refusal to run a folder's own code becomes a RemoteCodeRequired."""
    try:
        return load()
    except ValueError as err:
        if REMOTE_CODE_HINT not in str(err):
            raise
        raise RemoteCodeRequired(f"{path} ships its own Python code (an auto_map in its config) that must run "
                                 "to load it; pass --trust_remote_code if you trust that code") from err


REMOTE_CODE_FILES = ("tokenizer_config.json", "config.json")  # where an `auto_map` names custom classes


def _remote_code_classes(path_or_id: str) -> tuple[str, dict] | None:
    """(file, auto_map) when a local tokenizer folder ships its own tokenizer class, else None.

    Only an `AutoTokenizer` entry (or the old list form) names tokenizer code: a model's config.json
    whose auto_map lists its model classes (this repo's ChatGLM checkpoints) runs no tokenizer code.
    """
    for name in REMOTE_CODE_FILES:
        config_file = Path(path_or_id) / name
        if config_file.is_file():
            try:
                auto_map = json.loads(config_file.read_text(encoding="utf-8")).get("auto_map")
            except (ValueError, AttributeError):
                continue  # not our concern here: transformers reports an unreadable config
            if auto_map and (not isinstance(auto_map, dict) or "AutoTokenizer" in auto_map):
                return name, auto_map
    return None


def load_tokenizer(path_or_id: str, trust_remote_code: bool = False):
    """AutoTokenizer.from_pretrained; a tokenizer that ships Python code loads only with
    `trust_remote_code` (--trust_remote_code): ChatGLM3's does, byte-level BPE folders do not.
    A local folder's JSON files are parsed first: a broken one is an error naming it."""
    from transformers import AutoTokenizer

    check_json_files(path_or_id)  # a broken file is named, not a bare JSONDecodeError
    remote = None if trust_remote_code else _remote_code_classes(path_or_id)
    if remote is not None:
        raise RemoteCodeRequired(f"tokenizer {path_or_id!r} ships its own Python code ({remote[0]} has auto_map "
                                 f"{remote[1]}), which runs only with --trust_remote_code (ChatGLM3's tokenizer "
                                 "is such a tokenizer): read that code, then pass --trust_remote_code")
    try:
        return remote_code_guard(path_or_id, lambda: AutoTokenizer.from_pretrained(
            path_or_id, trust_remote_code=trust_remote_code))
    except OSError as err:  # re-raised with the hint a user needs (offline, typo in the path)
        raise OSError(f"cannot load tokenizer {path_or_id!r}: {err}. Pass --tokenizer with a local "
                      "tokenizer directory (offline, `python -m longalign.demo.data` makes one)") from err
