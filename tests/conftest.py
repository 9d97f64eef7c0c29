"""Shared fixtures: a tokenizer trained on the spot (no downloads in tests).

The project is an installed package (`pip install -e .`); the repository root (train.py,
pre_tokenize.py, the script folders Needle_test/ and LongBench_Chat/) and bench/ (whose scripts
import their sibling modules as a script run does) are put on the path for the tests that import them.
"""
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
for _path in (REPO, REPO / "bench"):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

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
