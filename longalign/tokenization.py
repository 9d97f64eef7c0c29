"""Conversations -> (input_ids, labels) with exact label spans, truncation and a process pool.

Label exactness. BPE merges can cross the boundary between a prompt and a reply when the whole
text is tokenized at once (SentencePiece-style tokenizers do not pre-split on punctuation, so
"[/INST]" + ".lock" can become one token "[/INST].lock"), and then no token boundary sits where
the reply starts (tests/test_pre_tokenize.py builds such a tokenizer). We therefore tokenize
the text segment by segment (`longalign.templates.conversation_segments`) with
`add_special_tokens=False` and concatenate the ids: every reply is exactly the tokens of its
own text. All segments of a batch of conversations go through one batched tokenizer call.

Labels: the tokens of every reply, plus the token that closes it — for intermediate replies the
first token of the following "\\n\\n" + next round prompt (a CLOSE segment), for the last reply
EOS (the tokenizer's `eos_token_id`). Everything else is IGNORE_INDEX.

Special tokens: the tokenizer's own leading tokens (BOS for Llama, `[gMASK]sop` for ChatGLM3)
are found by comparing `tokenizer(probe, add_special_tokens=True)` with `add_special_tokens=False`
and put in front; no id is hard-coded.

Known approximation: SentencePiece tokenizers such as Llama-2's add a dummy "▁" at the start of
every encoded string, so each segment gets one and the ids can differ from encoding the whole
string at once (a reply is then learnt as "▁" + reply, i.e. " reply" — decoding strips it).
"""
from __future__ import annotations

import json
import multiprocessing
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np

from longalign.constants import IGNORE_INDEX, LEFT_TRUNCATION_KEEP_HEAD, TRUNCATION_MODES
from longalign.templates import CLOSE, PROMPT, REPLY, conversation_segments

_PROBE_TEXT = "a"  # any short text: only the special tokens wrapped around it matter
_PROBE_ROUNDS = [("Hello,  world!\n\tTabs  and 空格 ünïcödé 123", " Leading space.\n\n"),
                 ("", "\u200bzero width<s>[INST]")]  # exercises whitespace, non-ASCII, markup

# Per-example outcome.
KEPT = "kept"
TRUNCATED = "truncated"
SKIPPED_TOO_LONG = "skipped_too_long"
SKIPPED_NO_TARGET = "skipped_no_target"


@dataclass
class TokenizedExample:
    status: str
    input_ids: np.ndarray | None  # int32; None when skipped
    labels: np.ndarray | None  # int32; None when skipped
    length_before_truncation: int
    num_targets: int


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
    `trust_remote_code` (--trust_remote_code): ChatGLM3's does, byte-level BPE folders do not."""
    from transformers import AutoTokenizer

    remote = None if trust_remote_code else _remote_code_classes(path_or_id)
    if remote is not None:
        raise ValueError(f"tokenizer {path_or_id!r} ships its own Python code ({remote[0]} has auto_map "
                         f"{remote[1]}), which runs only with --trust_remote_code (ChatGLM3's tokenizer "
                         "is such a tokenizer): read that code, then pass --trust_remote_code")
    try:
        return AutoTokenizer.from_pretrained(path_or_id, trust_remote_code=trust_remote_code)
    except OSError as err:  # re-raised with the hint a user needs (offline, typo in the path)
        raise OSError(f"cannot load tokenizer {path_or_id!r}: {err}. Pass --tokenizer with a local "
                      "tokenizer directory (offline, `python -m longalign.demo_data` makes one)") from err
    except ValueError as err:
        if "trust_remote_code" not in str(err):
            raise
        raise ValueError(f"tokenizer {path_or_id!r} needs its own Python code, which runs only with "
                         f"--trust_remote_code (ChatGLM3's tokenizer is such a tokenizer): {err}") from err


