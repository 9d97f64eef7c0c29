"""Token ids of plain text: what a conversation's words become, never a control token.

Text is text. A literal "</s>", "<s>", "[gMASK]", "<|user|>" (any added or special token of the
tokenizer) inside user or assistant content must be tokenized as the characters it is made of:
otherwise a document that quotes markup would end a reply early, or start a role, in the
middle of training data. `TextEncoder` therefore
- on fast tokenizers encodes with its own copy of the Rust tokenizer in which every added
  token is marked special and `encode_special_tokens` is on (special tokens are split into
  text), through the offset-free `encode_batch_fast` — used only when that copy gives the
  wrapper's own ids (`tokenizer(..., split_special_tokens=True)`) on probe texts, so no
  wrapper-side pre-processing is bypassed;
- otherwise (python tokenizers such as ChatGLM3's remote code) calls the wrapper with
  `split_special_tokens=True`, which skips transformers' added-token split entirely;
- checks at construction that every control-token string of the tokenizer encodes to text ids
  (no control id) and refuses the tokenizer otherwise (e.g. ChatGLM3 loaded with its own
  `encode_special_tokens=True` option).
Special tokens the template needs (BOS, `[gMASK]sop`, EOS) are added as ids by the caller.

Continuations. SentencePiece tokenizers (Llama-2, ChatGLM3) put a dummy "▁" in front of every
encoded string, so encoding a piece of text on its own is not how it tokenizes after other
text: "\\n\\n[INST]" alone starts with a stray "▁" that the whole conversation does not have.
`encode(..., continuation=True)` encodes `anchor + text` and drops the anchor's ids, with an
anchor that merges with nothing ("\\ue000", a private-use character: byte-fallback pieces),
chosen at construction on probe texts; tokenizers without a dummy prefix (byte-level BPE)
get no anchor. When the anchor's ids are not a prefix of a result (the text merged into
it), that text is encoded on its own instead; the caller compares with the whole-text
encoding and counts any difference.
"""
from __future__ import annotations

import json
from typing import Sequence

CONTINUATION_ANCHORS = ("", "\ue000")  # tried in this order; the best on the probes is kept
# (left, right) splits at which the training text is cut into segments: prompt | reply and
# reply | "\n\n" + next round, in both templates, with Chinese, digits and punctuation.
_CONTINUATION_PROBES = (
    ("[INST]What is the key?[/INST]", "The key is 42."),
    ("[INST]Hello,  world![/INST]", "Sure: 1, 2, 3."),
    ("[Round 1]\n\n问：你好，钥匙在哪里？\n\n答：", "钥匙在桌子上。"),
    ("[Round 1]\n\n问：x\n\n答：", "Yes."),
    ("The key is 42.", "\n\n[INST]And the lock?[/INST]"),
    ("钥匙在桌子上。", "\n\n[Round 2]\n\n问：谢谢\n\n答："),
    ("It opens", "\n\n[INST]why[/INST]"),
)
_AGREEMENT_PROBES = ("Hello,  world!\n\tTabs  and 空格 ünïcödé 123", " Leading space.\n\n",
                     "[INST]q[/INST]a\n\n[Round 2]\n\n问：好\n\n答：", "\u200bzero width")


