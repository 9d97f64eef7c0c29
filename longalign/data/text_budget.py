"""How much of an over-long conversation is tokenized: memory per row bounded by --max_length.

Tokenizing a text costs memory in proportion to its length (one 20 MB reply: about 3 GB), while
pre_tokenize keeps at most --max_length tokens of a row. Before tokenizing, a conversation whose
text is longer than a budget is cut to the text its kept tokens can come from:

- `--truncate right` / `skip` keep the head (ids[:max_length]): the first `head_chars` characters
  of the conversation text are tokenized, the rest is not;
- `--truncate left` keeps ids[:LEFT_TRUNCATION_KEEP_HEAD] + the tail: the first `head_chars` and
  the last `tail_chars` characters are tokenized, the middle is not.

Budgets are `CHARS_PER_TOKEN_BOUND` characters for each token needed, `CUT_SAFETY_TOKENS` included:
natural text runs 1-5 characters per token (Chinese about 1.5, English about 4), so the cut text
normally holds about twice the tokens needed.

Why the kept ids do not change. The segments of a conversation are tokenized one by one
(`longalign.data.tokenization`), and a cut segment becomes a shorter segment (a head piece, and for
`left` a tail piece encoded as a continuation), so a cut changes only the ids of the piece it
cuts, and there only near the cut: tokenizers split text into words (byte-level BPE) or merge
neighbouring symbols (SentencePiece), so a token depends on the characters around it, not on
text thousands of characters away. `CUT_SAFETY_TOKENS` tokens around every cut are never kept:
after encoding, the cut is accepted only if the head holds at least (tokens kept from the head)
+ CUT_SAFETY_TOKENS tokens, and for `left` the tail at least (tokens kept from the tail) +
CUT_SAFETY_TOKENS. Otherwise (text with far more characters per token: long runs a tokenizer
merges or drops) the budget doubles and the row is encoded again, until the check holds or the
whole text fits: the result is never shorter of text than the kept ids need. The labels of kept
tokens do not change either: a reply piece starts (head) or ends (tail) where the stripped reply
does, so it is never empty, and a tail piece of the text after a reply is a plain prompt piece,
whose first position (the only one a CLOSE segment labels) lies inside the safety margin.
tests/data/test_input_formats.py compares cut and uncut ids for both families and all modes.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Sequence

from longalign.constants import LEFT_TRUNCATION_KEEP_HEAD, TRUNCATION_MODES
from longalign.data.training_format import CLOSE, CONTROL, PROMPT, Segment

CHARS_PER_TOKEN_BOUND = 8  # characters budgeted per needed token (natural text: 1-5)
CUT_SAFETY_TOKENS = 64  # tokens next to a cut that are never kept (a cut changes at most a few)


@dataclass(frozen=True)
class TextBudget:
    head_chars: int
    tail_chars: int  # 0: no tail is kept (right, skip)
    head_tokens: int  # tokens the head must hold for the cut to be accepted (safety included)
    tail_tokens: int

    def holds(self, head_tokens: int, tail_tokens: int) -> bool:
        return head_tokens >= self.head_tokens and tail_tokens >= self.tail_tokens


def text_budget(max_length: int, mode: str, scale: int = 1) -> TextBudget:
    """The budget for --max_length/--truncate; `scale` multiplies the characters (retries).

    max_length 1000, "right" -> head 8 * (1000 + 64) chars, must hold >= 1064 tokens; no tail.
    """
    if mode not in TRUNCATION_MODES:
        raise ValueError(f"unknown truncation mode {mode!r}; expected one of {TRUNCATION_MODES}")
    if mode == "left":
        head = LEFT_TRUNCATION_KEEP_HEAD + CUT_SAFETY_TOKENS
        tail = max_length - LEFT_TRUNCATION_KEEP_HEAD + CUT_SAFETY_TOKENS
    else:
        head, tail = max_length + CUT_SAFETY_TOKENS, 0
    return TextBudget(CHARS_PER_TOKEN_BOUND * head * scale, CHARS_PER_TOKEN_BOUND * tail * scale
                      if tail else 0, head, tail)


@dataclass(frozen=True)
class CutConversation:
    segments: list[Segment]  # the head segments, then the tail segments
    head_count: int  # how many of `segments` form the head
    cut_chars: int  # characters not tokenized


def _head(segments: Sequence[Segment], chars: int) -> list[Segment]:
    out, used = [], 0
    for segment in segments:
        if used >= chars:
            break
        room = chars - used
        if len(segment.text) <= room or segment.kind == CONTROL:  # a control token is never cut
            out.append(segment)
        else:
            out.append(replace(segment, text=segment.text[:room]))
        used += len(out[-1].text)
    return out


def _tail(segments: Sequence[Segment], chars: int) -> list[Segment]:
    out, used = [], 0
    for segment in reversed(segments):
        if used >= chars or segment.kind == CONTROL:
            break
        room = chars - used
        if len(segment.text) <= room:
            out.append(segment)
        else:  # the text after a reply, cut, no longer follows the reply: a plain prompt piece
            out.append(Segment(segment.text[-room:], PROMPT if segment.kind == CLOSE else segment.kind))
        used += len(out[-1].text)
    return out[::-1]


def cut_segments(segments: Sequence[Segment], budget: TextBudget) -> CutConversation | None:
    """The head (and tail) of `segments` within `budget`, or None when the whole text fits."""
    total = sum(len(segment.text) for segment in segments)
    if total <= budget.head_chars + budget.tail_chars:
        return None
    head = _head(segments, budget.head_chars)
    tail = _tail(segments, budget.tail_chars) if budget.tail_chars else []
    kept = sum(len(segment.text) for segment in head + tail)
    return CutConversation(head + tail, len(head), total - kept)
