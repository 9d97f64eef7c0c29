"""A random-init Llama (hidden 32, 2 layers) saved with a tokenizer, for eval tests."""
from __future__ import annotations

from pathlib import Path

from longalign.demo.tiny_model import TinyShape, save_tiny_model

TEST_SHAPE = TinyShape(hidden=32, layers=2, heads=4, kv_heads=2, intermediate=64, max_positions=8192)


def save_tiny_llama(tokenizer_dir: str, out_dir: Path, seed: int = 0) -> str:
    return save_tiny_model("llama", tokenizer_dir, out_dir, TEST_SHAPE, seed)["out"]
