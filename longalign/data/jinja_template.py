"""Jinja chat templates that render exactly the training prompt of `longalign.data.training_format`.

Every checkpoint train.py saves carries one on its tokenizer, so `tokenizer.apply_chat_template`
(vLLM, lm-eval-harness, LongBench-style scripts) reproduces the text the model was trained on:

    apply_chat_template(history_messages + [{"role": "user", "content": q}],
                        tokenize=False, add_generation_prompt=True)
        == prefix + longalign.data.training_format.build_prompt(family, history, q)

`prefix` is the text of the tokenizer's own leading special tokens (BOS `<s>` for Llama-2,
`[gMASK]sop` for ChatGLM3), which pre_tokenize puts in front of every example as token ids:
`apply_chat_template(tokenize=True)` tokenizes without adding special tokens, so the template
writes them. Per family, with i the round number:

    llama:   [INST]{user}[/INST]{assistant}                  rounds joined by "\\n\\n"
    chatglm: [Round {i}]\\n\\n问：{user}\\n\\n答：{assistant}   rounds joined by "\\n\\n"

ChatGLM's "\\n\\n答：" is the assistant header: written before each assistant message and, at the
end, only with `add_generation_prompt=True`. Llama-2's "[/INST]" closes the user turn (as in
Meta's own template). Assistant messages are stripped of edge whitespace (`| trim`), as
`longalign.data.training_format.reply_text` strips replies in the training text. A system message may open
the conversation and is written as `longalign.data.training_format` writes it (llama: `<<SYS>>\\n...\\n<</SYS>>\\n\\n`
inside the first [INST]; chatglm: `<|system|>` + "\\n" + the text before round 1); after it, roles
must alternate user/assistant starting with user, and a system message anywhere else is an error.
"""
from __future__ import annotations

from longalign.constants import check_family
from longalign.data.training_format import (CHATGLM_SYSTEM_HEADER, CHATGLM_SYSTEM_TOKEN, LLAMA_SYSTEM_CLOSE,
                                 LLAMA_SYSTEM_OPEN)
from longalign.data.tokenization import special_token_frame


def _literal(text: str) -> str:
    """`text` as a Jinja string literal."""
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'").replace("\n", "\\n") + "'"


# An opening system message is taken out of the turns (`system`); the turns then alternate.
_SPLIT_SYSTEM = (
    "{% if messages and messages[0]['role'] == 'system' %}"
    "{% set system = messages[0]['content'] %}{% set turns = messages[1:] %}"
    "{% else %}{% set system = none %}{% set turns = messages %}{% endif %}"
)
_ROLE_CHECK = (
    "{% if message['role'] == 'system' %}"
    "{{ raise_exception('a system message may only open the conversation') }}"
    "{% endif %}"
    "{% if message['role'] not in ['user', 'assistant'] %}"
    "{{ raise_exception('LongAlign chat formats have only system, user and assistant turns, got ' + message['role']) }}"
    "{% endif %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('roles must alternate user/assistant/user/... starting with user') }}"
    "{% endif %}"
)

_BODIES = {
    "llama": (
        "{% if message['role'] == 'user' %}"
        "{% if not loop.first %}{{ '\\n\\n' }}{% endif %}"
        "{{ '[INST]' }}"
        "{% if loop.first and system is not none %}"
        "{{ " + _literal(LLAMA_SYSTEM_OPEN) + " + system + " + _literal(LLAMA_SYSTEM_CLOSE) + " }}"
        "{% endif %}"
        "{{ message['content'] + '[/INST]' }}"
        "{% else %}{{ message['content'] | trim }}{% endif %}"
    ),
    "chatglm": (
        "{% if message['role'] == 'user' %}"
        "{% if not loop.first %}{{ '\\n\\n' }}{% endif %}"
        "{% if loop.first and system is not none %}"
        "{{ " + _literal(CHATGLM_SYSTEM_TOKEN + CHATGLM_SYSTEM_HEADER) + " + system }}"
        "{% endif %}"
        "{{ '[Round ' + (loop.index0 // 2 + 1) | string + ']\\n\\n问：' + message['content'] }}"
        "{% else %}{{ '\\n\\n答：' + message['content'] | trim }}{% endif %}"
    ),
}
_GENERATION_PROMPT = {
    "llama": "",
    "chatglm": "{% if add_generation_prompt and messages[-1]['role'] == 'user' %}{{ '\\n\\n答：' }}{% endif %}",
}


def jinja_chat_template(family: str, prefix: str) -> str:
    """The template of `family`; `prefix` is written literally before the first round."""
    check_family(family)
    return ("{{ " + _literal(prefix) + " }}" + _SPLIT_SYSTEM
            + "{% for message in turns %}" + _ROLE_CHECK + _BODIES[family] + "{% endfor %}"
            + _GENERATION_PROMPT[family])


def prefix_text(tokenizer) -> str:
    """The text of the special tokens the tokenizer puts in front of an encoded text."""
    prefix_ids, _ = special_token_frame(tokenizer)
    return "".join(tokenizer.convert_ids_to_tokens(prefix_ids))


def attach_chat_template(tokenizer, family: str) -> str:
    """Set `tokenizer.chat_template` to the family's training format; returns the template."""
    tokenizer.chat_template = jinja_chat_template(family, prefix_text(tokenizer))
    return tokenizer.chat_template


def is_training_template(tokenizer, family: str) -> bool:
    """Whether the tokenizer's chat template is exactly `family`'s training format (set by train.py)."""
    try:
        expected = jinja_chat_template(family, prefix_text(tokenizer))
    except ValueError:  # a tokenizer whose special-token frame cannot be read
        return False
    return getattr(tokenizer, "chat_template", None) == expected
