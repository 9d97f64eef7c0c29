"""A small random-init model of either family, sized to a tokenizer, saved with that tokenizer.

    python -m longalign.demo.tiny_model --family llama --tokenizer data/demo/raw/tokenizer \
        --out data/demo/model_init [--hidden 64 --layers 2 --heads 4 --kv_heads 2 ...]

builds transformers' `LlamaForCausalLM` or this repo's ChatGLM remote-code
`ChatGLMForConditionalGeneration` (longalign/modeling/) with the vocabulary size and the pad/bos/eos
ids of the tokenizer, saves it with `save_pretrained` and copies the tokenizer files beside it, so
train.py and the evaluation scripts load model and tokenizer from one directory. The output
directory is replaced atomically; same seed, same weights. Used by the demo and the tests.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

from transformers import LlamaConfig, LlamaForCausalLM

from longalign.constants import MODEL_FAMILIES
from longalign.modeling.checkpoints import make_self_describing
from longalign.modeling.configuration_chatglm import ChatGLMConfig
from longalign.modeling.modeling_chatglm import ChatGLMForConditionalGeneration
from longalign.storage import atomic_dir, write_json_atomic

STATS_FILE = "stats.json"  # what was built, beside the weights (every stage writes one)
TINY_ROPE_RATIO = 1.0  # ChatGLM RoPE base 10000 * 1: ample for the tiny models' context lengths


@dataclass
class TinyShape:
    """Sizes of the tiny model (defaults: the demo's, fast on a CPU, a real multi-head GQA model).

    tie_embeddings shares the input embedding with the LM head (Llama's `tie_word_embeddings`);
    the demo uses it because, in its experiments, tied models started copying from the context
    sooner than untied ones (README, "The offline demo").
    """
    hidden: int = 128
    layers: int = 2
    heads: int = 4
    kv_heads: int = 2
    intermediate: int = 256
    max_positions: int = 8192
    tie_embeddings: bool = False

    def check(self, family: str = "llama") -> None:
        for name, value in asdict(self).items():
            if not isinstance(value, bool) and value < 1:
                raise ValueError(f"--{name} must be >= 1, got {value}")
        if self.tie_embeddings and family != "llama":
            raise ValueError(f"--tie_embeddings is for llama models, not {family}")
        if self.hidden % self.heads:
            raise ValueError(f"--hidden {self.hidden} must be a multiple of --heads {self.heads}")
        if self.heads % self.kv_heads:
            raise ValueError(f"--heads {self.heads} must be a multiple of --kv_heads {self.kv_heads}")


def special_ids(tokenizer) -> dict:
    """pad/bos/eos ids of the tokenizer (pad falls back to eos, as the trainer's collators do)."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return {"pad_token_id": pad, "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id}


def build_model(family: str, vocab_size: int, ids: dict, shape: TinyShape):
    """A random-init model of `family`: transformers' LlamaForCausalLM, or the ChatGLM remote-code
    class of longalign/modeling/ (the checkpoint it saves ships that code)."""
    if family == "llama":
        config = LlamaConfig(vocab_size=vocab_size, hidden_size=shape.hidden, intermediate_size=shape.intermediate,
                             num_hidden_layers=shape.layers, num_attention_heads=shape.heads,
                             num_key_value_heads=shape.kv_heads, max_position_embeddings=shape.max_positions,
                             tie_word_embeddings=shape.tie_embeddings, **ids)
        return LlamaForCausalLM(config)
    if family == "chatglm":
        config = ChatGLMConfig(padded_vocab_size=vocab_size, hidden_size=shape.hidden,
                               ffn_hidden_size=shape.intermediate, num_layers=shape.layers,
                               num_attention_heads=shape.heads, kv_channels=shape.hidden // shape.heads,
                               multi_query_attention=shape.kv_heads < shape.heads,
                               multi_query_group_num=shape.kv_heads, seq_length=shape.max_positions,
                               rope_ratio=TINY_ROPE_RATIO, **ids)
        return ChatGLMForConditionalGeneration(config)
    raise ValueError(f"family must be one of {MODEL_FAMILIES}, got {family!r}")


def save_tiny_model(family: str, tokenizer_dir: str | Path, out_dir: str | Path,
                    shape: TinyShape | None = None, seed: int = 0) -> dict:
    """Build and save the model (replacing `out_dir` atomically); return its stats plus `out`."""
    import torch
    from transformers import AutoTokenizer

    shape = shape or TinyShape()
    shape.check(family)
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    ids = special_ids(tokenizer)
    torch.manual_seed(seed)
    model = build_model(family, len(tokenizer), ids, shape)
    stats = {"family": family, "tokenizer": str(tokenizer_dir), "vocab_size": len(tokenizer), "seed": seed,
             "parameters": sum(p.numel() for p in model.parameters()), **ids, **asdict(shape)}
    with atomic_dir(out_dir, stage="tiny_model", overwrite=True) as tmp:  # --out is replaced whole
        model.save_pretrained(str(tmp))
        make_self_describing(tmp, family)
        for path in Path(tokenizer_dir).iterdir():
            if path.is_file() and not (tmp / path.name).exists():  # never overwrite the model's own files
                shutil.copy(path, tmp / path.name)
        write_json_atomic(tmp / STATS_FILE, stats)
    return {"out": str(out_dir), **stats}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", required=True, choices=MODEL_FAMILIES)
    parser.add_argument("--tokenizer", required=True, help="tokenizer directory (copied into --out)")
    parser.add_argument("--out", required=True, help="model directory (replaced)")
    parser.add_argument("--seed", type=int, default=0)
    defaults = TinyShape()
    for name, value in asdict(defaults).items():
        if isinstance(value, bool):
            parser.add_argument(f"--{name}", action=argparse.BooleanOptionalAction, default=value)
        else:
            parser.add_argument(f"--{name}", type=int, default=value)
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    shape = TinyShape(**{name: getattr(args, name) for name in asdict(TinyShape())})
    try:
        summary = save_tiny_model(args.family, args.tokenizer, args.out, shape, args.seed)
    except ValueError as err:
        sys.exit(f"[tiny_model] ERROR: {err}")
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
