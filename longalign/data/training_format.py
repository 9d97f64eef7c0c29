"""Chat templates of the released LongAlign models (DESIGN.md §7).

One conversation is a list of complete rounds `(user, assistant)`. Its training text is

    round_1 + "\\n\\n" + round_2 + "\\n\\n" + ... + round_n   (then EOS, added as a token id)

with, per round i (1-based),

    chatglm: "[Round {i}]\\n\\n问：{user}\\n\\n答：{assistant}"
    llama:   "[INST]{user}[/INST]{assistant}"

An optional system prompt (a `system` turn opening the conversation; never a target) is written
the way each family's chat format writes one:

    chatglm: "<|system|>" "\\n{system}" before round 1 -- ChatGLM3's system role: its `<|system|>`
             role token (a control token, see CONTROL), then "\\n" + the text, as ChatGLM3's
             `build_chat_input` builds a system turn;
    llama:   "[INST]<<SYS>>\\n{system}\\n<</SYS>>\\n\\n{user}[/INST]" -- Llama-2's system block
             inside the first [INST], with this format's spacing (no space around [INST]/[/INST],
             as every other round is written).

Without a system prompt the text is exactly what it was before system turns were supported.

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

from longalign.constants import check_family

ROUND_SEPARATOR = "\n\n"
LLAMA_SYSTEM_OPEN, LLAMA_SYSTEM_CLOSE = "<<SYS>>\n", "\n<</SYS>>\n\n"  # Llama-2's B_SYS, E_SYS
CHATGLM_SYSTEM_TOKEN = "<|system|>"  # ChatGLM3's system role token
CHATGLM_SYSTEM_HEADER = "\n"  # ChatGLM3 writes "<|system|>" + "\n" + the system text

# What the loss does with the tokens of a segment.
PROMPT = "prompt"  # no token is a target
REPLY = "reply"  # every token is a target (the assistant's answer)
CLOSE = "close"  # text after a reply; its first position carries the EOS target closing that reply
CONTROL = "control"  # a control token named by its text (ChatGLM3's "<|system|>"): one id, never text,
# never a target; only at the start of a conversation


@dataclass(frozen=True)
class Segment:
    """A piece of the conversation text; segments are tokenized one by one (see tokenization.py)."""

    text: str
    kind: str


def reply_text(assistant: str) -> str:
    """The assistant reply as it appears in the text: stripped of edge whitespace."""
    return assistant.strip()


def round_prompt(family: str, round_index: int, user: str, system: str | None = None) -> str:
    """The text of round `round_index` (1-based) up to where the assistant's answer starts;
    `system` (round 1 only): the llama system block inside the first [INST] (chatglm writes its
    system turn before round 1 instead: `system_segments`)."""
    check_family(family)
    if round_index < 1:
        raise ValueError(f"round_index is 1-based, got {round_index}")
    if system is not None and round_index != 1:
        raise ValueError(f"a system prompt belongs to round 1, not round {round_index}")
    if family == "chatglm":
        return f"[Round {round_index}]\n\n问：{user}\n\n答："
    if system is not None:
        user = LLAMA_SYSTEM_OPEN + system + LLAMA_SYSTEM_CLOSE + user
    return f"[INST]{user}[/INST]"


def system_segments(family: str, system: str | None) -> list[Segment]:
    """What comes before round 1's prompt for a system prompt: chatglm's role token and its header
    (the system text itself joins round 1's PROMPT segment, see conversation_segments)."""
    check_family(family)
    if system is None or family != "chatglm":
        return []
    return [Segment(CHATGLM_SYSTEM_TOKEN, CONTROL)]


def _first_prompt(family: str, user: str, system: str | None) -> str:
    if system is not None and family == "chatglm":
        return CHATGLM_SYSTEM_HEADER + system + round_prompt(family, 1, user)
    return round_prompt(family, 1, user, system)


def build_prompt(family: str, history: Sequence[tuple[str, str]], query: str, system: str | None = None) -> str:
    """The text the model sees before its answer to `query`, after the rounds in `history`
    (a CONTROL segment is written as its token's text, as a chat template writes it)."""
    if not history:
        return "".join(segment.text for segment in system_segments(family, system)) + \
            _first_prompt(family, query, system)
    done = "".join(segment.text for segment in conversation_segments(family, history, system))
    return done + ROUND_SEPARATOR + round_prompt(family, len(history) + 1, query)


def conversation_segments(family: str, rounds: Sequence[tuple[str, str]],
                          system: str | None = None) -> list[Segment]:
    """Cut the training text of `rounds` into PROMPT / REPLY / CLOSE segments.

    After an intermediate reply, the separator and the next round's prompt form one CLOSE
    segment: its input ids stay that real text, and the position of its first token carries
    the EOS target that teaches the model to stop after the reply. The last reply is followed
    by EOS itself, which the tokenizer side appends as a token id (it has no text).

        [("q1", " a1 "), ("q2", "a2")], llama ->
        PROMPT "[INST]q1[/INST]" | REPLY "a1" | CLOSE "\\n\\n[INST]q2[/INST]" | REPLY "a2"
        [("q1", "a1")], chatglm, system "s" ->
        CONTROL "<|system|>" | PROMPT "\\ns[Round 1]\\n\\n问：q1\\n\\n答：" | REPLY "a1"

    A conversation without rounds has no segments (its system prompt alone has nothing to learn).
    """
    check_family(family)
    segments: list[Segment] = list(system_segments(family, system)) if rounds else []
    for index, (user, assistant) in enumerate(rounds, start=1):
        if index == 1:
            segments.append(Segment(_first_prompt(family, user, system), PROMPT))
        else:
            segments.append(Segment(ROUND_SEPARATOR + round_prompt(family, index, user), CLOSE))
        segments.append(Segment(reply_text(assistant), REPLY))
    return segments


def conversation_text(family: str, rounds: Sequence[tuple[str, str]], system: str | None = None) -> str:
    """The whole training text of `rounds` (without EOS, which is a token id)."""
    return "".join(segment.text for segment in conversation_segments(family, rounds, system))
