"""Conversations -> (input_ids, labels) with exact label spans, truncation and a process pool.

Ids. The training ids are the tokenizer's leading special tokens (BOS for Llama, `[gMASK]sop`
for ChatGLM3; found by comparing `tokenizer(probe, add_special_tokens=True)` with `False`, no id
is hard-coded), then the tokens of the training text (`longalign.data.training_format`: rounds joined by
"\\n\\n", replies stripped), then EOS — i.e. `tokenizer(training text) + [EOS]`, what the
model sees at inference, where the whole prompt is one string. Text inside content is text:
"</s>", "[gMASK]", "<|user|>"... are never control tokens (`longalign.data.text_encoder`).

Label exactness. BPE merges can cross the boundary between a prompt and a reply when the whole
text is tokenized at once (SentencePiece does not pre-split on punctuation, so "[/INST]" +
".lock" can become "...]." + "lock"), and then no token boundary sits where the reply starts.
We therefore tokenize the text segment by segment (`longalign.data.training_format.conversation_segments`)
— the first as it starts a string, the others as continuations (no SentencePiece dummy "▁",
see `TextEncoder.encode`) — and concatenate the ids: every reply is exactly the tokens of its
own text, and a prompt ends on a token boundary, as it does at inference. The whole text is
also encoded; where the two differ (a merge crossed a segment boundary) the segment ids are
kept and the row is counted (`ids_differ_from_whole_text` in stats.json).

Labels (the original's rule, fixed where it mislabelled): the tokens of every reply are
targets, and the position right after each reply carries the target EOS (the tokenizer's
`eos_token_id`) while its input id stays the real text that follows ("\\n\\n[INST]..."), so
the model learns to stop after every answer of a multi-round chat. An empty reply (nothing left
after stripping whitespace and zero-width characters) is masked, EOS target included, and
counted (`empty_replies_masked`); a row left with no target is skipped and counted. Everything
else is IGNORE_INDEX. All texts of a batch of conversations go through one batched encode.

System prompts (`longalign.data.training_format`) are prompt text, never targets; ChatGLM3's `<|system|>`
role token is a CONTROL segment, written as its id (a tokenizer without that token is refused).
Over-long rows are cut to a text budget before tokenizing (`longalign.data.text_budget`), so memory
per row is bounded by --max_length while the kept ids stay those of the whole text.
"""
from __future__ import annotations

import multiprocessing
import os
from dataclasses import dataclass
from typing import Iterable, Iterator, Sequence

import numpy as np

from longalign.constants import IGNORE_INDEX, LEFT_TRUNCATION_KEEP_HEAD, TRUNCATION_MODES, ZERO_WIDTH_TABLE
from longalign.remote_code import load_tokenizer
from longalign.data.training_format import CLOSE, CONTROL, PROMPT, REPLY, Segment, conversation_segments, reply_text
from longalign.data.text_budget import cut_segments, text_budget
from longalign.data.text_encoder import TextEncoder

_PROBE_TEXT = "a"  # any short text: only the special tokens wrapped around it matter

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
    empty_replies: int = 0
    differs_from_whole_text: bool = False
    cut_chars: int = 0  # characters not tokenized (longalign.data.text_budget)


def special_token_frame(tokenizer) -> tuple[list[int], list[int]]:
    """(prefix, suffix) ids that `add_special_tokens=True` wraps around a text."""
    with_special = list(tokenizer(_PROBE_TEXT, add_special_tokens=True)["input_ids"])
    bare = list(tokenizer(_PROBE_TEXT, add_special_tokens=False)["input_ids"])
    for start in range(len(with_special) - len(bare) + 1):
        if with_special[start:start + len(bare)] == bare:
            return with_special[:start], with_special[start + len(bare):]
    raise ValueError(f"cannot locate the text tokens {bare} inside {with_special}: "
                     "unsupported tokenizer post-processing")


def is_empty_reply(text: str) -> bool:
    """Whether a reply has nothing to learn: empty, whitespace or zero-width characters only."""
    return not reply_text(text.translate(ZERO_WIDTH_TABLE))


@dataclass
class EncodedConversation:
    """Untruncated ids and labels of one conversation, and what labelling found in it."""

    ids: list[int]
    labels: list[int]
    empty_replies: int = 0  # replies masked because they are empty (see is_empty_reply)
    differs_from_whole_text: bool = False  # segment ids != ids of the whole text (module docstring)
    segment_lengths: tuple = ()  # ids per segment (a CONTROL segment: 1), prefix and EOS excluded
    cut_chars: int = 0  # characters left out before tokenizing (longalign.data.text_budget)