class TextEncoder:
    """Encode plain text with `tokenizer`: no special tokens added, none recognised (see module)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.control_strings = control_token_strings(tokenizer)
        self.backend = _text_only_backend(tokenizer)
        if self.backend is not None and not self._backend_agrees_with_wrapper():
            self.backend = None
        self.check_text_is_text()
        self.anchor = self._choose_anchor()
        self.anchor_ids = self._encode_plain([self.anchor])[0] if self.anchor else []

    @property
    def route(self) -> str:
        return "backend_encode_batch_fast" if self.backend is not None else "wrapper_split_special_tokens"

    def encode(self, texts: Sequence[str], continuation: bool = False) -> list[list[int]]:
        """Ids of each text; `continuation=True`: as the text tokenizes after other text."""
        if not continuation:
            return self._encode_plain(texts)
        return self._encode_after(texts, self.anchor, self.anchor_ids)

    def _encode_after(self, texts: Sequence[str], anchor: str, anchor_ids: list[int]) -> list[list[int]]:
        """Encode `anchor + text` and drop the anchor's ids; a text that merged into the anchor
        (its ids do not start with `anchor_ids`) is encoded on its own."""
        if not anchor:
            return self._encode_plain(texts)
        n = len(anchor_ids)
        anchored = self._encode_plain([anchor + text for text in texts])
        merged = [i for i, ids in enumerate(anchored) if ids[:n] != anchor_ids]
        alone = dict(zip(merged, self._encode_plain([texts[i] for i in merged])))
        return [alone[i] if i in alone else ids[n:] for i, ids in enumerate(anchored)]

    def _encode_plain(self, texts: Sequence[str]) -> list[list[int]]:
        if not texts:
            return []
        if self.backend is not None:
            return [e.ids for e in self.backend.encode_batch_fast(list(texts), add_special_tokens=False)]
        encoded = self.tokenizer(list(texts), add_special_tokens=False, split_special_tokens=True)
        return [list(ids) for ids in encoded["input_ids"]]

    def _backend_agrees_with_wrapper(self) -> bool:
        via_wrapper = self.tokenizer(list(_AGREEMENT_PROBES), add_special_tokens=False,
                                     split_special_tokens=True)["input_ids"]
        via_backend = [e.ids for e in self.backend.encode_batch_fast(list(_AGREEMENT_PROBES),
                                                                     add_special_tokens=False)]
        return [list(ids) for ids in via_wrapper] == via_backend

    def check_text_is_text(self) -> None:
        """Raise ValueError if a control-token string inside text would become a control id."""
        control_ids = control_token_ids(self.tokenizer)
        unk = self.tokenizer.unk_token_id
        forbidden = control_ids - {unk}
        for text, ids in zip(self.control_strings, self._encode_plain(self.control_strings)):
            hit = sorted(set(ids) & forbidden) or ([unk] if ids == [unk] else [])
            if hit:
                raise ValueError(
                    f"the tokenizer encodes the text {text!r} as control token id(s) {hit} even with "
                    f"split_special_tokens (route {self.route}); text inside conversations must stay "
                    "text. Load the tokenizer without options that turn strings into control tokens "
                    "(e.g. ChatGLM3's encode_special_tokens=True).")

    def _choose_anchor(self) -> str:
        """The continuation anchor under which most probe splits tokenize as the whole text."""
        lefts = [left for left, _ in _CONTINUATION_PROBES]
        rights = [right for _, right in _CONTINUATION_PROBES]
        wholes = self._encode_plain([left + right for left, right in _CONTINUATION_PROBES])
        left_ids = self._encode_plain(lefts)

        def agreeing(anchor: str) -> int:
            anchor_ids = self._encode_plain([anchor])[0] if anchor else []
            right_ids = self._encode_after(rights, anchor, anchor_ids)
            return sum(a + b == w for a, b, w in zip(left_ids, right_ids, wholes))

        scores = [agreeing(anchor) for anchor in CONTINUATION_ANCHORS]
        return CONTINUATION_ANCHORS[scores.index(max(scores))]  # ties: the earlier (no anchor first)


def control_token_strings(tokenizer) -> list[str]:
    """Every added token's text and every special token string of `tokenizer`, sorted."""
    added = [str(token) for token in getattr(tokenizer, "added_tokens_decoder", {}).values()]
    return sorted(set(added) | set(tokenizer.all_special_tokens))


def control_token_ids(tokenizer) -> set[int]:
    return set(getattr(tokenizer, "added_tokens_decoder", {})) | set(tokenizer.all_special_ids)


def _text_only_backend(tokenizer):
    """A copy of the fast tokenizer's Rust backend that splits every added token into text."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or not hasattr(backend, "encode_batch_fast"):
        return None
    from tokenizers import Tokenizer

    spec = json.loads(backend.to_str())
    for token in spec.get("added_tokens") or []:
        token["special"] = True  # encode_special_tokens splits special tokens only
    copy = Tokenizer.from_str(json.dumps(spec))
    copy.no_truncation()
    copy.no_padding()
    copy.encode_special_tokens = True
    return copy
