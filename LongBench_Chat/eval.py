"""LongBench-Chat: predict with a model, then score with an OpenAI-compatible judge (paper §3.4).

    python LongBench_Chat/eval.py --model {model_path} --max_length {max_length}
        [--stage predict|score|all] [--judge_model gpt-4] [--judge_base_url URL] [--runs 2]
        [--concurrency 4] [--data_dir data/longbench_chat] [--output_dir DIR]

The judge key comes from OPENAI_API_KEY, its endpoint from --judge_base_url or OPENAI_BASE_URL.
Outputs in --output_dir (default outputs/longbench_chat/<model name>):
  predictions.jsonl   one record per case, appended as each finishes (a rerun skips them)
  judge_cache.jsonl   rated judgements per (case, prediction hash, judge model, run)
  scores.json         per case: prediction, judge text, score and tokens of every run
  summary.json        mean 1-10 (all / English / Chinese), missing and token counts
  leaderboard.md      the markdown leaderboard row; predict_stats.json: what predict did
"""
from __future__ import annotations

import argparse
import logging
import re
import sys
from pathlib import Path


from lbc_data import load_data, write_bytes_atomic
from lbc_score import (LEADERBOARD_HEADER, case_record, judge_messages,
                                      judgement_key_for, leaderboard_row, summarize)
from longalign.storage import append_jsonl, read_jsonl, write_json_atomic

STAGES = ("predict", "score", "all")
PAPER_MAX_NEW_TOKENS = 1024
PAPER_TEMPERATURE = 1.0
PAPER_SEED = 42
PAPER_RUNS = 2
DEFAULT_DATA_DIR = "data/longbench_chat"
DEFAULT_OUTPUT_ROOT = "outputs/longbench_chat"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="local path or Hugging Face id of the chat model")
    p.add_argument("--max_length", type=int, default=64000, help="middle-truncate prompts longer than this")
    p.add_argument("--stage", choices=STAGES, default="all")
    p.add_argument("--family", choices=("chatglm", "llama", "chat_template"), default=None,
                   help="chat format (default: detected from the model name/config)")
    p.add_argument("--max_new_tokens", type=int, default=PAPER_MAX_NEW_TOKENS)
    p.add_argument("--temperature", type=float, default=PAPER_TEMPERATURE)
    p.add_argument("--seed", type=int, default=PAPER_SEED, help="reset before every case")
    p.add_argument("--dtype", default="auto", help="auto = bfloat16 on GPU, float32 on CPU")
    p.add_argument("--judge_model", default="gpt-4")
    p.add_argument("--judge_base_url", default=None, help="default: $OPENAI_BASE_URL, else api.openai.com")
    p.add_argument("--runs", type=int, default=PAPER_RUNS, help="judge runs averaged per case (paper: 2)")
    p.add_argument("--concurrency", type=int, default=4, help="parallel judge requests")
    p.add_argument("--judge_max_attempts", type=int, default=6)
    p.add_argument("--judge_backoff_s", type=float, default=1.0)
    p.add_argument("--data_dir", default=DEFAULT_DATA_DIR)
    p.add_argument("--output_dir", default=None)
    args = p.parse_args(argv)
    if args.runs < 1 or args.concurrency < 1 or args.max_length < 2:
        p.error("--runs and --concurrency must be >= 1 and --max_length >= 2")
    args.output_dir = Path(args.output_dir or Path(DEFAULT_OUTPUT_ROOT) / model_save_name(args.model))
    return args


def model_save_name(model: str) -> str:
    """A file-name-safe name for a model path or hub id."""
    return re.sub(r"[^A-Za-z0-9._-]+", "--", str(model).strip("/")) or "model"


def load_predictions(path: Path, valid_idx: set[int]) -> tuple[dict[int, dict], dict]:
    """Finished predictions by idx (first record wins) and counts of what was set aside."""
    done, counts = {}, {"duplicate_records": 0, "unknown_idx_records": 0}
    for record in read_jsonl(path):
        idx = record.get("idx")
        if idx not in valid_idx:
            counts["unknown_idx_records"] += 1
        elif idx in done:
            counts["duplicate_records"] += 1
        else:
            done[idx] = record
    return done, counts


