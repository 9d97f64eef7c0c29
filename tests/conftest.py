"""Shared fixtures: a tokenizer trained on the spot (no downloads in tests)."""
import pytest

from longalign.tiny_tokenizer import train_tiny_tokenizer

_CORPUS = [
    "[Round 1]\n\n问：What is the key?\n\n答：The key is 42.",
    "[INST]Summarize the document.[/INST]It describes long context alignment.",
    "The quick brown fox jumps over the lazy dog. " * 4,
    "Long context models read documents of many thousand tokens and answer questions about them.",
    "0123456789 abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ .,;:!?()[]{}<>'\"\n\t",
]


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory):
    """Directory of a small byte-level BPE tokenizer (BOS <s>, EOS </s>, PAD <pad>)."""
    out = tmp_path_factory.mktemp("tiny_tokenizer")
    train_tiny_tokenizer(_CORPUS * 20, out, vocab_size=512)
    return str(out)


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
