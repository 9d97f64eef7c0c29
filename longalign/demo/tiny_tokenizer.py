"""A small byte-level BPE tokenizer trained on the spot, saved as a HF tokenizer directory.

No real tokenizer can be downloaded offline, so the demo and the tests train this one on the
text they use. Byte-level BPE encodes any string (Chinese template words included) and decodes
it back exactly. Like Llama-2's, it adds BOS at the start of an encoding and has an EOS token.

`alphabet="observed"` starts the BPE from the bytes that occur in `texts` instead of all 256, so
a small vocabulary holds no ids that never occur (bench/demo_sweep.py tries it; the demo keeps all
256). A byte it never saw then encodes as <unk>: such a tokenizer is only for text like its corpus.
"""
from __future__ import annotations

import os
from typing import Iterable

SPECIAL_TOKENS = {"unk_token": "<unk>", "bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>"}


ALPHABETS = ("bytes", "observed")


def train_tiny_tokenizer(texts: Iterable[str], out_dir: str | os.PathLike, vocab_size: int = 2048,
                         alphabet: str = "bytes"):
    """Train a byte-level BPE on `texts`, save it to `out_dir` and return the loaded tokenizer.

    alphabet: "bytes" (all 256 byte symbols, any string encodes) or "observed" (only the bytes in
    `texts`; others become <unk>).

    The result loads with `transformers.AutoTokenizer.from_pretrained(out_dir)`.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    if alphabet not in ALPHABETS:
        raise ValueError(f"alphabet must be one of {ALPHABETS}, got {alphabet!r}")
    tok = Tokenizer(models.BPE(unk_token=SPECIAL_TOKENS["unk_token"]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS.values()),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet() if alphabet == "bytes" else [],
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    bos = SPECIAL_TOKENS["bos_token"]
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A $B", special_tokens=[(bos, tok.token_to_id(bos))]
    )
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, **SPECIAL_TOKENS)
    fast.save_pretrained(str(out_dir))
    return fast
