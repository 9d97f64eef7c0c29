"""Candidate answers for the evaluation suites (DESIGN.md §6): one prompt path for every model.

`prepare_prompt` builds what a model reads, the same for a model loaded here (`LocalModel`) and
one behind an OpenAI-compatible server (`longalign.eval.served_model.ServedModel`):
1. Middle truncation, the paper's (the original LongBench_Chat/eval.py): a query longer than
   `max_length` keeps its first and its last `max_length // 2` units. With a tokenizer the units
   are its tokens (encoded without special tokens) and the two halves are decoded separately and
   joined into text, as the original does — re-encoding that text can give a token or two more
   or fewer than `max_length`; `prompt_tokens` records the exact count of what the model read.
   Without a tokenizer (a served model without `--tokenizer`) the units are characters.
2. The chat format (`longalign.eval.prompt_formats`) renders the prompt text around the query.
3. The text is tokenized with the tokenizer's own special tokens (BOS, ChatGLM3's `[gMASK]sop`):
   `tokenizer(text)` here, the server's tokenizer for `/completions`.

Local generation: the seed is reset before every case; temperature > 0 samples (with `top_p`
when given, else the model's generation config), temperature 0 is greedy; generation stops at
the config's or the tokenizer's EOS. Models load through `AutoModelForCausalLM` (Llama on CUDA
with `flash_attention_2` when flash-attn is installed, else `sdpa`); code shipped with a model
or tokenizer folder runs only with `trust_remote_code=True` (`--trust_remote_code`).
"""
from __future__ import annotations

import logging
import random
from dataclasses import asdict, dataclass
from typing import Sequence

from longalign.eval.prompt_formats import AUTO, CHATGLM, ChatFormat, render_prompt, resolve_chat_format
from longalign.remote_code import load_tokenizer, remote_code_guard
from longalign.eval.prediction_keys import directory_fingerprint, resolve_model_dir

logger = logging.getLogger(__name__)

TOKENS, CHARACTERS = "tokens", "characters"
LLAMA_MODEL_TYPE = "llama"
CHATGLM_CHAT_TOP_P = 0.8  # the original evaluations sampled ChatGLM through its model.chat: top_p 0.8


@dataclass
class GenerationSettings:
    max_new_tokens: int = 1024
    temperature: float = 1.0
    seed: int = 42
    max_length: int | None = None  # middle-truncate queries longer than this (None: never)
    top_p: float | None = None  # None: the model's generation config (a server's default)

    def record(self) -> dict:
        record = asdict(self)
        record.pop("max_length")  # recorded with the truncation unit
        return record


def seed_everything(seed: int) -> None:
    """Seed Python, numpy and torch (all devices), so a case's sampling is reproducible."""
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


def middle_truncate(units: Sequence, max_length: int | None):
    """`units` if it has at most `max_length` items, else its first and last `max_length // 2`.

    >>> middle_truncate("abcdefghij", 4)
    'abij'
    """
    if max_length is None or len(units) <= max_length:
        return units if isinstance(units, str) else list(units)
    if max_length < 2:
        raise ValueError(f"max_length must be >= 2 for middle truncation, got {max_length}")
    half = max_length // 2
    head, tail = units[:half], units[-half:]
    return head + tail if isinstance(units, str) else list(head) + list(tail)


def encode_text(tokenizer, text: str) -> list[int]:
    """Token ids of `text` without special tokens."""
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def encode_prompt(tokenizer, text: str) -> list[int]:
    """Token ids of a rendered prompt, with the tokenizer's own special tokens."""
    return list(tokenizer(text, add_special_tokens=True)["input_ids"])


@dataclass
class PreparedPrompt:
    text: str  # what the model reads (for the `server` format: the user message)
    unit: str  # TOKENS or CHARACTERS
    query_length: int
    kept_query_length: int

    def record(self) -> dict:
        return {"truncation_unit": self.unit, "query_length": self.query_length,
                "kept_query_length": self.kept_query_length,
                "truncated": self.kept_query_length < self.query_length}


