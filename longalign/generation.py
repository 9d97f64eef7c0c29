"""Generation for the evaluation suites (DESIGN.md §6): loading, chat prompts, truncation, sampling.

Chat format per family (the `family` of `detect_family`):
- `chatglm`: `model.chat(tokenizer, query, history=[], ...)` of modeling_chatglm.py, which builds
  the `[Round 1]\\n\\n问：...\\n\\n答：` prompt with `longalign.templates.build_prompt`;
- `llama` (LongAlign-7B/13B and this repo's Llama checkpoints): `[INST]{query}[/INST]` from
  `longalign.templates.build_prompt`;
- `chat_template`: any other model, through its tokenizer's own chat template.

Middle truncation (LongBench-Chat): a query longer than `max_length` tokens keeps its first and
its last `max_length // 2` tokens. For `llama` and `chat_template` this is done on token ids, so
the model sees exactly those tokens between the tokenized prompt prefix and suffix; `chatglm`
takes text, so the two halves are decoded and joined (the paper's way).
"""
from __future__ import annotations

import logging
import os
import random
from dataclasses import dataclass
from typing import Sequence

from longalign.chat_template import is_training_template
from longalign.constants import MODEL_FAMILIES

logger = logging.getLogger(__name__)

FAMILIES = ("chatglm", "llama", "chat_template")
CHATGLM_NAME_HINTS = ("chatglm", "longalign-6b")
LLAMA_NAME_HINTS = ("longalign-7b", "longalign-13b")
_QUERY_SLOT = "\u2063QUERY\u2063"  # stands for the query while a template is split around it


def detect_family(model_path: str, tokenizer=None, model_type: str | None = None) -> str:
    """The chat format of a model: explicit name hints first, then its config and tokenizer.

    The original scripts matched on the model path; a local checkpoint dir named otherwise is
    recognised by `config.model_type`. A model that is neither ChatGLM nor Llama needs a chat
    template in its tokenizer, else a clear error asks for `--family`.
    """
    name = os.path.basename(os.path.normpath(str(model_path))).lower() or str(model_path).lower()
    if any(hint in name for hint in CHATGLM_NAME_HINTS) or model_type == "chatglm":
        return "chatglm"
    if any(hint in name for hint in LLAMA_NAME_HINTS):
        return "llama"
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if has_template and model_type in MODEL_FAMILIES and is_training_template(tokenizer, model_type):
        return model_type  # a checkpoint of this repo: its template is the family's training format
    if model_type == "llama" and not has_template:
        return "llama"
    if has_template:
        return "chat_template"
    raise ValueError(f"cannot tell the chat format of {model_path!r} (model_type={model_type!r}, "
                     f"no tokenizer chat template); pass --family one of {FAMILIES}")


def seed_everything(seed: int) -> None:
    """Seed Python, numpy and torch (all devices), so a case's sampling is reproducible."""
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


def middle_truncate(ids: Sequence[int], max_length: int | None) -> list[int]:
    """`ids` if it has at most `max_length` tokens, else its first and last `max_length // 2`."""
    ids = list(ids)
    if max_length is None or len(ids) <= max_length:
        return ids
    if max_length < 2:
        raise ValueError(f"max_length must be >= 2 for middle truncation, got {max_length}")
    half = max_length // 2
    return ids[:half] + ids[-half:]


def template_around_query(family: str, tokenizer) -> tuple[str, str]:
    """The prompt text before and after the query for a one-round chat (no history)."""
    if family == "llama":
        from longalign.templates import build_prompt

        text = build_prompt("llama", [], _QUERY_SLOT)
    elif family == "chat_template":
        text = tokenizer.apply_chat_template([{"role": "user", "content": _QUERY_SLOT}],
                                             tokenize=False, add_generation_prompt=True)
    else:
        raise ValueError(f"family {family!r} has no text template here (chatglm uses model.chat)")
    if text.count(_QUERY_SLOT) != 1:
        raise ValueError(f"the {family} template does not contain the query exactly once")
    prefix, suffix = text.split(_QUERY_SLOT)
    return prefix, suffix