def run_predict(args, data) -> dict:
    from longalign import generation
    from longalign.generation import GenerationSettings, load_model_and_tokenizer
    from longalign.storage import drop_torn_tail

    path = args.output_dir / "predictions.jsonl"
    torn = drop_torn_tail(path)
    done, counts = load_predictions(path, {c["idx"] for c in data.cases})
    todo = [case for case in data.cases if case["idx"] not in done]
    stats = {"cases": len(data.cases), "already_done": len(done), "predicted_now": 0, "truncated_now": 0,
             "torn_bytes_dropped": torn, **counts}
    print(f"[predict] {len(done)} of {len(data.cases)} cases already predicted in {path}; {len(todo)} to go")
    if todo:
        model, tokenizer, family = load_model_and_tokenizer(args.model, args.family, args.dtype)
        settings = GenerationSettings(args.max_new_tokens, args.temperature, args.seed, args.max_length)
        for case in todo:
            result = generation.generate_response(model, tokenizer, family, case["prompt"], settings)
            append_jsonl(path, {"idx": case["idx"], "model": args.model, "family": family,
                                "max_length": args.max_length, **result})
            stats["predicted_now"] += 1
            stats["truncated_now"] += int(result["truncated"])
            print(f"[predict] idx {case['idx']}: {result['query_tokens']} prompt tokens"
                  f"{' (middle-truncated)' if result['truncated'] else ''}", flush=True)
    write_json_atomic(args.output_dir / "predict_stats.json", stats)
    print(f"[predict] {stats}")
    return stats


def run_score(args, data) -> dict:
    from longalign.judge import Judge, RetryPolicy

    predictions, counts = load_predictions(args.output_dir / "predictions.jsonl", {c["idx"] for c in data.cases})
    cases = [case for case in data.cases if case["idx"] in predictions]
    if len(cases) < len(data.cases):
        print(f"[score] WARNING: {len(data.cases) - len(cases)} cases have no prediction; run --stage predict")
    judge = Judge(model=args.judge_model, base_url=args.judge_base_url,
                  cache_path=args.output_dir / "judge_cache.jsonl",
                  retry=RetryPolicy(max_attempts=args.judge_max_attempts, backoff_s=args.judge_backoff_s))
    keys, jobs = {}, []
    for case in cases:
        response = predictions[case["idx"]]["response"]
        for run in range(args.runs):
            key = judgement_key_for(case, response, args.judge_model, run)
            keys[(case["idx"], run)] = key
            jobs.append((key, judge_messages(data.template, case, data.shots_for(case), response, run)))
    results = {}
    for judgement in judge.judge_many(jobs, args.concurrency):
        results[judgement.key] = judgement
        if len(results) % 10 == 0 or len(results) == len(jobs):
            print(f"[score] {len(results)}/{len(jobs)} judgements", flush=True)
    records = [case_record(case, predictions[case["idx"]], [results[keys[(case["idx"], run)]]
                                                           for run in range(args.runs)]) for case in cases]
    summary = summarize(records, len(data.cases), args.runs, args.model, args.judge_model)
    summary["set_aside_prediction_records"] = counts
    write_outputs(args.output_dir, records, summary)
    return summary


def write_outputs(output_dir: Path, records: list[dict], summary: dict) -> None:
    write_json_atomic(output_dir / "scores.json", records)
    write_json_atomic(output_dir / "summary.json", summary)
    row = leaderboard_row(summary)
    write_bytes_atomic(output_dir / "leaderboard.md", f"{LEADERBOARD_HEADER}\n{row}\n".encode("utf-8"))
    for key, value in summary.items():
        print(f"[score] {key}: {value}")
    if summary["missing_judgements"]:
        print(f"[score] WARNING: {summary['missing_judgements']} judgements without a rating "
              f"(listed per run in scores.json); rerun to retry them")
    print(f"{LEADERBOARD_HEADER}\n{row}\n[score] wrote {output_dir}/scores.json, summary.json, leaderboard.md")


def main(argv=None) -> dict:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    data = load_data(args.data_dir)
    out = {}
    if args.stage in ("predict", "all"):
        out["predict"] = run_predict(args, data)
    if args.stage in ("score", "all"):
        out["score"] = run_score(args, data)
    return out


if __name__ == "__main__":
    try:
        main()
    except (FileNotFoundError, ValueError) as err:  # bad input: the message says what to do
        sys.exit(f"[longbench_chat] ERROR: {err}")