def truncate_query(query: str, tokenizer, max_length: int | None) -> tuple[str, str, int, int]:
    """(text, unit, length, kept length) of the paper's middle truncation (module docstring)."""
    if tokenizer is None:
        kept = middle_truncate(query, max_length)
        return kept, CHARACTERS, len(query), len(kept)
    ids = encode_text(tokenizer, query)
    kept = middle_truncate(ids, max_length)
    if len(kept) == len(ids):
        return query, TOKENS, len(ids), len(ids)
    half = len(kept) // 2
    text = (tokenizer.decode(kept[:half], skip_special_tokens=True)
            + tokenizer.decode(kept[half:], skip_special_tokens=True))
    return text, TOKENS, len(ids), len(kept)


def prepare_prompt(query: str, chat_format: ChatFormat, tokenizer, max_length: int | None) -> PreparedPrompt:
    text, unit, length, kept = truncate_query(query, tokenizer, max_length)
    return PreparedPrompt(render_prompt(chat_format, text, tokenizer), unit, length, kept)


def load_config(path: str, trust_remote_code: bool = False):
    from transformers import AutoConfig

    return remote_code_guard(path, lambda: AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code))


def resolve_dtype(dtype: str, device: str):
    import torch

    if dtype == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    if not isinstance(getattr(torch, dtype, None), torch.dtype):
        raise ValueError(f"unknown --dtype {dtype!r}")
    return getattr(torch, dtype)


def attn_implementation_for(model_type: str | None, device: str) -> str | None:
    """flash_attention_2 (when installed) or sdpa for Llama on CUDA; None: transformers' default."""
    if model_type != LLAMA_MODEL_TYPE or not device.startswith("cuda"):
        return None
    from transformers.utils import is_flash_attn_2_available

    return "flash_attention_2" if is_flash_attn_2_available() else "sdpa"


def default_top_p(chat_format: ChatFormat) -> float | None:
    """top_p when none is asked for: 0.8 for the chatglm format (as the original's model.chat), else
    None (the model's generation config, or the server's default)."""
    return CHATGLM_CHAT_TOP_P if chat_format.name == CHATGLM else None


class Candidate:
    """A model under evaluation: `identity()` + tokenizer + chat format determine its predictions."""

    chat_format: ChatFormat
    tokenizer = None
    tokenizer_path: str | None = None
    tokenizer_fingerprint: dict | None = None

    def identity(self) -> dict:
        raise NotImplementedError

    def respond(self, query: str, settings: GenerationSettings, stop=None) -> dict:
        raise NotImplementedError

    def truncation_unit(self) -> str:
        return TOKENS if self.tokenizer is not None else CHARACTERS

    def settings_record(self, settings: GenerationSettings) -> dict:
        """Everything that determines a prediction except the prompt text (prediction_keys.py)."""
        tokenizer = None if self.tokenizer is None else {"path": self.tokenizer_path,
                                                         "fingerprint": self.tokenizer_fingerprint}
        return {"candidate": self.identity(), "tokenizer": tokenizer, "chat_format": self.chat_format.record(),
                "truncation": {"max_length": settings.max_length, "unit": self.truncation_unit()},
                "generation": settings.record()}


