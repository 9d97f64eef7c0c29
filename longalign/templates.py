"""Chat templates of the released LongAlign models (DESIGN.md §7).

One conversation is a list of complete rounds `(user, assistant)`. Its training text is

    round_1 + "\\n\\n" + round_2 + "\\n\\n" + ... + round_n   (then EOS, added as a token id)

with, per round i (1-based),

    chatglm: "[Round {i}]\\n\\n问：{user}\\n\\n答：{assistant}"
    llama:   "[INST]{user}[/INST]{assistant}"

Decisions (README "Differences from the original code"):
- Round separator: "\\n\\n" for both families, the released models' chat format (ChatGLM's
  `build_prompt`, LongAlign's Llama prompt). The original training code lost it: under
  transformers 4.33 its reply markers were special tokens, and the slow tokenizer stripped the
  whitespace next to them, so rounds were glued ("...bbbb[INST]cccc").
- Reply edges: each assistant reply is stripped of leading and trailing whitespace
  (`reply_text`), in training text and in inference prompts alike. That is what the released
  models learnt (the same 4.33 stripping) and what their chat() puts back into the history
  (ChatGLM's `response.strip()`); a reply that is only whitespace becomes empty (and its round
  carries no target, see tokenization.py). User text is kept exactly as written.

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
CLOSE = "close"  # text after a reply; its first position carries the EOS target closing that reply
SEGMENT_KINDS = (PROMPT, REPLY, CLOSE)


@dataclass(frozen=True)
class Segment:
    """A piece of the conversation text; segments are tokenized one by one (see tokenization.py)."""

    text: str
    kind: str


def check_family(family: str) -> None:
    if family not in MODEL_FAMILIES:
        raise ValueError(f"unknown model family {family!r}; expected one of {MODEL_FAMILIES}")


def reply_text(assistant: str) -> str:
    """The assistant reply as it appears in the text: stripped of edge whitespace."""
    return assistant.strip()


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

    After an intermediate reply, the separator and the next round's prompt form one CLOSE
    segment: its input ids stay that real text, and the position of its first token carries
    the EOS target that teaches the model to stop after the reply. The last reply is followed
    by EOS itself, which the tokenizer side appends as a token id (it has no text).

        [("q1", " a1 "), ("q2", "a2")], llama ->
        PROMPT "[INST]q1[/INST]" | REPLY "a1" | CLOSE "\\n\\n[INST]q2[/INST]" | REPLY "a2"
    """
    check_family(family)
    segments: list[Segment] = []
    for index, (user, assistant) in enumerate(rounds, start=1):
        prompt = round_prompt(family, index, user)
        if index == 1:
            segments.append(Segment(prompt, PROMPT))
        else:
            segments.append(Segment(ROUND_SEPARATOR + prompt, CLOSE))
        segments.append(Segment(reply_text(assistant), REPLY))
    return segments


def conversation_text(family: str, rounds: Sequence[tuple[str, str]]) -> str:
    """The whole training text of `rounds` (without EOS, which is a token id)."""
    return "".join(segment.text for segment in conversation_segments(family, rounds))
