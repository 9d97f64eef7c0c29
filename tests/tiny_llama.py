"""A random-init LlamaForCausalLM (hidden 32, 2 layers) saved with a tokenizer, for eval tests."""
from __future__ import annotations

import shutil
from pathlib import Path


def save_tiny_llama(tokenizer_dir: str, out_dir: Path, seed: int = 0) -> str:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=8192,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    LlamaForCausalLM(config).save_pretrained(str(out_dir))
    for path in Path(tokenizer_dir).iterdir():
        shutil.copy(path, out_dir / path.name)
    return str(out_dir)