class LocalModel(Candidate):
    """A model loaded here with transformers; the weights load on the first `respond`."""

    def __init__(self, path: str, chat_format: str = AUTO, dtype: str = "auto", device: str | None = None,
                 trust_remote_code: bool = False):
        import torch

        self.path, self.trust_remote_code = str(path), trust_remote_code
        self.local_dir = resolve_model_dir(self.path)
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.dtype = resolve_dtype(dtype, self.device)
        self.tokenizer = load_tokenizer(str(self.local_dir), trust_remote_code)
        self.config = load_config(str(self.local_dir), trust_remote_code)
        model_type = getattr(self.config, "model_type", None)
        self.chat_format = resolve_chat_format(chat_format, self.path, self.tokenizer, model_type)
        self.attn_implementation = attn_implementation_for(model_type, self.device)
        self.tokenizer_path = self.path
        self.fingerprint = directory_fingerprint(self.local_dir)
        self.tokenizer_fingerprint = self.fingerprint  # the tokenizer files are part of the model folder
        self._model = None

    def identity(self) -> dict:
        return {"kind": "local", "model": self.path, "fingerprint": self.fingerprint,
                "dtype": str(self.dtype).removeprefix("torch."), "device_type": self.device.split(":")[0],
                "attn_implementation": self.attn_implementation}

    @property
    def model(self):
        if self._model is None:
            self._model = self._load()
        return self._model

    def _load(self):
        from transformers import AutoModelForCausalLM

        kwargs = {"dtype": self.dtype, "trust_remote_code": self.trust_remote_code}
        if self.attn_implementation is not None:
            kwargs["attn_implementation"] = self.attn_implementation
        model = remote_code_guard(self.path, lambda: AutoModelForCausalLM.from_pretrained(str(self.local_dir),
                                                                                           **kwargs))
        model = model.to(self.device).eval()
        logger.info("loaded %s (chat format %s, dtype %s, device %s, attention %s)", self.path,
                    self.chat_format.name, self.dtype, self.device, self.attn_implementation or "default")
        return model

    def respond(self, query: str, settings: GenerationSettings, stop=None) -> dict:
        """Middle-truncate, render, seed and generate; the reply with its truncation record."""
        prompt = prepare_prompt(query, self.chat_format, self.tokenizer, settings.max_length)
        input_ids = encode_prompt(self.tokenizer, prompt.text)
        seed_everything(settings.seed)
        response, finish_reason = sample(self.model, self.tokenizer, input_ids, settings)
        return {"response": response, **prompt.record(), "prompt_tokens": len(input_ids),
                "finish_reason": finish_reason}


def load_model_and_tokenizer(model_path: str, chat_format: str = AUTO, dtype: str = "auto", device: str | None = None,
                             trust_remote_code: bool = False):
    """(model, tokenizer, chat format name) of a local model, loaded now (for callers outside the suites)."""
    local = LocalModel(model_path, chat_format, dtype, device, trust_remote_code)
    return local.model, local.tokenizer, local.chat_format.name


def stop_token_ids(model, tokenizer) -> list[int]:
    """EOS ids of the model's generation config and of the tokenizer, together."""
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids = set(configured if isinstance(configured, (list, tuple)) else [configured])
    ids.add(tokenizer.eos_token_id)
    return sorted(i for i in ids if i is not None)


def sample(model, tokenizer, input_ids: Sequence[int], settings: GenerationSettings) -> tuple[str, str]:
    """(decoded new tokens, finish reason) of a generation from `input_ids` (temperature 0 = greedy).

    The finish reason is the OpenAI API's: "stop" when an EOS ended it, "length" at max_new_tokens.
    """
    import torch

    device = next(model.parameters()).device
    inputs = torch.tensor([list(input_ids)], dtype=torch.long, device=device)
    kwargs = {"max_new_tokens": settings.max_new_tokens, "num_beams": 1, "do_sample": settings.temperature > 0}
    if settings.temperature > 0:
        kwargs["temperature"] = settings.temperature
        if settings.top_p is not None:
            kwargs["top_p"] = settings.top_p
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    stops = stop_token_ids(model, tokenizer)
    with torch.no_grad():
        output = model.generate(inputs, attention_mask=torch.ones_like(inputs), pad_token_id=pad,
                                eos_token_id=stops, **kwargs)
    new = output[0, inputs.shape[1]:].tolist()
    finish = "stop" if any(token in stops for token in new) else "length"
    return tokenizer.decode(new, skip_special_tokens=True).strip(), finish

