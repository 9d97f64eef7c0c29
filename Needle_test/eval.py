"""Stage 3: score every prediction 1-10, with the LLM judge or offline with --scorer match.

    python Needle_test/eval.py [--config Needle_test/config-eval.yaml] [--scorer judge|match]
        [--pred_file FILE] [--save_dir DIR] [--judge_base_url URL] [--judge_timeout_s S] [--prompt_dir DIR]

The judge uses longalign.eval.judge (OPENAI_API_KEY, --judge_base_url or OPENAI_BASE_URL), cached in
<save_dir>/judge_cache.jsonl. Predictions are read with the settings pred.py stored beside them
(duplicate ids or records of other settings are refused) and scored against the needle and question
recorded there, never a copy in the config (a `prompt:` section naming others is refused; key_facts
must occur in that needle); --prompt_dir only for predictions of an older pred.py. Writes <save_dir>/results_<scorer>.json
(per prediction) and <save_dir>/summary_<scorer>.json (model and prediction settings, judge model,
judge prompt hash, runs, missing count).
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path


from longalign.eval.needle_test.config import EVAL_SCHEMA, SCORERS, load_config, resolve
from longalign.eval.needle_test.scoring import (JUDGE_PROMPT_SHA256, JUDGE_RUNS, check_config_needle, check_key_facts,
                                           judge_key, judge_messages, match_score, recorded_needle)
from longalign.eval.judge import DEFAULT_TIMEOUT_S, Judge, JudgeConfigError, RetryPolicy
from longalign.eval.openai_api import AuthenticationFailed
from longalign.eval.prediction_keys import open_stored_log
from longalign.storage import write_json_atomic

DEFAULT_CONFIG = Path(__file__).resolve().parent / "config-eval.yaml"
DEFAULT_JUDGE_CONCURRENCY = 4


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(DEFAULT_CONFIG))
    p.add_argument("--scorer", choices=SCORERS, default=None, help="overrides scorer")
    p.add_argument("--pred_file", default=None)
    p.add_argument("--save_dir", default=None)
    p.add_argument("--prompt_dir", default=None,
                   help="only for predictions of an older pred.py, which did not record the needle: the "
                        "prompt set they were made from (its manifest must match their prompt_set_sha256)")
    p.add_argument("--judge_base_url", default=None)
    p.add_argument("--judge_timeout_s", type=float, default=None, help=f"per request (default {DEFAULT_TIMEOUT_S:g})")
    p.add_argument("--judge_max_attempts", type=int, default=None)
    p.add_argument("--judge_max_backoff_s", type=float, default=None, help="cap on every wait, Retry-After included")
    return p.parse_args(argv)


def make_judge(config: dict, args, save_dir: Path) -> Judge:
    judge_cfg = config.get("judge", {})

    def pick(flag, key, default):
        return flag if flag is not None else judge_cfg.get(key, default)

    retry = RetryPolicy(max_attempts=int(pick(args.judge_max_attempts, "max_attempts", RetryPolicy.max_attempts)),
                        backoff_s=float(judge_cfg.get("backoff_s", RetryPolicy.backoff_s)),
                        max_backoff_s=float(pick(args.judge_max_backoff_s, "max_backoff_s", RetryPolicy.max_backoff_s)))
    return Judge(model=judge_cfg.get("model_name", "gpt-4"), base_url=args.judge_base_url or judge_cfg.get("base_url"),
                 cache_path=save_dir / "judge_cache.jsonl", retry=retry,
                 timeout_s=float(pick(args.judge_timeout_s, "timeout_s", DEFAULT_TIMEOUT_S)))


def score_with_judge(judge: Judge, config: dict, predictions: list[dict], reference: dict) -> dict:
    jobs, ids = [], {}
    for p in predictions:
        question = config.get("judge", {}).get("question") or reference["retrieval_question"]
        messages = judge_messages(reference["needle"], question, p["response"])
        key = judge_key(p["id"], messages, judge.model)
        ids[key] = p["id"]
        jobs.append((key, messages))
    results = {}
    concurrency = int(config.get("judge", {}).get("concurrency", DEFAULT_JUDGE_CONCURRENCY))
    for j in judge.judge_many(jobs, concurrency):
        results[ids[j.key]] = {"score": j.rating, "judge_text": j.text, "tokens": j.tokens, "error": j.error}
    return results


def summarize(scorer: str, results: dict, settings: dict, judge: Judge | None, config: dict, reference: dict) -> dict:
    rated = [r["score"] for r in results.values() if r["score"] is not None]
    return {"scorer": scorer, "model": settings["candidate"].get("model") or settings["candidate"].get("model_name"),
            "chat_format": settings["chat_format"]["name"], "prompt_set_sha256": settings.get("prompt_set_sha256"),
            "needle": reference["needle"], "retrieval_question": reference["retrieval_question"],
            "judge_model": judge.model if judge else None, "judge_endpoint": judge.endpoint if judge else None,
            "judge_prompt_sha256": JUDGE_PROMPT_SHA256 if judge else None,
            "key_facts": None if judge else config.get("key_facts"),
            "runs": JUDGE_RUNS, "predictions": len(results), "scored": len(rated), "missing": len(results) - len(rated),
            "mean_score": statistics.fmean(rated) if rated else None,
            "judge_tokens": sum(r.get("tokens", 0) for r in results.values()), "prediction_settings": settings}


def main(argv=None) -> dict:
    args = parse_args(argv)
    given = {"pred_file": args.pred_file, "save_dir": args.save_dir}
    config = load_config(args.config, EVAL_SCHEMA, provided={key for key, value in given.items() if value})
    scorer = args.scorer or config.get("scorer", "judge")
    pred_file = Path(args.pred_file) if args.pred_file else resolve(config, config["pred_file"])
    save_dir = Path(args.save_dir) if args.save_dir else resolve(config, config["save_dir"])
    if not pred_file.is_file():
        raise FileNotFoundError(f"no predictions in {pred_file}; run Needle_test/pred.py first")
    log = open_stored_log(pred_file, "id", advice="run Needle_test/pred.py into a fresh save_file")
    by_id, _ = log.load(None, repair=False)
    predictions = [by_id[i] for i in sorted(by_id)]
    if not predictions:
        raise FileNotFoundError(f"no predictions in {pred_file}; run Needle_test/pred.py first")
    reference = recorded_needle(log.settings, pred_file, Path(args.prompt_dir) if args.prompt_dir else None)
    check_config_needle(config.get("prompt") or {}, args.config, reference, pred_file)
    judge = make_judge(config, args, save_dir) if scorer == "judge" else None
    if judge is not None:
        scored = score_with_judge(judge, config, predictions, reference)
    else:
        facts = check_key_facts(config.get("key_facts") or [], reference["needle"], f"{args.config}: key_facts")
        scored = {p["id"]: dict(zip(("score", "facts_found"), match_score(p["response"], facts))) for p in predictions}
    results = {p["id"]: {"context_length": p["context_length"], "depth_percent": p["depth_percent"],
                         "prediction": p["response"], **scored[p["id"]]} for p in predictions}
    summary = summarize(scorer, results, log.settings, judge, config, reference)
    write_json_atomic(save_dir / f"results_{scorer}.json", results)
    write_json_atomic(save_dir / f"summary_{scorer}.json", summary)
    print(f"[eval] {({k: v for k, v in summary.items() if k != 'prediction_settings'})}; "
          f"wrote {save_dir / f'results_{scorer}.json'}")
    if summary["missing"]:
        print(f"[eval] WARNING: {summary['missing']} predictions without a rating; rerun to retry them")
    return summary


if __name__ == "__main__":
    try:
        main()
    except (FileNotFoundError, ValueError, JudgeConfigError, AuthenticationFailed) as err:
        sys.exit(f"[eval] ERROR: {err}")  # bad input, refused predictions, a refused key: the message says what to do
