"""Which chat format a candidate model reads its prompt in, and the prompt text it renders.

Formats (`--chat_format`; the choice and why are recorded with every prediction):
- `chatglm`: LongAlign's ChatGLM training format `[Round 1]\\n\\n问：{query}\\n\\n答：`
  (`longalign.data.training_format.build_prompt`);
- `llama`: LongAlign's Llama training format `[INST]{query}[/INST]`;
- `chat_template`: the model's own tokenizer `chat_template` (one user message, generation prompt);
- `server`: a served model reached through `/chat/completions`: the server applies its template.

`auto` (the default) picks, in this order: a released LongAlign model by name (LongAlign-6B ->
chatglm, LongAlign-7B/13B -> llama: they keep their training format); a checkpoint of this repo
(its tokenizer's chat_template is exactly the family's training format, `longalign.data.jinja_template`);
the tokenizer's own
`chat_template` when it has one (the original applied none, which costs models trained on their
own format); a ChatGLM or Llama checkpoint without a template by `config.model_type` (this
repo's checkpoints of either family); a path naming chatglm. Otherwise it asks for
`--chat_format`. Checkpoints saved by this repo carry a chat template that renders exactly the
templates.py prompt, so for them `chat_template` and the family format give the same text.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import asdict, dataclass

from longalign.data.jinja_template import is_training_template
from longalign.data.training_format import build_prompt

AUTO = "auto"
CHATGLM, LLAMA, CHAT_TEMPLATE, SERVER = "chatglm", "llama", "chat_template", "server"
TRAINING_FORMATS = (CHATGLM, LLAMA)
REQUESTABLE = (AUTO, CHATGLM, LLAMA, CHAT_TEMPLATE)
LONGALIGN_RELEASES = {"longalign-6b": CHATGLM, "longalign-7b": LLAMA, "longalign-13b": LLAMA}
CHATGLM_NAME_HINT = "chatglm"


@dataclass(frozen=True)
class ChatFormat:
    name: str
    reason: str
    template_sha256: str | None = None  # of the tokenizer's chat_template, for `chat_template`

    def record(self) -> dict:
        return asdict(self)


def model_basename(model: str) -> str:
    return os.path.basename(os.path.normpath(str(model))).lower() or str(model).lower()


def tokenizer_template(tokenizer) -> str | None:
    template = getattr(tokenizer, "chat_template", None) if tokenizer is not None else None
    return template if isinstance(template, str) and template else None


def _with_template(tokenizer, reason: str) -> ChatFormat:
    template = tokenizer_template(tokenizer)
    if template is None:
        raise ValueError("--chat_format chat_template needs a tokenizer with a chat_template "
                         "(pass --tokenizer for a served model)")
    return ChatFormat(CHAT_TEMPLATE, reason, hashlib.sha256(template.encode("utf-8")).hexdigest())


def resolve_chat_format(requested: str, model: str, tokenizer=None, model_type: str | None = None,
                        served_chat_api: bool = False) -> ChatFormat:
    """The format a model's prompts are rendered in (see the module docstring for the order)."""
    if requested not in REQUESTABLE:
        raise ValueError(f"--chat_format must be one of {REQUESTABLE}, got {requested!r}")
    if served_chat_api:
        if requested != AUTO:
            raise ValueError(f"--chat_format {requested} renders the prompt here, which a served model reached "
                             "through /chat/completions cannot take: pass --model_api completions")
        return ChatFormat(SERVER, "served through /chat/completions: the server applies its chat template")
    if requested in TRAINING_FORMATS:
        return ChatFormat(requested, "--chat_format")
    if requested == CHAT_TEMPLATE:
        return _with_template(tokenizer, "--chat_format")
    name = model_basename(model)
    for hint, family in LONGALIGN_RELEASES.items():
        if hint in name:
            return ChatFormat(family, f"LongAlign release {hint!r} in the name: its training format")
    if model_type in TRAINING_FORMATS and tokenizer is not None and is_training_template(tokenizer, model_type):
        return ChatFormat(model_type, "a checkpoint of this repo: its chat_template is LongAlign's "
                                      f"{model_type} training format")
    if tokenizer_template(tokenizer) is not None:
        return _with_template(tokenizer, "the tokenizer's own chat_template")
    if model_type in TRAINING_FORMATS:
        return ChatFormat(model_type, f"config.model_type {model_type!r} without a chat_template: "
                                      "LongAlign's training format")
    if CHATGLM_NAME_HINT in name:
        return ChatFormat(CHATGLM, "'chatglm' in the name, no chat_template")
    raise ValueError(f"cannot tell the chat format of {model!r} (model_type={model_type!r}, no tokenizer "
                     f"chat_template); pass --chat_format one of {REQUESTABLE[1:]}")


def adds_bos(tokenizer) -> bool:
    """Whether `tokenizer(text)` puts the BOS token in front by itself."""
    bos = getattr(tokenizer, "bos_token_id", None)
    return bos is not None and list(tokenizer("x")["input_ids"][:1]) == [bos]


def render_prompt(chat_format: ChatFormat, query: str, tokenizer=None) -> str:
    """The text the model reads before its answer to `query` (one round, no history).

    The text never starts with a BOS that the tokenizer adds itself: it is tokenized with the
    tokenizer's special tokens (`tokenizer(text)` here, the server for `/completions`), so a
    template's own leading BOS text is dropped rather than doubled.
    """
    if chat_format.name in TRAINING_FORMATS:
        return build_prompt(chat_format.name, [], query)
    if chat_format.name == SERVER:
        return query
    if chat_format.name != CHAT_TEMPLATE:
        raise ValueError(f"unknown chat format {chat_format.name!r}")
    text = tokenizer.apply_chat_template([{"role": "user", "content": query}], tokenize=False,
                                         add_generation_prompt=True)
    bos_text = getattr(tokenizer, "bos_token", None)
    if bos_text and text.startswith(bos_text) and adds_bos(tokenizer):
        text = text[len(bos_text):]
    return text
