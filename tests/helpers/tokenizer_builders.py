"""Test-only tokenizers that behave like the real ones the project meets (no downloads).

- `build_llama2_sentencepiece_dir`: a Llama-2-style tokenizer directory as many Llama-2
  checkpoints ship it — a sentencepiece `tokenizer.model` (BPE, byte fallback, dummy prefix,
  <unk>/<s>/</s> = 0/1/2) plus a `tokenizer_config.json` naming `LlamaTokenizer`, and no
  `tokenizer.json`; transformers 5 converts it to a fast tokenizer (with `protobuf`).
- `ChatGLM3LikeTokenizer`: a python (slow) tokenizer shaped like ChatGLM3-6B's remote code
  (`tokenization_chatglm.py`, which cannot be downloaded here): a sentencepiece model, then the
  commands `[MASK] [gMASK] [sMASK] sop eop <|system|> <|user|> <|assistant|> <|observation|>`
  with ids right after the sentencepiece vocabulary, `[gMASK] sop` put in front of every
  encoding by `build_inputs_with_special_tokens`, EOS `</s>`, pad `<unk>`. The commands are
  registered as added tokens, so a plain `tokenizer(text)` turns a literal "<|user|>" inside
  text into the control token — what pre_tokenize must never do.
"""
from __future__ import annotations

import io
import json
import os
import re
import shutil
from pathlib import Path

from transformers import AddedToken, PreTrainedTokenizer

CHATGLM3_COMMANDS = ("[MASK]", "[gMASK]", "[sMASK]", "sop", "eop",
                     "<|system|>", "<|user|>", "<|assistant|>", "<|observation|>")
CHATGLM3_ROLES = CHATGLM3_COMMANDS[5:]
SPECIAL_PIECES = {"unk_id": 0, "bos_id": 1, "eos_id": 2, "pad_id": -1}  # Llama-2 / ChatGLM3 layout

CORPUS = [
    "[INST]What is the key?[/INST]The key is 42.\n\n[INST]And the lock?[/INST]It opens.",
    "[Round 1]\n\n问：你好，请问钥匙在哪里？\n\n答：钥匙在桌子上。\n\n[Round 2]\n\n问：谢谢\n\n答：不客气！",
    "The quick brown fox jumps over the lazy dog. " * 3,
    "Long context models read documents of many thousand tokens and answer questions about them.",
    "Summarize the document. It describes long context alignment: data, packing, loss weighting.",
]


def train_sentencepiece_model(texts=CORPUS, vocab_size: int = 420) -> bytes:
    """A serialized sentencepiece BPE model with Llama-2's options (byte fallback, dummy prefix,
    digits split, whitespace kept as is). Trained line by line, as from a text file, so no piece
    contains a newline and "\n" encodes as the byte <0x0A>, as in Llama-2's and ChatGLM3's."""
    import sentencepiece as spm

    lines = [line for text in texts for line in text.split("\n") if line]
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines * 20), model_writer=model, vocab_size=vocab_size,
        model_type="bpe", byte_fallback=True, split_digits=True, add_dummy_prefix=True,
        normalization_rule_name="identity", remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True, character_coverage=1.0, hard_vocab_limit=False,
        num_threads=1, minloglevel=2, **SPECIAL_PIECES)
    return model.getvalue()


def build_llama2_sentencepiece_dir(out_dir, texts=CORPUS, vocab_size: int = 420) -> str:
    """Write tokenizer.model + tokenizer_config.json (LlamaTokenizer, no tokenizer.json)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "tokenizer.model").write_bytes(train_sentencepiece_model(texts, vocab_size))
    config = {"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>",
              "unk_token": "<unk>", "add_bos_token": True, "add_eos_token": False, "legacy": True}
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    return str(out)


class ChatGLM3LikeTokenizer(PreTrainedTokenizer):
    """See the module docstring. `encode_special_tokens=True` makes the role strings inside text
    control tokens even without the added-token split (as ChatGLM3's own option does)."""

    vocab_files_names = {"vocab_file": "tokenizer.model"}
    model_input_names = ["input_ids", "attention_mask"]

    def __init__(self, vocab_file, encode_special_tokens=False, **kwargs):
        import sentencepiece as spm

        self.vocab_file = vocab_file
        self.sp_model = spm.SentencePieceProcessor(model_file=str(vocab_file))
        self.sp_size = self.sp_model.vocab_size()
        self.commands = {token: self.sp_size + i for i, token in enumerate(CHATGLM3_COMMANDS)}
        self.command_tokens = {i: token for token, i in self.commands.items()}
        self.encode_special_tokens = encode_special_tokens
        kwargs.setdefault("added_tokens_decoder", {
            i: AddedToken(token, special=True, normalized=False) for token, i in self.commands.items()})
        super().__init__(eos_token="</s>", unk_token="<unk>", pad_token="<unk>",
                         clean_up_tokenization_spaces=False, **kwargs)

    @property
    def vocab_size(self) -> int:
        return self.sp_size + len(self.commands)

    def get_vocab(self) -> dict:
        vocab = {self.sp_model.id_to_piece(i): i for i in range(self.sp_size)}
        vocab.update(self.commands)
        return vocab

    def _tokenize(self, text, **kwargs):
        if not self.encode_special_tokens:
            return self.sp_model.encode(text, out_type=str)
        pieces, pattern = [], "(" + "|".join(re.escape(role) for role in CHATGLM3_ROLES) + ")"
        for part in re.split(pattern, text):
            if part in CHATGLM3_ROLES:
                pieces.append(part)
            elif part:
                pieces.extend(self.sp_model.encode(part, out_type=str))
        return pieces

    def _convert_token_to_id(self, token):
        return self.commands[token] if token in self.commands else self.sp_model.piece_to_id(token)

    def _convert_id_to_token(self, index):
        return self.command_tokens.get(index) or self.sp_model.id_to_piece(index)

    def convert_tokens_to_string(self, tokens) -> str:
        return self.sp_model.decode_pieces([t for t in tokens if t not in self.commands])

    def build_inputs_with_special_tokens(self, token_ids_0, token_ids_1=None):
        ids = [self.commands["[gMASK]"], self.commands["sop"]] + list(token_ids_0)
        if token_ids_1 is not None:
            ids += list(token_ids_1) + [self.eos_token_id]
        return ids

    def save_vocabulary(self, save_directory, filename_prefix=None):
        target = os.path.join(save_directory, (filename_prefix or "") + "tokenizer.model")
        if os.path.abspath(self.vocab_file) != os.path.abspath(target):
            shutil.copyfile(self.vocab_file, target)
        return (target,)


def build_chatglm3_like_tokenizer(out_dir, texts=CORPUS, vocab_size: int = 420,
                                  encode_special_tokens: bool = False) -> ChatGLM3LikeTokenizer:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "tokenizer.model").write_bytes(train_sentencepiece_model(texts, vocab_size))
    return ChatGLM3LikeTokenizer(str(out / "tokenizer.model"), encode_special_tokens=encode_special_tokens)
