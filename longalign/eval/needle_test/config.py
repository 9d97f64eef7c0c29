"""The needle test's YAML configs, checked before any work: every key known, typed and in range.

Each script's config has a schema (`PROMPT_SCHEMA`, `PRED_SCHEMA`, `EVAL_SCHEMA`): sections
(mappings) of `Key`s. `load_config` refuses, with one `NeedleConfigError` naming the file and
every `section.key` at fault:
- an unknown key (a typo such as `interval_typ` is never ignored; the closest known key is named);
- a missing required key (keys a flag can give, e.g. `save_dir` / --save_dir, are required only
  when the flag is not given);
- a value of the wrong type (a scalar where a list belongs, a string for a number) or out of
  range (`count: 0`, a depth outside [0, 100], an interval type other than linear or sigmoid).
Lengths and depths are a `list` or all of `min_*`, `max_*` and `count` (checked in
`_range_problems`). Relative paths inside a config are resolved against its directory (`resolve`).
"""
from __future__ import annotations

import difflib
import os
from dataclasses import dataclass
from pathlib import Path

from longalign.eval.prompt_formats import REQUESTABLE
from longalign.eval.openai_api import APIS

PERCENT = 100.0
SCORERS = ("judge", "match")
INTERVAL_TYPES = ("linear", "sigmoid")
DIR_KEY = "_dir"  # added after checking: the config's folder, for `resolve`


class NeedleConfigError(ValueError):
    """A needle config is not valid; the message names the file and every section.key at fault."""


@dataclass(frozen=True)
class Key:
    """One config value: its type (str, int, number, bool, or a list of one of those), whether it
    must be given, may be null, its bounds or choices."""

    kind: str
    required: bool = False
    nullable: bool = False
    minimum: float | None = None
    maximum: float | None = None
    above: float | None = None  # strictly greater than
    choices: tuple = ()


_TYPES = {"str": (str,), "int": (int,), "number": (int, float), "bool": (bool,)}
TEXT, PATH, OPTIONAL_PATH = Key("str", required=True), Key("str"), Key("str", nullable=True)
COUNT, LENGTH = Key("int", minimum=1), Key("int", minimum=1)
PERCENT_KEY = Key("number", minimum=0, maximum=PERCENT)

PROMPT_SCHEMA = {
    "prompt": {"needle": TEXT, "haystack_dir": OPTIONAL_PATH, "retrieval_question": TEXT},
    "context": {"min_len": LENGTH, "max_len": LENGTH, "count": COUNT,
                "list": Key("list_int", nullable=True, minimum=1)},
    "document_depth": {"min_percent": PERCENT_KEY, "max_percent": PERCENT_KEY, "count": COUNT,
                       "interval_type": Key("str", choices=INTERVAL_TYPES),
                       "list": Key("list_number", nullable=True, minimum=0, maximum=PERCENT)},
    "tokenizer": {"model_name": Key("str", required=True), "trust_remote_code": Key("bool", nullable=True)},
    "final_context_buffer": Key("int", required=True, minimum=0),
    "save_dir": Key("str", required=True),
}
_MODEL_TEXT = Key("str", nullable=True)
PRED_SCHEMA = {
    "model": {"model": _MODEL_TEXT, "model_name": _MODEL_TEXT, "model_base_url": _MODEL_TEXT,
              "model_api": Key("str", nullable=True, choices=APIS), "tokenizer": _MODEL_TEXT,
              "chat_format": Key("str", nullable=True, choices=REQUESTABLE),
              "family": Key("str", nullable=True, choices=REQUESTABLE),  # the original's name for chat_format
              "dtype": _MODEL_TEXT, "trust_remote_code": Key("bool", nullable=True),
              "model_timeout_s": Key("number", nullable=True, above=0),
              "model_concurrency": Key("int", nullable=True, minimum=1),
              "model_max_attempts": Key("int", nullable=True, minimum=1),
              "model_backoff_s": Key("number", nullable=True, minimum=0),
              "model_max_backoff_s": Key("number", nullable=True, minimum=0)},
    "generation": {"max_new_tokens": Key("int", minimum=1), "temperature": Key("number", minimum=0),
                   "seed": Key("int", minimum=0), "top_p": Key("number", nullable=True, above=0, maximum=1)},
    "prompt_dir": Key("str", required=True),
    "save_file": Key("str", required=True),
}
EVAL_SCHEMA = {
    "pred_file": Key("str", required=True),
    "save_dir": Key("str", required=True),
    "scorer": Key("str", choices=SCORERS),
    "judge": {"model_name": Key("str"), "base_url": Key("str", nullable=True),
              "concurrency": Key("int", minimum=1), "backoff_s": Key("number", minimum=0),
              "max_backoff_s": Key("number", minimum=0), "max_attempts": Key("int", minimum=1),
              "timeout_s": Key("number", above=0),
              # the question shown to the judge (the original's config: the short form, without the
              # prompt's "Here is the most relevant sentence" ending); default: the question asked
              "question": Key("str", nullable=True)},
    # optional: when given, it must be the needle and question the predictions were made with
    "prompt": {"needle": Key("str"), "retrieval_question": Key("str")},
    "key_facts": Key("list_str", nullable=True),
}
RANGE_SPECS = {"context": ("min_len", "max_len"), "document_depth": ("min_percent", "max_percent")}


