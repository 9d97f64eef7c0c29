"""Stage 1: write one test prompt per (context length, depth) with the model's own tokenizer.

    python Needle_test/prompt.py [--config Needle_test/config-prompt.yaml]
        [--haystack_dir DIR] [--tokenizer PATH] [--save_dir DIR]

Writes <save_dir>/<id>.json (id = len{L}_depth{d}) and <save_dir>/stats.json.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path


from needle import (context_lengths, depth_percents, haystack_ids, load_config,
                                make_prompt, read_haystack, resolve, sentence_end_patterns)
from longalign.storage import write_json_atomic

DEFAULT_CONFIG = Path(__file__).resolve().parent / "config-prompt.yaml"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(DEFAULT_CONFIG))
    p.add_argument("--haystack_dir", default=None, help="overrides prompt.haystack_dir")
    p.add_argument("--tokenizer", default=None, help="overrides tokenizer.model_name")
    p.add_argument("--save_dir", default=None, help="overrides save_dir")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    from transformers import AutoTokenizer

    args = parse_args(argv)
    config = load_config(args.config)
    haystack_dir = Path(args.haystack_dir) if args.haystack_dir else resolve(config, config["prompt"].get("haystack_dir"))
    save_dir = Path(args.save_dir) if args.save_dir else resolve(config, config["save_dir"])
    tokenizer_name = args.tokenizer or config["tokenizer"]["model_name"]
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_name, trust_remote_code=True)
    lengths, depths = context_lengths(config["context"]), depth_percents(config["document_depth"])
    buffer = int(config["final_context_buffer"])
    ends = sentence_end_patterns(tokenizer)
    hay = haystack_ids(tokenizer, read_haystack(haystack_dir), max(lengths))
    needle, question = config["prompt"]["needle"], config["prompt"]["retrieval_question"]
    stats = {"tokenizer": tokenizer_name, "haystack_dir": str(haystack_dir), "haystack_tokens": len(hay),
             "context_lengths": lengths, "depth_percents": depths, "buffer": buffer,
             "period_token_ids": sorted(ends.ids), "period_token_sequences": [list(s) for s in ends.sequences],
             "written": 0, "needle_without_sentence_end": 0, "over_length": 0}
    for length in lengths:
        for depth in depths:
            record = make_prompt(tokenizer, hay, needle, question, length, depth, buffer, ends)
            record["tokenizer"] = tokenizer_name
            write_json_atomic(save_dir / f"{record['id']}.json", record)
            stats["written"] += 1
            stats["needle_without_sentence_end"] += int(not record["needle_at_sentence_end"])
            stats["over_length"] += int(record["prompt_tokens"] > length)
    write_json_atomic(save_dir / "stats.json", stats)
    print(f"[prompt] {stats['written']} prompts ({len(lengths)} lengths x {len(depths)} depths) in {save_dir}; "
          f"needle without sentence end: {stats['needle_without_sentence_end']}, "
          f"prompts over their length: {stats['over_length']}")
    return stats


if __name__ == "__main__":
    try:
        main()
    except (FileNotFoundError, ValueError) as err:  # bad input: the message says what to do
        sys.exit(f"[prompt] ERROR: {err}")
