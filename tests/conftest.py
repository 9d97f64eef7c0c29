"""Shared fixtures: a tokenizer trained on the spot (no downloads in tests), and the tiers.

The project is an installed package (`pip install -e .`). The one sys.path setup of the suite:
the repository root (train.py, pre_tokenize.py, the script folders Needle_test/ and
LongBench_Chat/), bench/ (whose scripts import their sibling modules as a script run does) and
tests/ (the `helpers` package). The torchrun workers (`-m helpers.torchrun_worker`) find `helpers`
and train.py through the PYTHONPATH their launch sets (the root and tests/); tests/ mirrors the
package (ops, modeling, data, train, eval, demo) with bench/ for the bench scripts. A test file
imports what it shares with others from `helpers`, never from another test file.

Tiers (markers registered in pyproject.toml): unit tests carry none; `integration` (several
stages, or a real training run), `subprocess` (a real exit code, signal or kill is the point),
`distributed` (torchrun launches) and `slow` (bench smoke runs, the demo) are the other tiers.
`make test-fast` runs the unit tier, `make test` every tier (all run on CPU).

`make test` spreads the files over one pytest-xdist worker per core (`-n auto --dist loadfile`,
a file's tests and its module fixtures on one worker); each worker and the processes it starts
then use one CPU thread, so the workers do not fight over the cores.
"""
import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
for _path in (REPO, REPO / "bench", REPO / "tests"):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

from longalign.demo.tiny_tokenizer import train_tiny_tokenizer

WORKER_THREADS = 1  # torch / OpenMP threads of each pytest-xdist worker and of what it launches


def pytest_configure(config):
    if os.environ.get("PYTEST_XDIST_WORKER"):
        import torch

        os.environ["OMP_NUM_THREADS"] = str(WORKER_THREADS)
        torch.set_num_threads(WORKER_THREADS)

_CORPUS = [
    "[Round 1]\n\n问：What is the key?\n\n答：The key is 42.",
    "[INST]Summarize the document.[/INST]It describes long context alignment.",
    "The quick brown fox jumps over the lazy dog. " * 4,
    "Long context models read documents of many thousand tokens and answer questions about them.",
    "0123456789 abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ .,;:!?()[]{}<>'\"\n\t",
]


@pytest.fixture(autouse=True)
def environment_restored():
    """Each test ends with the environment it started with: scripts' mains run in-process set
    variables for their own run (e.g. bench_train_step's LONGALIGN_ATTN_BACKEND)."""
    saved = dict(os.environ)
    yield
    if os.environ != saved:
        os.environ.clear()
        os.environ.update(saved)


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


# The demo's and the paper-findings' test files train and evaluate whole miniature runs: their tier
# is set here, by file, so those files stay as their owner keeps them.
WHOLE_RUN_FILES = ("test_demo.py", "test_demo_base.py", "test_demo_data.py", "test_demo_eval.py",
                   "test_demo_sweep.py", "test_reproduce_mini.py")


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.path.name in WHOLE_RUN_FILES:
            item.add_marker(pytest.mark.integration)
            item.add_marker(pytest.mark.slow)
