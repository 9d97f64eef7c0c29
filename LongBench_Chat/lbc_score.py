"""LongBench-Chat scoring: the judge prompt, per-case records, summary and leaderboard row.

The paper (App. C.1) shuffles the order of the 3 scored examples in every judge run; the shuffle
here is seeded by (idx, run), so a rerun rebuilds the same prompt and hits the judge cache.
"""
from __future__ import annotations

import random
import statistics

from longalign.judge import judgement_key, text_hash

SYSTEM_PROMPT = "You're a good assistant at evaluating the quality of texts."
CJK_RANGES = ((0x4E00, 0x9FFF), (0x3400, 0x4DBF), (0xF900, 0xFAFF))
CHINESE_SHARE = 0.2  # a query whose letters are at least this share CJK ideographs is Chinese
SHUFFLE_SEED_STRIDE = 1000


def detect_language(text: str) -> str:
    """'zh' if CJK ideographs make up at least CHINESE_SHARE of the letters of `text`, else 'en'."""
    letters = [ch for ch in text if ch.isalpha()]
    if not letters:
        return "en"
    cjk = sum(any(lo <= ord(ch) <= hi for lo, hi in CJK_RANGES) for ch in letters)
    return "zh" if cjk / len(letters) >= CHINESE_SHARE else "en"


def judge_messages(template: str, case: dict, shots: list[dict], prediction: str, run: int) -> list[dict]:
    """System + user messages for one judgement; the example order is shuffled per (idx, run)."""
    order = list(range(len(shots)))
    random.Random(case["idx"] * SHUFFLE_SEED_STRIDE + run).shuffle(order)
    slots = []
    for k in order:
        slots += [shots[k]["answer"], shots[k]["score"]]
    user = template.format(case["query"], case["answer"], *slots, prediction)
    return [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": user}]


def judgement_key_for(case: dict, prediction: str, judge_model: str, run: int) -> str:
    return judgement_key("longbench_chat", case["idx"], text_hash(prediction), judge_model, run)


def case_record(case: dict, prediction: dict, judgements: list) -> dict:
    """Per-case output: the prediction, every run's judge text/score/tokens and the case mean."""
    runs = [{"run": run, "score": j.rating, "judge_text": j.text, "tokens": j.tokens,
             "attempts": j.attempts, "error": j.error, "cached": j.cached}
            for run, j in enumerate(judgements)]
    rated = [r["score"] for r in runs if r["score"] is not None]
    return {"idx": case["idx"], "language": detect_language(case["query"]), "query": case["query"],
            "prediction": prediction["response"], "truncated": prediction.get("truncated"),
            "score": statistics.fmean(rated) if rated else None, "runs": runs,
            "missing_runs": len(runs) - len(rated), "tokens": sum(r["tokens"] for r in runs)}


def _mean(values):
    return round(statistics.fmean(values), 4) if values else None


def summarize(records: list[dict], num_cases: int, runs: int, model: str, judge_model: str) -> dict:
    """Mean 1-10 over cases (each case = mean of its rated runs), by language, with counts."""
    scored = [r for r in records if r["score"] is not None]
    by_lang = {lang: [r["score"] for r in scored if r["language"] == lang] for lang in ("en", "zh")}
    per_run = [[run["score"] for r in records for run in r["runs"][i:i + 1] if run["score"] is not None]
               for i in range(runs)]
    return {
        "model": model, "judge_model": judge_model, "runs": runs,
        "cases": num_cases, "predicted": len(records), "scored_cases": len(scored),
        "mean_score": _mean([r["score"] for r in scored]),
        "mean_score_en": _mean(by_lang["en"]), "mean_score_zh": _mean(by_lang["zh"]),
        "cases_en": sum(r["language"] == "en" for r in records),
        "cases_zh": sum(r["language"] == "zh" for r in records),
        "mean_score_per_run": [_mean(scores) for scores in per_run],
        "missing_judgements": sum(r["missing_runs"] for r in records),
        "missing_cases": len(records) - len(scored),
        "unpredicted_cases": num_cases - len(records),
        "judge_tokens": sum(r["tokens"] for r in records),
    }


LEADERBOARD_HEADER = ("| Model | LongBench-Chat (1-10) | English | Chinese | Scored / cases | Missing judgements |\n"
                      "|---|---|---|---|---|---|")


def leaderboard_row(summary: dict) -> str:
    def fmt(value):
        return "–" if value is None else f"{value:.2f}"

    return (f"| {summary['model']} | {fmt(summary['mean_score'])} | {fmt(summary['mean_score_en'])} | "
            f"{fmt(summary['mean_score_zh'])} | {summary['scored_cases']} / {summary['cases']} | "
            f"{summary['missing_judgements']} |")