def control_token_id(tokenizer, token: str) -> int:
    """The id of control token `token` (e.g. ChatGLM3's "<|system|>"); ValueError if it has none."""
    token_id = tokenizer.convert_tokens_to_ids(token)
    if token_id is None or token_id == tokenizer.unk_token_id or tokenizer.convert_ids_to_tokens(token_id) != token:
        raise ValueError(f"the tokenizer has no {token!r} token, which this chat format writes a system turn "
                         "with (ChatGLM3's tokenizer has it); use a tokenizer that has it, or data without "
                         "system turns")
    return int(token_id)


class ConversationTokenizer:
    """Tokenizes rounds of one model family into (input_ids, labels) (module docstring)."""

    def __init__(self, tokenizer, family: str):
        self.tokenizer = tokenizer
        self.family = family
        if tokenizer.eos_token_id is None:
            raise ValueError("the tokenizer has no eos_token_id; pre_tokenize appends EOS to every example")
        self.eos_id = int(tokenizer.eos_token_id)
        self.prefix, suffix = special_token_frame(tokenizer)
        if suffix not in ([], [self.eos_id]):  # we append EOS ourselves; anything else is unknown
            raise ValueError(f"the tokenizer appends special tokens {suffix}; only none or EOS is supported")
        self.encoder = TextEncoder(tokenizer)

    def encode_batch(self, conversations: Sequence[Sequence[tuple[str, str]]],
                     systems: Sequence[str | None] | None = None) -> list[EncodedConversation]:
        """Untruncated ids and labels of each conversation (one batched encode for all texts);
        `systems`: each conversation's system prompt or None (default: none)."""
        systems = systems if systems is not None else [None] * len(conversations)
        return self.encode_segments([conversation_segments(self.family, rounds, system)
                                     for rounds, system in zip(conversations, systems, strict=True)])

    def _split_control(self, segments: Sequence[Segment]) -> tuple[list[int], list[Segment]]:
        """(ids of the leading CONTROL segments, the text segments after them)."""
        count = next((i for i, segment in enumerate(segments) if segment.kind != CONTROL), len(segments))
        if any(segment.kind == CONTROL for segment in segments[count:]):
            raise ValueError("a control token segment may only open a conversation")
        return [control_token_id(self.tokenizer, segment.text) for segment in segments[:count]], list(segments[count:])

    def encode_segments(self, per_conversation: Sequence[Sequence[Segment]],
                        compare_whole: bool = True) -> list[EncodedConversation]:
        """Ids and labels of each segment list; `compare_whole`: also encode each whole text and
        flag rows whose segment ids differ from it (module docstring)."""
        split = [self._split_control(segments) for segments in per_conversation]
        firsts = [texts[0].text for _, texts in split if texts]
        wholes = ["".join(segment.text for segment in texts) for _, texts in split if texts] if compare_whole else []
        rests = [segment.text for _, texts in split for segment in texts[1:]]
        plain = iter(self.encoder.encode(firsts + wholes))
        first_ids = [next(plain) for _ in firsts]
        whole_ids = list(plain)
        rest_ids = iter(self.encoder.encode(rests, continuation=True))
        results, with_text = [], iter(range(len(firsts)))
        for control_ids, texts in split:
            if not texts:  # a conversation without rounds has no target
                results.append(EncodedConversation(list(self.prefix), [IGNORE_INDEX] * len(self.prefix)))
                continue
            index = next(with_text)
            pieces = [first_ids[index]] + [next(rest_ids) for _ in texts[1:]]
            result = self._label(control_ids, texts, pieces)
            if compare_whole:
                result.differs_from_whole_text = result.ids[len(self.prefix) + len(control_ids):-1] != whole_ids[index]
            results.append(result)
        return results

    def _label(self, control_ids: list[int], segments, pieces: list[list[int]]) -> EncodedConversation:
        """Concatenate the segments' ids; targets: reply tokens, and EOS after each reply.

        [PROMPT "[INST]q[/INST]", REPLY "ab", CLOSE "\\n\\n[INST]r[/INST]", REPLY ""] ->
            ids    = prefix  q-tokens  a     b     \\n-token ... r-tokens  EOS
            labels = X       X ...     a     b     EOS        X ...         X   (empty reply: masked)
        """
        ids = list(self.prefix) + control_ids
        labels = [IGNORE_INDEX] * len(ids)
        closing, empty = IGNORE_INDEX, 0  # the target of the position right after the last reply
        for segment, tokens in zip(segments, pieces):
            if segment.kind not in (PROMPT, REPLY, CLOSE):
                raise ValueError(f"unknown segment kind {segment.kind!r}")
            ids.extend(tokens)
            if segment.kind == REPLY:
                masked = is_empty_reply(segment.text)
                empty += masked
                labels.extend([IGNORE_INDEX] * len(tokens) if masked else tokens)
                closing = IGNORE_INDEX if masked else self.eos_id
                continue
            if segment.kind == CLOSE and not tokens:
                raise ValueError(f"the text after a reply encoded to no tokens: {segment.text!r}")
            labels.extend([IGNORE_INDEX] * len(tokens))
            if segment.kind == CLOSE:
                labels[len(labels) - len(tokens)] = closing
            closing = IGNORE_INDEX
        ids.append(self.eos_id)  # EOS closes the last reply
        labels.append(closing)
        lengths = (1,) * len(control_ids) + tuple(len(tokens) for tokens in pieces)
        return EncodedConversation(ids, labels, empty, segment_lengths=lengths)


