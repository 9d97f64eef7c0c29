"""Reading a checkpoint's or tokenizer's JSON files with errors that name the file.

A truncated tokenizer.json or a hand-edited tokenizer_config.json otherwise surfaces from
transformers as a bare `JSONDecodeError: Expecting ',' delimiter: line 5 column 37`, which names
no file. Every stage loads tokenizers through `longalign.data.tokenization.load_tokenizer` or
`longalign.eval.generation.load_tokenizer`; both check the folder's JSON files here first.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

# The JSON files transformers may read to build a tokenizer from a local folder.
TOKENIZER_JSON_FILES = ("tokenizer_config.json", "tokenizer.json", "special_tokens_map.json", "added_tokens.json",
                        "vocab.json", "config.json")


class BrokenJsonFileError(ValueError):
    """A JSON file that does not parse; the message names the file, line and column."""


def read_json_file(path: str | os.PathLike):
    """The parsed content of `path`; BrokenJsonFileError naming the file when it is not valid JSON."""
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise BrokenJsonFileError(f"{path}: not valid JSON ({err.msg} at line {err.lineno} column {err.colno}); "
                                  "the file is truncated or was edited by hand: copy or download it again") from err
    except UnicodeDecodeError as err:
        raise BrokenJsonFileError(f"{path}: not UTF-8 text (byte {err.start}); copy or download it again") from err


def check_json_files(folder: str | os.PathLike, names=TOKENIZER_JSON_FILES) -> None:
    """Parse each of `names` present in the local `folder` (none for a hub id): a broken one is an
    error naming it."""
    folder = Path(folder)
    if not folder.is_dir():
        return
    for name in names:
        if (folder / name).is_file():
            read_json_file(folder / name)
