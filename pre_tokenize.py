"""Stage 1 of LongAlign: tokenize long + short instruction data into an Arrow dataset.

    python pre_tokenize.py --model chatglm --datanum 10k

takes the first N long examples (LongAlign-10k: data/raw/long.jsonl, or the HF dataset
THUDM/LongAlign-10k when that file is missing) plus all short ones (data/raw/sharegpt.jsonl),
formats them with the model's chat template and writes input_ids/labels (int32, unpadded) with
stats.json and invalid_rows.jsonl to --output_dir (default data/<model>/<datanum>).

--long and --short take JSONL, a JSON array or parquet (gzip'd or not), or a Hugging Face
dataset (org/name[:split], or a local dataset folder), with rows in the messages format or the
ShareGPT format, system turns included (data/README.md).
"""
from __future__ import annotations

import argparse
import json
import os
import sys


def build_parser() -> argparse.ArgumentParser:
    from longalign.arguments import non_negative_int
    from longalign.constants import (DEFAULT_MAX_LENGTH, DEFAULT_SHORT_JSONL, MODEL_FAMILIES,
                                     TRUNCATION_MODES)

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, choices=MODEL_FAMILIES, help="chat template family")
    parser.add_argument("--datanum", default="10k", help="first N long examples: 0k, 5k, 10k, any Nk or integer")
    parser.add_argument("--tokenizer", default=None, help="path or hub id (default: the released LongAlign model)")
    parser.add_argument("--long", default=None,
                        help="long data: a JSONL / JSON / parquet file (.gz too) or a dataset org/name[:split] "
                             "(default data/raw/long.jsonl; if that is missing, the HF dataset)")
    parser.add_argument("--short", default=DEFAULT_SHORT_JSONL,
                        help="short data (ShareGPT): a file or dataset, as --long; not the same data as --long")
    parser.add_argument("--max_length", type=int, default=DEFAULT_MAX_LENGTH)
    parser.add_argument("--truncate", choices=TRUNCATION_MODES, default="right",
                        help="over-long examples: keep the head (right), the first 2 tokens + tail (left), or skip")
    parser.add_argument("--num_proc", type=int, default=min(os.cpu_count() or 1, 8))
    parser.add_argument("--output_dir", default=None, help="default data/<model>/<datanum>")
    parser.add_argument("--strict", action="store_true", help="stop at the first invalid input row")
    parser.add_argument("--overwrite_output_dir", action="store_true",
                        help="replace a previous pre_tokenize output even if other files were put in it "
                             "(never an unrelated folder, a file, or a folder holding the inputs)")
    parser.add_argument("--trust_remote_code", action="store_true",
                        help="allow a tokenizer that ships Python code (ChatGLM3's); read that code first")
    parser.add_argument("--shuffle_seed", type=non_negative_int, default=None,
                        help="write the rows (long and short mixed) in a random order with this seed, as the "
                             "original does unseeded; default: input order, long rows then short")
    return parser


def main(argv=None) -> None:
    from longalign.constants import DEFAULT_TOKENIZERS
    from longalign.data.conversations import parse_datanum
    from longalign.data.tokenize_stage import PretokenizeConfig, run_pretokenize

    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        datanum = parse_datanum(args.datanum)
    except ValueError as err:
        parser.error(str(err))
    config = PretokenizeConfig(
        family=args.model,
        tokenizer=args.tokenizer or DEFAULT_TOKENIZERS[args.model],
        long_path=args.long,
        short_path=args.short,
        datanum=datanum,
        max_length=args.max_length,
        truncate=args.truncate,
        num_proc=args.num_proc,
        output_dir=args.output_dir or os.path.join("data", args.model, args.datanum),
        strict=args.strict,
        overwrite_output_dir=args.overwrite_output_dir,
        trust_remote_code=args.trust_remote_code,
        shuffle_seed=args.shuffle_seed,
    )
    stats = run_pretokenize(config)
    if stats["total"]["skipped_invalid"]:
        print(f"warning: {stats['total']['skipped_invalid']} invalid input rows skipped; line numbers and "
              f"reasons in {os.path.join(config.output_dir, stats['invalid_report'])}", file=sys.stderr)
    for name, source in stats["sources"].items():
        if source["byte_order_marks_removed"]:
            print(f"warning: {source['origin']}:1: a UTF-8 byte-order mark started the {name} file; "
                  "removed (counted in stats.json)", file=sys.stderr)
    long = stats["sources"]["long"]
    if long["available"] is not None and long["available"] < config.datanum:
        print(f"warning: --datanum {args.datanum} asked for {config.datanum} long rows; "
              f"{long['origin']} has {long['available']}", file=sys.stderr)
    summary = {name: {k: v for k, v in s.items() if k not in ("length_histogram", "config")}
               for name, s in stats["sources"].items()}
    print(json.dumps({"output_dir": config.output_dir, "sources": summary, "total": stats["total"],
                      "bytes_per_token": stats["bytes_per_token"], "tokens_per_s": stats["tokens_per_s"]},
                     indent=2, ensure_ascii=False))


if __name__ == "__main__":
    main()
