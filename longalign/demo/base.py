"""The demo's starting model: the shipped pretrained base, its context raised for long training.

    python -m longalign.demo.base --base models/tiny-base --out data/demo/model_init --max_positions 2304

LongAlign starts from a base whose context was already extended (Llama-2 with a larger RoPE base
and continued pretraining, ChatGLM3-6B-32k/64k). The miniature's base was pretrained at a short
context; this copies it (weights, tokenizer, card) to --out with `max_position_embeddings` set to
the demo's training length, so the trained model's config states the context it was trained
at. RoPE is relative and its base is unchanged: the weights are the base's, bit for bit.
"""
from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from longalign.storage import OUTPUT_MARKER, atomic_dir, write_json_atomic

DEFAULT_BASE = Path(__file__).resolve().parents[2] / "models" / "tiny-base"
STATS_FILE = "stats.json"
BASE_STATS = "pretrain_stats.json"  # the base's own stats.json, kept beside the new one


def prepare_model_init(base: str | Path, out: str | Path, max_positions: int) -> dict:
    """Copy `base` to `out` (replaced atomically) with max_position_embeddings = max_positions."""
    base = Path(base)
    config = json.loads((base / "config.json").read_text(encoding="utf-8"))
    if config.get("model_type") != "llama":
        raise ValueError(f"{base}/config.json: the demo base is a llama model, got {config.get('model_type')!r}")
    base_context = config["max_position_embeddings"]
    if max_positions < base_context:
        raise ValueError(f"--max_positions {max_positions} is below the base's context {base_context}")
    with atomic_dir(out, stage="demo_model_init", overwrite=True) as tmp:
        for path in base.iterdir():
            if path.is_file() and path.name not in (OUTPUT_MARKER, STATS_FILE):
                shutil.copy(path, tmp / path.name)
        if (base / STATS_FILE).is_file():
            shutil.copy(base / STATS_FILE, tmp / BASE_STATS)
        write_json_atomic(tmp / "config.json", {**config, "max_position_embeddings": max_positions})
        stats = {"base": str(base), "base_context": base_context, "max_positions": max_positions}
        write_json_atomic(tmp / STATS_FILE, stats)
    return stats


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", default=str(DEFAULT_BASE), help="the pretrained base folder")
    parser.add_argument("--out", required=True, help="output folder (replaced)")
    parser.add_argument("--max_positions", type=int, required=True, help="the demo's training length")
    args = parser.parse_args(argv)
    if not (Path(args.base) / "config.json").is_file():
        parser.error(f"--base {args.base}: no config.json there (make it with python -m longalign.demo.pretrain)")
    stats = prepare_model_init(args.base, args.out, args.max_positions)
    print(json.dumps({"out": args.out, **stats}))
    return stats


if __name__ == "__main__":
    main()
