"""Benchmark pre_tokenize: tokens/s with N processes, and bytes on disk per token.

    .venv/bin/python bench/bench_pretokenize.py --num_proc 2

Generates the demo mix (long-context + short chat, `longalign.demo.data`) with its tokenizer in
a temporary directory, runs the whole stage (`run_pretokenize`: read + validate + tokenize +
write) `--repeats` times and reports the median. tokens/s counts every token tokenized (before
truncation) over the stage's wall time; bytes/token is the Arrow files' size over the tokens
written (input_ids + labels together; the goal is <= 9). Prints one JSON line, writes
bench/measured/pretokenize.md and records the figures in bench/results.json.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import sys
import tempfile
from pathlib import Path


RESULTS_MD = Path(__file__).resolve().parent / "measured" / "pretokenize.md"


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num_proc", type=int, default=2)
    parser.add_argument("--num_long", type=int, default=3000, help="long demo rows (~950 tokens each)")
    parser.add_argument("--num_short", type=int, default=3000, help="short chat rows (~35 tokens each)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--family", default="llama", choices=("chatglm", "llama"))
    parser.add_argument("--no_write", action="store_true", help="do not write measured/pretokenize.md / results.json")
    return parser.parse_args(argv)


def run_once(raw: Path, out: Path, args) -> dict:
    from longalign.data.tokenize_stage import PretokenizeConfig, run_pretokenize

    config = PretokenizeConfig(family=args.family, tokenizer=str(raw / "tokenizer"),
                               long_path=str(raw / "long.jsonl"), short_path=str(raw / "sharegpt.jsonl"),
                               datanum=args.num_long, max_length=65536, truncate="right",
                               num_proc=args.num_proc, output_dir=str(out))
    return run_pretokenize(config)


def write_results_md(result: dict, command: str) -> None:
    text = (
        "# pre_tokenize benchmark\n\n"
        f"Command: `{command}`\n\n"
        f"Machine: {result['machine']}\n\n"
        f"Data: demo mix ({result['rows']} rows, {result['tokens']} tokens; byte-level BPE demo tokenizer, "
        f"vocab {result['vocab_size']}), family `{result['family']}`, {result['num_proc']} processes, "
        f"median of {result['repeats']} runs of the whole stage (read, validate, tokenize, write).\n\n"
        "| metric | value |\n|---|---|\n"
        f"| pretokenize_tokens_per_s | {result['pretokenize_tokens_per_s']:.0f} |\n"
        f"| bytes_per_token (input_ids + labels, Arrow files) | {result['bytes_per_token']:.3f} (goal <= 9) |\n"
        f"| tokenize phase only (pool incl. worker start-up), tokens/s | {result['tokenize_phase_tokens_per_s']:.0f} |\n"
        f"| runs (tokens/s) | {', '.join(f'{v:.0f}' for v in result['runs_tokens_per_s'])} |\n"
        f"| 1-min load average after the runs | {result['load_average_1min_after']:.1f} |\n\n"
        "Real Llama/ChatGLM tokenizers are slower per token than this small BPE; the figure is the "
        "stage's own overhead plus a fast tokenizer, not a prediction for LongAlign-10k.\n"
    )
    from longalign.storage import write_bytes_atomic

    write_bytes_atomic(RESULTS_MD, text.encode("utf-8"))


def main(argv=None) -> None:
    from longalign.demo.data import DEFAULT_VOCAB_SIZE, write_demo_data

    args = parse_args(argv)
    command = "python bench/bench_pretokenize.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    with tempfile.TemporaryDirectory(prefix="bench_pretokenize-") as tmp:
        raw = Path(tmp) / "raw"
        write_demo_data(raw, num_long=args.num_long, num_short=args.num_short)
        runs = [run_once(raw, Path(tmp) / "out", args) for _ in range(args.repeats)]
    last = runs[-1]
    result = {
        "pretokenize_tokens_per_s": statistics.median(r["tokens_per_s"] for r in runs),
        "tokenize_phase_tokens_per_s": statistics.median(r["tokenize_tokens_per_s"] for r in runs),
        "bytes_per_token": last["bytes_per_token"],
        "runs_tokens_per_s": [r["tokens_per_s"] for r in runs],
        "tokens": last["total"]["tokens"], "rows": last["total"]["kept"], "num_proc": args.num_proc,
        "family": args.family, "repeats": args.repeats, "vocab_size": DEFAULT_VOCAB_SIZE,
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs visible (shared)",
        "load_average_1min_after": os.getloadavg()[0],  # other jobs on the shared cores skew timings
    }
    if not args.no_write:
        from results import record  # bench/ is on sys.path when run as a script

        write_results_md(result, command)
        record({k: result[k] for k in ("pretokenize_tokens_per_s", "bytes_per_token")},
               source=command, machine=result["machine"])
    print(json.dumps(result))


if __name__ == "__main__":
    main()
