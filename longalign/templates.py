"""Chat templates of the released LongAlign models (DESIGN.md §7).

One conversation is a list of complete rounds `(user, assistant)`. Its training text is

    round_1 + "\\n\\n" + round_2 + "\\n\\n" + ... + round_n   (then EOS, added as a token id)

with, per round i (1-based),

    chatglm: "[Round {i}]\\n\\n问：{user}\\n\\n答：{assistant}"
    llama:   "[INST]{user}[/INST]{assistant}"

`build_prompt(family, history, query)` is that text up to where the model starts answering
`query`; `conversation_segments` cuts the same text into pieces flagged by what the loss does
with them, so pre_tokenize can place labels exactly (see `Segment`). Both are built from the
same two helpers, so training text and inference prompts cannot drift apart.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from longalign.constants import MODEL_FAMILIES

ROUND_SEPARATOR = "\n\n"

# What the loss does with the tokens of a segment.
PROMPT = "prompt"  # no token is a target
REPLY = "reply"  # every token is a target (the assistant's answer)
CLOSE = "close"  # only the first token is a target: it closes the reply just before it
SEGMENT_KINDS = (PROMPT, REPLY, CLOSE)


@dataclass(frozen=True)
class Segment:
    """A piece of the conversation text; segments are tokenized one by one (see tokenization.py)."""

    text: str
    kind: str


def check_family(family: str) -> None:
    if family not in MODEL_FAMILIES:
        raise ValueError(f"unknown model family {family!r}; expected one of {MODEL_FAMILIES}")


def round_prompt(family: str, round_index: int, user: str) -> str:
    """The text of round `round_index` (1-based) up to where the assistant's answer starts."""
    check_family(family)
    if round_index < 1:
        raise ValueError(f"round_index is 1-based, got {round_index}")
    if family == "chatglm":
        return f"[Round {round_index}]\n\n问：{user}\n\n答："
    return f"[INST]{user}[/INST]"


def build_prompt(family: str, history: Sequence[tuple[str, str]], query: str) -> str:
    """The text the model sees before its answer to `query`, after the rounds in `history`."""
    done = "".join(segment.text for segment in conversation_segments(family, history))
    separator = ROUND_SEPARATOR if history else ""
    return done + separator + round_prompt(family, len(history) + 1, query)


def conversation_segments(family: str, rounds: Sequence[tuple[str, str]]) -> list[Segment]:
    """Cut the training text of `rounds` into PROMPT / REPLY / CLOSE segments.

    Each intermediate reply is closed by the round separator: the separator and the next
    round's prompt form one CLOSE segment, whose first token (the first token of "\\n\\n") is the
    closing target. Keeping "\\n\\n" in the same piece as the next prompt tokenizes it as it is
    tokenized at inference time, where the whole prompt is one string. The last reply is
    closed by EOS, which the tokenizer side appends as a token id (it has no text).
    """
    check_family(family)
    segments: list[Segment] = []
    for index, (user, assistant) in enumerate(rounds, start=1):
        prompt = round_prompt(family, index, user)
        if index == 1:
            segments.append(Segment(prompt, PROMPT))
        else:
            segments.append(Segment(ROUND_SEPARATOR + prompt, CLOSE))
        segments.append(Segment(assistant, REPLY))
    return segments


def conversation_text(family: str, rounds: Sequence[tuple[str, str]]) -> str:
    """The whole training text of `rounds` (without EOS, which is a token id)."""
    return "".join(segment.text for segment in conversation_segments(family, rounds))