def encode_text(tokenizer, text: str) -> list[int]:
    """Token ids of `text` without special tokens."""
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def build_input_ids(family: str, tokenizer, query_ids: Sequence[int]) -> list[int]:
    """BOS (if the tokenizer adds one and the template does not) + prefix + query + suffix ids."""
    prefix, suffix = template_around_query(family, tokenizer)
    ids = encode_text(tokenizer, prefix) + list(query_ids) + encode_text(tokenizer, suffix)
    bos = getattr(tokenizer, "bos_token_id", None)
    adds_bos = bos is not None and tokenizer("x")["input_ids"][:1] == [bos]
    if adds_bos and (not ids or ids[0] != bos):
        ids = [bos] + ids
    return ids


@dataclass
class GenerationSettings:
    max_new_tokens: int = 1024
    temperature: float = 1.0
    seed: int = 42
    max_length: int | None = None  # middle-truncate queries longer than this (None: never)


def generate_response(model, tokenizer, family: str, query: str, settings: GenerationSettings) -> dict:
    """Seed, middle-truncate `query`, run one chat round; return the reply and token counts."""
    seed_everything(settings.seed)
    query_ids = encode_text(tokenizer, query)
    kept = middle_truncate(query_ids, settings.max_length)
    info = {"query_tokens": len(query_ids), "kept_query_tokens": len(kept),
            "truncated": len(kept) < len(query_ids)}
    if family == "chatglm":
        text = query if not info["truncated"] else _decode_halves(tokenizer, kept)
        response, _ = model.chat(tokenizer, text, history=[], max_new_tokens=settings.max_new_tokens,
                                 temperature=settings.temperature)
        return {"response": str(response).strip(), **info}
    input_ids = build_input_ids(family, tokenizer, kept)
    response = sample(model, tokenizer, input_ids, settings)
    return {"response": response, "prompt_tokens": len(input_ids), **info}


def _decode_halves(tokenizer, kept: list[int]) -> str:
    half = len(kept) // 2
    return (tokenizer.decode(kept[:half], skip_special_tokens=True)
            + tokenizer.decode(kept[half:], skip_special_tokens=True))


def sample(model, tokenizer, input_ids: Sequence[int], settings: GenerationSettings) -> str:
    """Generate from `input_ids` (temperature 0 = greedy) and decode only the new tokens."""
    import torch

    device = next(model.parameters()).device
    inputs = torch.tensor([list(input_ids)], dtype=torch.long, device=device)
    kwargs = {"max_new_tokens": settings.max_new_tokens, "num_beams": 1}
    if settings.temperature > 0:
        kwargs.update(do_sample=True, temperature=settings.temperature)
    else:
        kwargs.update(do_sample=False)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    with torch.no_grad():
        output = model.generate(inputs, attention_mask=torch.ones_like(inputs), pad_token_id=pad, **kwargs)
    return tokenizer.decode(output[0, inputs.shape[1]:], skip_special_tokens=True).strip()


def load_model_and_tokenizer(model_path: str, family: str | None = None, dtype: str = "auto",
                             device: str | None = None):
    """Load a model for generation; returns `(model, tokenizer, family)`.

    ChatGLM checkpoints of this repo carry their remote code (its `.chat`); Llama checkpoints are
    stock transformers.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    tokenizer = AutoTokenizer.from_pretrained(model_path, trust_remote_code=True)
    model_type = getattr(AutoConfig.from_pretrained(model_path, trust_remote_code=True), "model_type", None)
    family = family or detect_family(model_path, tokenizer, model_type)
    if family not in FAMILIES:
        raise ValueError(f"--family must be one of {FAMILIES}, got {family!r}")
    torch_dtype = _resolve_dtype(dtype, device)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch_dtype, trust_remote_code=True)
    model = model.to(device).eval()
    logger.info("loaded %s (family %s, dtype %s, device %s)", model_path, family, torch_dtype, device)
    return model, tokenizer, family


def _resolve_dtype(dtype: str, device: str):
    import torch

    if dtype == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    if not hasattr(torch, dtype):
        raise ValueError(f"unknown --dtype {dtype!r}")
    return getattr(torch, dtype)