def special_token_frame(tokenizer) -> tuple[list[int], list[int]]:
    """(prefix, suffix) ids that `add_special_tokens=True` wraps around a text."""
    with_special = list(tokenizer(_PROBE_TEXT, add_special_tokens=True)["input_ids"])
    bare = list(tokenizer(_PROBE_TEXT, add_special_tokens=False)["input_ids"])
    for start in range(len(with_special) - len(bare) + 1):
        if with_special[start:start + len(bare)] == bare:
            return with_special[:start], with_special[start + len(bare):]
    raise ValueError(f"cannot locate the text tokens {bare} inside {with_special}: "
                     "unsupported tokenizer post-processing")


class ConversationTokenizer:
    """Tokenizes rounds of one model family into (input_ids, labels) int32 arrays."""

    def __init__(self, tokenizer, family: str):
        self.tokenizer = tokenizer
        self.family = family
        if tokenizer.eos_token_id is None:
            raise ValueError("the tokenizer has no eos_token_id; pre_tokenize appends EOS to every example")
        self.eos_id = int(tokenizer.eos_token_id)
        self.prefix, suffix = special_token_frame(tokenizer)
        if suffix not in ([], [self.eos_id]):  # we append EOS ourselves; anything else is unknown
            raise ValueError(f"the tokenizer appends special tokens {suffix}; only none or EOS is supported")
        self.uses_backend_fast_path = self._backend_fast_path_agrees()

    def _backend_fast_path_agrees(self) -> bool:
        """Whether the Rust backend's offset-free batch encode gives the wrapper's exact ids.

        `encode_batch_fast` skips offsets and is ~2x faster than `tokenizer(texts)`; it is used
        only for fast tokenizers, and only when it agrees with the wrapper on probe texts that
        contain every template piece, so wrapper-side pre-processing can never be bypassed.
        """
        backend = getattr(self.tokenizer, "backend_tokenizer", None)
        if backend is None or not hasattr(backend, "encode_batch_fast"):
            return False
        probes = [segment.text for segment in conversation_segments(self.family, _PROBE_ROUNDS)]
        via_wrapper = self.tokenizer(probes, add_special_tokens=False)["input_ids"]
        via_backend = [e.ids for e in backend.encode_batch_fast(probes, add_special_tokens=False)]
        return [list(ids) for ids in via_wrapper] == via_backend

    def encode_texts(self, texts: list[str]) -> list[list[int]]:
        """Token ids of each text, without special tokens."""
        if not texts:
            return []
        if self.uses_backend_fast_path:
            return [e.ids for e in self.tokenizer.backend_tokenizer.encode_batch_fast(texts, add_special_tokens=False)]
        return self.tokenizer(texts, add_special_tokens=False)["input_ids"]

    def encode_batch(self, conversations: Sequence[Sequence[tuple[str, str]]]) -> list[tuple[list[int], list[int]]]:
        """Untruncated (ids, labels) python lists for each conversation."""
        per_conversation = [conversation_segments(self.family, rounds) for rounds in conversations]
        texts = [segment.text for segments in per_conversation for segment in segments]
        encoded = self.encode_texts(texts)
        results, cursor = [], 0
        for segments in per_conversation:
            ids, labels = list(self.prefix), [IGNORE_INDEX] * len(self.prefix)
            for segment in segments:
                self._append_segment(ids, labels, encoded[cursor], segment.kind)
                cursor += 1
            if segments:  # EOS closes the last reply; a conversation without rounds has no target
                ids.append(self.eos_id)
                labels.append(self.eos_id)
            results.append((ids, labels))
        return results

    @staticmethod
    def _append_segment(ids: list[int], labels: list[int], tokens: list[int], kind: str) -> None:
        ids.extend(tokens)
        if kind == REPLY:
            labels.extend(tokens)
        elif kind == CLOSE and tokens:
            labels.append(tokens[0])
            labels.extend([IGNORE_INDEX] * (len(tokens) - 1))
        elif kind in (PROMPT, CLOSE):
            labels.extend([IGNORE_INDEX] * len(tokens))
        else:
            raise ValueError(f"unknown segment kind {kind!r}")