def _encode_cut(encoder: ConversationTokenizer, segments: list[Segment], max_length: int,
                mode: str) -> EncodedConversation:
    """Encode an over-long conversation cut to the text budget, doubled until the kept ids lie
    inside the cut text with the safety margin (longalign.data.text_budget); the whole text if it fits."""
    scale = 1
    while True:
        budget = text_budget(max_length, mode, scale)
        cut = cut_segments(segments, budget)
        if cut is None:
            return encoder.encode_segments([segments])[0]
        [encoded] = encoder.encode_segments([cut.segments], compare_whole=False)
        head = len(encoder.prefix) + sum(encoded.segment_lengths[:cut.head_count])
        tail = sum(encoded.segment_lengths[cut.head_count:]) + 1  # + EOS
        if budget.holds(head, tail):
            encoded.cut_chars = cut.cut_chars
            return encoded
        scale *= 2


def encode_within_budget(encoder: ConversationTokenizer, conversations: Sequence[Sequence[tuple[str, str]]],
                         systems: Sequence[str | None], max_length: int, mode: str) -> list[EncodedConversation]:
    """`encoder.encode_batch`, with over-long conversations cut first (longalign.data.text_budget)."""
    per_conversation = [conversation_segments(encoder.family, rounds, system)
                        for rounds, system in zip(conversations, systems, strict=True)]
    budget = text_budget(max_length, mode)
    over = {i for i, segments in enumerate(per_conversation) if cut_segments(segments, budget) is not None}
    within = [i for i in range(len(per_conversation)) if i not in over]
    results = dict(zip(within, encoder.encode_segments([per_conversation[i] for i in within])))
    results.update({i: _encode_cut(encoder, per_conversation[i], max_length, mode) for i in sorted(over)})
    return [results[i] for i in range(len(per_conversation))]


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


def finish_example(encoded: EncodedConversation, max_length: int, mode: str) -> TokenizedExample:
    """Truncate, drop examples without a target, and convert to int32 arrays."""
    original = len(encoded.ids)
    found = dict(empty_replies=encoded.empty_replies, differs_from_whole_text=encoded.differs_from_whole_text,
                 cut_chars=encoded.cut_chars)
    ids, labels, status = truncate(encoded.ids, encoded.labels, max_length, mode)
    if status == SKIPPED_TOO_LONG:
        return TokenizedExample(status, None, None, original, 0, **found)
    label_array = np.asarray(labels, dtype=np.int32)
    num_targets = int(np.count_nonzero(label_array != IGNORE_INDEX))
    if num_targets == 0:
        return TokenizedExample(SKIPPED_NO_TARGET, None, None, original, 0, **found)
    return TokenizedExample(status, np.asarray(ids, dtype=np.int32), label_array, original, num_targets, **found)


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


def _work(batch: Sequence[tuple[str | None, Sequence[tuple[str, str]]]]) -> list[TokenizedExample]:
    """Tokenize a batch of (system prompt or None, rounds)."""
    encoder, max_length, mode = _WORKER["encoder"], _WORKER["max_length"], _WORKER["mode"]
    systems, conversations = [system for system, _ in batch], [rounds for _, rounds in batch]
    encoded = encode_within_budget(encoder, conversations, systems, max_length, mode)
    return [finish_example(e, max_length, mode) for e in encoded]


def _batches(items: Sequence, batch_size: int) -> Iterator[Sequence]:
    for start in range(0, len(items), batch_size):
        yield items[start:start + batch_size]


def tokenize_all(conversations: Sequence[Sequence[tuple[str, str]]], tokenizer_path: str, family: str,
                 max_length: int, mode: str, num_proc: int = 1, batch_size: int = 64,
                 trust_remote_code: bool = False,
                 systems: Sequence[str | None] | None = None) -> Iterable[list[TokenizedExample]]:
    """Yield, batch by batch and in input order, the TokenizedExample of every conversation
    (`systems`: each one's system prompt or None; default none)."""
    if num_proc < 1:
        raise ValueError(f"num_proc must be >= 1, got {num_proc}")
    systems = systems if systems is not None else [None] * len(conversations)
    conversations = list(zip(systems, conversations, strict=True))
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
