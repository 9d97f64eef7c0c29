"""Stage 1: write one test prompt per (context length, depth) with the model's own tokenizer.

    python Needle_test/prompt.py [--config Needle_test/config-prompt.yaml]
        [--haystack_dir DIR] [--tokenizer PATH] [--save_dir DIR] [--trust_remote_code]

Replaces <save_dir> as a unit (Needle_test/prompt_set.py): <id>.json per prompt (id =
len{L}_depth{d}), stats.json and manifest.json (every id with the sha256 of its prompt). A
save_dir that prompt.py did not write is refused. A tokenizer folder with its own code (ChatGLM)
loads only with --trust_remote_code (or tokenizer.trust_remote_code: true in the config). The config
is checked first (longalign/eval/needle_test/config.py). Prompts longer than the model's positions (the
tokenizer folder's config.json) are written, warned about and counted in stats.json.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path


from longalign.eval.needle_test.config import PROMPT_SCHEMA, load_config, resolve
from longalign.eval.needle_test.needle import (context_lengths, depth_percents, haystack_ids, make_prompt,
                                          over_position_limit, read_haystack, read_position_limit,
                                          sentence_end_patterns)
from longalign.eval.needle_test.prompt_set import write_prompt_set
from longalign.remote_code import load_tokenizer
from longalign.eval.prediction_keys import TOKENIZER_FILE_SUFFIXES, directory_fingerprint, resolve_model_dir

DEFAULT_CONFIG = Path(__file__).resolve().parent / "config-prompt.yaml"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(DEFAULT_CONFIG))
    p.add_argument("--haystack_dir", default=None, help="overrides prompt.haystack_dir")
    p.add_argument("--tokenizer", default=None, help="overrides tokenizer.model_name")
    p.add_argument("--save_dir", default=None, help="overrides save_dir")
    p.add_argument("--trust_remote_code", action="store_true", default=None,
                   help="allow the tokenizer folder's own Python code to run (ChatGLM needs it)")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    given = {"save_dir": args.save_dir, "tokenizer.model_name": args.tokenizer}
    config = load_config(args.config, PROMPT_SCHEMA, provided={key for key, value in given.items() if value})
    haystack_dir = (Path(args.haystack_dir) if args.haystack_dir
                    else resolve(config, config["prompt"].get("haystack_dir")))
    save_dir = Path(args.save_dir) if args.save_dir else resolve(config, config["save_dir"])
    tokenizer_name = args.tokenizer or config["tokenizer"]["model_name"]
    trust = args.trust_remote_code or bool(config["tokenizer"].get("trust_remote_code"))
    tokenizer_dir = resolve_model_dir(tokenizer_name, TOKENIZER_FILE_SUFFIXES)
    tokenizer = load_tokenizer(str(tokenizer_dir), trust)
    lengths, depths = context_lengths(config["context"]), depth_percents(config["document_depth"])
    buffer = int(config["final_context_buffer"])
    ends = sentence_end_patterns(tokenizer)
    hay = haystack_ids(tokenizer, read_haystack(haystack_dir), max(lengths))
    needle, question = config["prompt"]["needle"], config["prompt"]["retrieval_question"]
    stats = {"tokenizer": tokenizer_name, "haystack_dir": str(haystack_dir), "haystack_tokens": len(hay),
             "context_lengths": lengths, "depth_percents": depths, "buffer": buffer,
             "period_token_ids": sorted(ends.ids), "period_token_sequences": [list(s) for s in ends.sequences],
             "written": 0, "needle_without_sentence_end": 0, "over_length": 0}
    records = []
    for length in lengths:
        for depth in depths:
            record = make_prompt(tokenizer, hay, needle, question, length, depth, buffer, ends)
            record["tokenizer"] = tokenizer_name
            records.append(record)
            stats["written"] += 1
            stats["needle_without_sentence_end"] += int(not record["needle_at_sentence_end"])
            stats["over_length"] += int(record["prompt_tokens"] > length)
    limit = read_position_limit(tokenizer_dir)
    over_limit = over_position_limit(records, limit)
    stats.update(model_max_positions=limit, over_model_max_positions=len(over_limit))
    made_with = {"needle": needle, "retrieval_question": question, "context_lengths": lengths,
                 "depth_percents": depths, "buffer": buffer, "tokenizer": tokenizer_name,
                 "tokenizer_fingerprint": directory_fingerprint(tokenizer_dir, TOKENIZER_FILE_SUFFIXES)}
    manifest = write_prompt_set(save_dir, records, stats, made_with)
    stats["prompt_set_sha256"] = manifest["prompt_set_sha256"]
    print(f"[prompt] {stats['written']} prompts ({len(lengths)} lengths x {len(depths)} depths) in {save_dir} "
          f"(set {manifest['prompt_set_sha256'][:12]}, replaced as a unit); needle without sentence end: "
          f"{stats['needle_without_sentence_end']}, prompts over their length: {stats['over_length']}")
    if over_limit:
        print(f"[prompt] WARNING: {len(over_limit)} prompts are longer than the model's {limit} positions "
              f"({tokenizer_dir}/config.json), e.g. {over_limit[0]}; they are written and counted in "
              "stats.json (over_model_max_positions)", file=sys.stderr)
    elif limit is None:
        print(f"[prompt] note: {tokenizer_dir} has no config.json stating the model's positions; "
              "prompt lengths were not checked against the model", file=sys.stderr)
    return stats


if __name__ == "__main__":
    try:
        main()
    except (FileNotFoundError, ValueError) as err:  # bad input: the message says what to do
        sys.exit(f"[prompt] ERROR: {err}")