def truncate(ids: list[int], labels: list[int], max_length: int, mode: str) -> tuple[list[int], list[int], str]:
    """Apply --truncate to one example; returns (ids, labels, status)."""
    if mode not in TRUNCATION_MODES:
        raise ValueError(f"unknown truncation mode {mode!r}; expected one of {TRUNCATION_MODES}")
    if len(ids) <= max_length:
        return ids, labels, KEPT
    if mode == "skip":
        return ids, labels, SKIPPED_TOO_LONG
    if mode == "right":
        return ids[:max_length], labels[:max_length], TRUNCATED
    head = LEFT_TRUNCATION_KEEP_HEAD  # the tokenizer's leading special tokens carry meaning
    if max_length <= head:
        raise ValueError(f"--truncate left needs max_length > {head}, got {max_length}")
    tail = max_length - head
    return ids[:head] + ids[-tail:], labels[:head] + labels[-tail:], TRUNCATED


def finish_example(ids: list[int], labels: list[int], max_length: int, mode: str) -> TokenizedExample:
    """Truncate, drop examples without a target, and convert to int32 arrays."""
    original = len(ids)
    ids, labels, status = truncate(ids, labels, max_length, mode)
    if status == SKIPPED_TOO_LONG:
        return TokenizedExample(status, None, None, original, 0)
    label_array = np.asarray(labels, dtype=np.int32)
    num_targets = int(np.count_nonzero(label_array != IGNORE_INDEX))
    if num_targets == 0:
        return TokenizedExample(SKIPPED_NO_TARGET, None, None, original, 0)
    return TokenizedExample(status, np.asarray(ids, dtype=np.int32), label_array, original, num_targets)


# ---- process pool -------------------------------------------------------------------------
_WORKER: dict = {}


def _init_worker(tokenizer_path: str, family: str, max_length: int, mode: str,
                 trust_remote_code: bool = False) -> None:
    _WORKER.update(encoder=ConversationTokenizer(load_tokenizer(tokenizer_path, trust_remote_code), family),
                   max_length=max_length, mode=mode)


def _init_pool_worker(*init_args) -> None:
    # Each worker tokenizes its own batch; Rust-side threads on top would oversubscribe cores.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _init_worker(*init_args)


def _work(batch: Sequence[Sequence[tuple[str, str]]]) -> list[TokenizedExample]:
    encoder, max_length, mode = _WORKER["encoder"], _WORKER["max_length"], _WORKER["mode"]
    return [finish_example(ids, labels, max_length, mode) for ids, labels in encoder.encode_batch(batch)]


def _batches(items: Sequence, batch_size: int) -> Iterator[Sequence]:
    for start in range(0, len(items), batch_size):
        yield items[start:start + batch_size]


def tokenize_all(conversations: Sequence[Sequence[tuple[str, str]]], tokenizer_path: str, family: str,
                 max_length: int, mode: str, num_proc: int = 1, batch_size: int = 64,
                 trust_remote_code: bool = False) -> Iterable[list[TokenizedExample]]:
    """Yield, batch by batch and in input order, the TokenizedExample of every conversation."""
    if num_proc < 1:
        raise ValueError(f"num_proc must be >= 1, got {num_proc}")
    init_args = (tokenizer_path, family, max_length, mode, trust_remote_code)
    if num_proc == 1:
        _init_worker(*init_args)
        yield from map(_work, _batches(conversations, batch_size))
        return
    # fork (where available) starts workers without re-importing transformers in each.
    methods = multiprocessing.get_all_start_methods()
    context = multiprocessing.get_context("fork" if "fork" in methods else None)
    with context.Pool(num_proc, initializer=_init_pool_worker, initargs=init_args) as pool:
        yield from pool.imap(_work, _batches(conversations, batch_size))
