"""LongBench-Chat scoring: the judge prompt, per-case records, summary and leaderboard row.

As the original script: the judge reads the prediction with its newlines turned into spaces
(the original stored one prediction per line), and the judge prompt is `prompt_fs.txt` filled
with the question, the reference and the 3 scored examples. The paper (App. C.1) shuffles the
order of the 3 examples in every judge run; the shuffle here is seeded by (idx, run), so a rerun
rebuilds the same prompt and hits the judge cache.
"""
from __future__ import annotations

import random
import statistics

from longalign.eval.judge import judgement_key, messages_hash

SYSTEM_PROMPT = "You're a good assistant at evaluating the quality of texts."
CJK_RANGES = ((0x4E00, 0x9FFF), (0x3400, 0x4DBF), (0xF900, 0xFAFF))
CHINESE_SHARE = 0.2  # a query whose letters are at least this share CJK ideographs is Chinese
SHUFFLE_SEED_STRIDE = 1000
LANGS = ("all", "en", "zh")


def detect_language(text: str) -> str:
    """'zh' if CJK ideographs make up at least CHINESE_SHARE of the letters of `text`, else 'en'."""
    letters = [ch for ch in text if ch.isalpha()]
    if not letters:
        return "en"
    cjk = sum(any(lo <= ord(ch) <= hi for lo, hi in CJK_RANGES) for ch in letters)
    return "zh" if cjk / len(letters) >= CHINESE_SHARE else "en"


def select_cases(cases: list[dict], lang: str) -> list[dict]:
    """The cases of `--lang` (language detected from the query)."""
    if lang not in LANGS:
        raise ValueError(f"--lang must be one of {LANGS}, got {lang!r}")
    return [case for case in cases if lang == "all" or detect_language(case["query"]) == lang]


def judge_messages(template: str, case: dict, shots: list[dict], prediction: str, run: int) -> list[dict]:
    """System + user messages for one judgement; the example order is shuffled per (idx, run)."""
    order = list(range(len(shots)))
    random.Random(case["idx"] * SHUFFLE_SEED_STRIDE + run).shuffle(order)
    slots = []
    for k in order:
        slots += [shots[k]["answer"], shots[k]["score"]]
    user = template.format(case["query"], case["answer"], *slots, prediction.replace("\n", " "))
    return [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": user}]


def judgement_key_for(case: dict, messages: list[dict], judge_model: str, run: int) -> str:
    """Cache key of one judgement: the exact messages (prompt file, examples, prediction), judge, run."""
    return judgement_key("longbench_chat", case["idx"], messages_hash(messages), judge_model, run)


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


def summarize(records: list[dict], num_cases: int, runs: int) -> dict:
    """Mean 1-10 over cases (each case = mean of its rated runs), by language, with counts."""
    scored = [r for r in records if r["score"] is not None]
    by_lang = {lang: [r["score"] for r in scored if r["language"] == lang] for lang in ("en", "zh")}
    per_run = [[run["score"] for r in records for run in r["runs"][i:i + 1] if run["score"] is not None]
               for i in range(runs)]
    return {
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


LEADERBOARD_HEADER = ("| Model | LongBench-Chat (1-10) | English | Chinese | Cases | Scored / cases | "
                      "Missing judgements | Judge | Runs | Judge prompt | Chat format | Predictions |\n"
                      "|---|---|---|---|---|---|---|---|---|---|---|---|")


def leaderboard_row(summary: dict) -> str:
    """The row states what makes the figure comparable: subset, judge, runs, prompt file, settings."""
    def fmt(value):
        return "–" if value is None else f"{value:.2f}"

    official = {True: "official", False: "NOT official", None: "unverified"}[summary["judge_prompt_official"]]
    return (f"| {summary['model']} | {fmt(summary['mean_score'])} | {fmt(summary['mean_score_en'])} | "
            f"{fmt(summary['mean_score_zh'])} | {summary['lang']} | {summary['scored_cases']} / {summary['cases']} | "
            f"{summary['missing_judgements']} | {summary['judge_model']} | {summary['runs']} | "
            f"{summary['judge_prompt_sha256'][:12]} ({official}) | {summary['chat_format']} | "
            f"{summary['prediction_settings_key'][:12]} |")