def _type_problem(name: str, value, key: Key) -> str | None:
    """What is wrong with `value` for `key` (None: nothing)."""
    if value is None:
        return None if key.nullable else f"{name}: must not be null"
    is_list = key.kind.startswith("list_")
    items = value if is_list else [value]
    base = key.kind.removeprefix("list_")
    if is_list and not isinstance(value, list):
        return f"{name}: expected a list of {base} values, got {type(value).__name__} {value!r}"
    if is_list and not value:
        return f"{name}: the list is empty (give values, or null)"
    for item in items:
        if not isinstance(item, _TYPES[base]) or (base != "bool" and isinstance(item, bool)):  # YAML true is no 1
            return f"{name}: expected {base}, got {type(item).__name__} {item!r}"
        if key.choices and item not in key.choices:
            return f"{name}: must be one of {', '.join(map(str, key.choices))}, got {item!r}"
        if base == "str" and not item.strip():
            return f"{name}: must not be empty"
        bounds = _bounds(key)
        if any(not holds(item) for _, holds in bounds):
            return f"{name}: must be {' and '.join(text for text, _ in bounds)}, got {item!r}"
    return None


def _bounds(key: Key) -> list:
    """[(description, test)] of the key's bounds."""
    bounds = []
    if key.minimum is not None:
        bounds.append((f">= {key.minimum:g}", lambda x: x >= key.minimum))
    if key.above is not None:
        bounds.append((f"> {key.above:g}", lambda x: x > key.above))
    if key.maximum is not None:
        bounds.append((f"<= {key.maximum:g}", lambda x: x <= key.maximum))
    return bounds


def _unknown(name: str, known) -> str:
    leaf = name.rpartition(".")[2]
    close = difflib.get_close_matches(leaf, list(known), n=1)
    hint = f"did you mean {close[0]}?" if close else f"known keys: {', '.join(known)}"
    return f"{name}: unknown key ({hint})"


def check(config: dict, schema: dict, provided=(), prefix: str = "") -> list[str]:
    """Every problem of `config` against `schema`; `provided` names dotted keys a flag gives."""
    problems = [_unknown(prefix + str(name), schema) for name in config if name not in schema]
    for name, spec in schema.items():
        full = prefix + name
        if isinstance(spec, dict):
            section = config.get(name)
            if section is None and name in config:
                problems.append(f"{full}: must be a section (a mapping), got null")
            elif section is not None and not isinstance(section, dict):
                problems.append(f"{full}: must be a section (a mapping), got {type(section).__name__} {section!r}")
            elif isinstance(section, dict) or any(k.required for k in spec.values()):
                problems += check(section or {}, spec, provided, full + ".")
        elif name not in config:
            if spec.required and full not in provided:
                problems.append(f"{full}: missing")
        else:
            problems += [p for p in [_type_problem(full, config[name], spec)] if p]
    return problems


def _range_problems(config: dict) -> list[str]:
    """Lengths and depths: a non-empty `list`, or min, max and count with min <= max."""
    problems = []
    for section, (low, high) in RANGE_SPECS.items():
        if section not in config:
            problems.append(f"{section}: missing (a list, or {low}, {high} and count)")
        spec = config.get(section)
        if not isinstance(spec, dict) or spec.get("list") is not None:
            continue  # not a section: reported by `check`
        missing = [f"{section}.{k}" for k in (low, high, "count") if spec.get(k) is None]
        if missing:
            problems.append(f"{', '.join(missing)}: missing (needed when {section}.list is not given)")
        elif all(_is_number(spec[k]) for k in (low, high)) and spec[low] > spec[high]:
            problems.append(f"{section}.{low}: {spec[low]} is above {section}.{high} ({spec[high]})")
    return problems


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def load_config(path: str | os.PathLike, schema: dict, provided=()) -> dict:
    """Read and check a YAML config (module docstring); `provided`: dotted keys given by flags."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config {path} not found")
    try:
        config = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        raise NeedleConfigError(f"{path}: not valid YAML: {err}") from None
    config = {} if config is None else config
    if not isinstance(config, dict):
        raise NeedleConfigError(f"{path}: expected a mapping at the top level, got {type(config).__name__}")
    problems = check(config, schema, set(provided))
    if schema is PROMPT_SCHEMA:
        problems += _range_problems(config)
    if problems:
        raise NeedleConfigError(f"{path}: {len(problems)} problem(s): " + "; ".join(problems))
    config[DIR_KEY] = str(path.resolve().parent)
    return config


def resolve(config: dict, value: str | None) -> Path | None:
    """A path of the config: absolute as given, relative ones against the config's folder."""
    if value is None:
        return None
    value = Path(os.path.expanduser(str(value)))
    return value if value.is_absolute() else Path(config[DIR_KEY]) / value
