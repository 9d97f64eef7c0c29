"""Loading checkpoints for training: the family, the RoPE ratio, the model class, the tokenizer.

    family = model_family(path)                       # "chatglm" | "llama", from config.json
    model = load_training_model(path, dtype=torch.bfloat16, rope_ratio=None)
    tokenizer = load_training_tokenizer(path, trust_remote_code=False)

The model is the family's training class (`longalign.modeling.weighted_lm`), with LongAlign's
packed attention registered in transformers and selected (`attn_implementation`). This package's
own code is used for both families, so loading a model never runs code from the checkpoint
folder; a tokenizer that is remote code (ChatGLM3's) needs `trust_remote_code=True`, asked for
explicitly.

RoPE ratio (ChatGLM only; base = 10000 * ratio). Read from the checkpoint itself, never assumed:
1. `rope_ratio` in its config.json, else
2. a ratio hard-coded in the modeling file it ships (`self.ratio = 200` in LongAlign's training
   code for ChatGLM), else
3. an error that asks for `--rope_ratio`.
An explicit `rope_ratio` argument overrides both (and a disagreement with the checkpoint is logged).
"""
from __future__ import annotations

import logging
import re
from pathlib import Path

from longalign.constants import MODEL_FAMILIES
from longalign.json_files import read_json_file
from longalign.modeling.packed_attention import ATTN_IMPLEMENTATION, register_packed_attention
from longalign.modeling.weighted_lm import TRAINING_CLASSES
from longalign.remote_code import load_tokenizer

logger = logging.getLogger(__name__)

CHATGLM_CODE_FILE = "modeling_chatglm.py"
TOKENIZER_FILES = ("tokenizer_config.json", "tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt")
_HARD_CODED_RATIO = re.compile(r"^\s*self\.ratio\s*=\s*([0-9]+(?:\.[0-9]*)?)\s*$", re.MULTILINE)


def read_config(model_path: str | Path) -> dict:
    config_file = Path(model_path) / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{model_path}: no config.json (download the checkpoint to a local folder first)")
    return read_json_file(config_file)


def model_family(model_path: str | Path) -> str:
    """'chatglm' or 'llama' from the checkpoint's config.json model_type."""
    model_type = read_config(model_path).get("model_type")
    if model_type not in MODEL_FAMILIES:
        raise ValueError(f"{model_path}/config.json: model_type {model_type!r}; supported: {MODEL_FAMILIES}")
    return model_type


def checkpoint_rope_ratio(model_path: str | Path) -> tuple[float | None, str]:
    """(ratio, where it was found) from the checkpoint's config.json or shipped modeling file."""
    config = read_config(model_path)
    if config.get("rope_ratio") is not None:
        return float(config["rope_ratio"]), "config.json rope_ratio"
    code = Path(model_path) / CHATGLM_CODE_FILE
    if code.is_file():
        found = _HARD_CODED_RATIO.findall(code.read_text(encoding="utf-8", errors="replace"))
        if len(set(found)) == 1:
            return float(found[0]), f"{CHATGLM_CODE_FILE}: self.ratio = {found[0]}"
        if len(set(found)) > 1:
            raise ValueError(f"{code}: several hard-coded RoPE ratios {sorted(set(found))}; pass --rope_ratio")
    return None, "not found"


def resolve_rope_ratio(model_path: str | Path, override: float | None) -> float:
    """The RoPE ratio to train a ChatGLM checkpoint with (module docstring); never a silent default."""
    found, where = checkpoint_rope_ratio(model_path)
    if override is not None:
        if found is not None and found != override:
            logger.warning("--rope_ratio %s overrides the checkpoint's %s (%s)", override, found, where)
        return float(override)
    if found is None:
        raise ValueError(
            f"{model_path}: the checkpoint does not say its RoPE ratio (no rope_ratio in config.json, none "
            f"hard-coded in a shipped {CHATGLM_CODE_FILE}). Pass --rope_ratio: 1 for THUDM/chatglm3-6b(-base), "
            "50 for chatglm3-6b-32k, 200 for LongAlign-6B-64k-base (LongAlign's training code hard-codes 200).")
    logger.info("RoPE ratio %s (%s)", found, where)
    return found


def load_training_model(model_path: str | Path, dtype, rope_ratio: float | None = None,
                        attn_implementation: str = ATTN_IMPLEMENTATION):
    """The family's training model (packed attention, weighted chunked loss) from a checkpoint."""
    family = model_family(model_path)
    if attn_implementation == ATTN_IMPLEMENTATION:
        register_packed_attention()
    overrides = {}
    if family == "chatglm":
        overrides["rope_ratio"] = resolve_rope_ratio(model_path, rope_ratio)
    elif rope_ratio is not None:
        raise ValueError("--rope_ratio applies to ChatGLM checkpoints; a Llama's RoPE is in its config.json")
    return TRAINING_CLASSES[family].from_pretrained(str(model_path), dtype=dtype,
                                                    attn_implementation=attn_implementation, **overrides)


def load_training_tokenizer(name: str | Path, trust_remote_code: bool = False, required: bool = True):
    """The tokenizer of `name` (longalign.data.tokenization.load_tokenizer: remote code only with
    `trust_remote_code`); None when the folder has no tokenizer file and `required` is False."""
    folder = Path(name)
    if not required and folder.is_dir() and not any((folder / f).is_file() for f in TOKENIZER_FILES):
        logger.info("no tokenizer in %s", name)
        return None
    return load_tokenizer(str(name), trust_remote_code=trust_remote_code)


def pad_token_id(tokenizer, config) -> int | None:
    """Pad id: the tokenizer's, else the config's pad, else its eos (padding is masked anyway)."""
    for value in (getattr(tokenizer, "pad_token_id", None), getattr(config, "pad_token_id", None),
                  getattr(config, "eos_token_id", None)):
        if isinstance(value, (list, tuple)):
            value = value[0] if value else None
        if value is not None:
            return int(value)
    return None
