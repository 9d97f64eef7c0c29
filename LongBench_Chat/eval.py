"""LongBench-Chat: predict with a model, then score with an OpenAI-compatible judge (paper §3.4).

    python LongBench_Chat/eval.py --model PATH_OR_HUB_ID --max_length 64000 [--trust_remote_code]
    python LongBench_Chat/eval.py --model_base_url http://localhost:8000/v1 --model_name NAME \\
        [--model_api chat|completions] [--tokenizer PATH] --max_length 64000
      [--stage predict|score|all] [--lang all|en|zh] [--chat_format auto|chatglm|llama|chat_template]
      [--judge_model gpt-4] [--judge_base_url URL] [--runs 2] [--concurrency 4] [--judge_timeout_s 120]
      [--data_dir data/longbench_chat] [--output_dir DIR]

The judge key comes from OPENAI_API_KEY, its endpoint from --judge_base_url or OPENAI_BASE_URL;
a served candidate's key from MODEL_API_KEY. Outputs in --output_dir (default
outputs/longbench_chat/<model>/<settings key>), see LongBench_Chat/README.md:
  predictions.jsonl (+ .settings.json)  one record per case, keyed by everything that made it
  predict_stats.json  what predict did; judge_cache.jsonl  rated judgements
  scores.json, summary.json, leaderboard.md
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path


from longalign.eval.longbench_chat.data import OFFICIAL_NUM_CASES, load_data
from longalign.eval.longbench_chat.run import (default_output_dir, load_predictions, open_log, prediction_settings,
                                    run_predict, run_score)
from longalign.eval.longbench_chat.score import LANGS, select_cases
from longalign.eval.candidates import add_candidate_arguments, candidate_options, open_candidate
from longalign.eval.generation import GenerationSettings, default_top_p
from longalign.eval.judge import DEFAULT_TIMEOUT_S, Judge, JudgeConfigError, RetryPolicy
from longalign.eval.openai_api import AuthenticationFailed

STAGES = ("predict", "score", "all")
PAPER_MAX_NEW_TOKENS = 1024
PAPER_TEMPERATURE = 1.0
PAPER_SEED = 42
PAPER_RUNS = 2
DEFAULT_DATA_DIR = "data/longbench_chat"
DEFAULT_OUTPUT_ROOT = "outputs/longbench_chat"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_candidate_arguments(p)
    p.add_argument("--max_length", type=int, default=64000, help="middle-truncate prompts longer than this")
    p.add_argument("--stage", choices=STAGES, default="all")
    p.add_argument("--lang", choices=LANGS, default="all", help="the cases of one language only")
    p.add_argument("--max_new_tokens", type=int, default=PAPER_MAX_NEW_TOKENS)
    p.add_argument("--temperature", type=float, default=PAPER_TEMPERATURE)
    p.add_argument("--top_p", type=float, default=None, help="default: 0.8 for chatglm, else the model's own")
    p.add_argument("--seed", type=int, default=PAPER_SEED, help="reset before every case")
    p.add_argument("--judge_model", default="gpt-4")
    p.add_argument("--judge_base_url", default=None, help="default: $OPENAI_BASE_URL, else api.openai.com")
    p.add_argument("--runs", type=int, default=PAPER_RUNS, help="judge runs averaged per case (paper: 2)")
    p.add_argument("--concurrency", type=int, default=4, help="parallel judge requests")
    p.add_argument("--judge_max_attempts", type=int, default=RetryPolicy.max_attempts)
    p.add_argument("--judge_backoff_s", type=float, default=RetryPolicy.backoff_s)
    p.add_argument("--judge_max_backoff_s", type=float, default=RetryPolicy.max_backoff_s,
                   help="no wait between attempts is longer (a server's Retry-After included)")
    p.add_argument("--judge_timeout_s", type=float, default=DEFAULT_TIMEOUT_S, help="per judge request")
    p.add_argument("--data_dir", default=DEFAULT_DATA_DIR, help="the release's three files (a copy works offline)")
    p.add_argument("--expected_cases", type=int, default=OFFICIAL_NUM_CASES,
                   help="cases test_cases.json must hold (the official release: 50)")
    p.add_argument("--output_dir", default=None)
    args = p.parse_args(argv)
    if args.runs < 1 or args.concurrency < 1 or args.max_length < 2 or args.judge_timeout_s <= 0:
        p.error("--runs and --concurrency must be >= 1, --max_length >= 2, --judge_timeout_s > 0")
    return args


def main(argv=None) -> dict:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    data = load_data(args.data_dir, args.expected_cases)
    cases = select_cases(data.cases, args.lang)
    options = candidate_options(args)
    candidate = open_candidate(options)
    top_p = args.top_p if args.top_p is not None else default_top_p(candidate.chat_format)
    generation = GenerationSettings(args.max_new_tokens, args.temperature, args.seed, args.max_length, top_p)
    settings = prediction_settings(candidate, generation)
    output_dir = Path(args.output_dir) if args.output_dir else default_output_dir(DEFAULT_OUTPUT_ROOT,
                                                                                   options.label, settings)
    log = open_log(output_dir, settings)
    log.check_settings()  # refuse before any work
    print(f"[longbench_chat] {options.label}: chat format {candidate.chat_format.name} "
          f"({candidate.chat_format.reason}); {len(cases)} cases (--lang {args.lang}); output {output_dir}")
    out = {}
    if args.stage in ("predict", "all"):
        out["predict"] = run_predict(candidate, log, generation, data, cases, options.model_concurrency)
    if args.stage in ("score", "all"):
        predictions = load_predictions(log, data)
        judge = Judge(model=args.judge_model, base_url=args.judge_base_url, cache_path=output_dir / "judge_cache.jsonl",
                      retry=RetryPolicy(max_attempts=args.judge_max_attempts, backoff_s=args.judge_backoff_s,
                                        max_backoff_s=args.judge_max_backoff_s),
                      timeout_s=args.judge_timeout_s)
        out["score"] = run_score(judge, log, predictions, data, cases, args.runs, args.concurrency,
                                 options.label, args.lang)
    return out


if __name__ == "__main__":
    try:
        main()
    except (FileNotFoundError, ValueError, JudgeConfigError, AuthenticationFailed) as err:
        # bad input, refused settings (PredictionMismatch), remote code (RemoteCodeRequired), a refused key
        sys.exit(f"[longbench_chat] ERROR: {err}")
