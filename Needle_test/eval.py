"""Stage 3: score every prediction 1-10, with the LLM judge or offline with --scorer match.

    python Needle_test/eval.py [--config Needle_test/config-eval.yaml] [--scorer judge|match]
        [--pred_file FILE] [--save_dir DIR] [--judge_base_url URL]

The judge uses longalign.judge (OPENAI_API_KEY, --judge_base_url or OPENAI_BASE_URL), cached in
<save_dir>/judge_cache.jsonl. Writes <save_dir>/results_<scorer>.json (per prediction) and
<save_dir>/summary_<scorer>.json.
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path


from needle import load_config, resolve
from scoring import judge_key, judge_messages, match_score
from longalign.storage import read_jsonl, write_json_atomic

DEFAULT_CONFIG = Path(__file__).resolve().parent / "config-eval.yaml"
SCORERS = ("judge", "match")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(DEFAULT_CONFIG))
    p.add_argument("--scorer", choices=SCORERS, default=None, help="overrides scorer")
    p.add_argument("--pred_file", default=None)
    p.add_argument("--save_dir", default=None)
    p.add_argument("--judge_base_url", default=None)
    return p.parse_args(argv)


def score_with_judge(config: dict, predictions: list[dict], save_dir: Path, base_url: str | None) -> dict:
    from longalign.judge import Judge, RetryPolicy

    judge_cfg = config.get("judge", {})
    model = judge_cfg.get("model_name", "gpt-4")
    judge = Judge(model=model, base_url=base_url or judge_cfg.get("base_url"),
                  cache_path=save_dir / "judge_cache.jsonl",
                  retry=RetryPolicy(backoff_s=float(judge_cfg.get("backoff_s", 1.0))))
    needle, question = config["prompt"]["needle"], config["prompt"]["retrieval_question"]
    by_key = {judge_key(p["id"], p["response"], model): p for p in predictions}
    jobs = [(key, judge_messages(needle, question, p["response"])) for key, p in by_key.items()]
    results = {}
    for j in judge.judge_many(jobs, int(judge_cfg.get("concurrency", 4))):
        results[by_key[j.key]["id"]] = {"score": j.rating, "judge_text": j.text, "tokens": j.tokens,
                                        "error": j.error}
    return results


def main(argv=None) -> dict:
    args = parse_args(argv)
    config = load_config(args.config)
    scorer = args.scorer or config.get("scorer", "judge")
    pred_file = Path(args.pred_file) if args.pred_file else resolve(config, config["pred_file"])
    save_dir = Path(args.save_dir) if args.save_dir else resolve(config, config["save_dir"])
    predictions = read_jsonl(pred_file)
    if not predictions:
        raise FileNotFoundError(f"no predictions in {pred_file}; run Needle_test/pred.py first")
    if scorer == "judge":
        scored = score_with_judge(config, predictions, save_dir, args.judge_base_url)
    else:
        facts = config.get("key_facts") or []
        scored = {}
        for p in predictions:
            score, found = match_score(p["response"], facts)
            scored[p["id"]] = {"score": score, "facts_found": found}
    results = {p["id"]: {"context_length": p["context_length"], "depth_percent": p["depth_percent"],
                         "prediction": p["response"], **scored[p["id"]]} for p in predictions}
    rated = [r["score"] for r in results.values() if r["score"] is not None]
    summary = {"scorer": scorer, "predictions": len(results), "scored": len(rated),
               "missing": len(results) - len(rated), "mean_score": statistics.fmean(rated) if rated else None,
               "judge_tokens": sum(r.get("tokens", 0) for r in results.values())}
    write_json_atomic(save_dir / f"results_{scorer}.json", results)
    write_json_atomic(save_dir / f"summary_{scorer}.json", summary)
    print(f"[eval] {summary}; wrote {save_dir / f'results_{scorer}.json'}")
    if summary["missing"]:
        print(f"[eval] WARNING: {summary['missing']} predictions without a rating; rerun to retry them")
    return summary


if __name__ == "__main__":
    try:
        main()
    except FileNotFoundError as err:  # bad input: the message says what to do
        sys.exit(f"[eval] ERROR: {err}")
