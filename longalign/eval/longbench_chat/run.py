"""LongBench-Chat stages over one prediction log: predict the missing cases, then judge them.

Predictions live in `<output_dir>/predictions.jsonl` with their settings in
`predictions.jsonl.settings.json` (longalign.eval.prediction_keys): a rerun with any changed setting
is refused there, and the default output folder is named by the settings key, so it never is.
The summary is labelled from the stored settings, never from this run's flags alone.
"""
from __future__ import annotations

import hashlib
import re
from pathlib import Path

from longalign.eval.longbench_chat.data import TEMPLATE, LongBenchChatData
from longalign.eval.longbench_chat.score import (LEADERBOARD_HEADER, case_record, judge_messages, judgement_key_for,
                                      leaderboard_row, summarize)
from longalign.eval.candidates import predict_all
from longalign.eval.generation import Candidate, GenerationSettings
from longalign.eval.judge import Judge
from longalign.eval.prediction_keys import PredictionLog, prompt_sha256, settings_key
from longalign.storage import write_bytes_atomic, write_json_atomic

SUITE = "longbench_chat"
PREDICTIONS = "predictions.jsonl"
KEY_CHARS_IN_NAMES = 12
MAX_NAME_CHARS = 100  # well under the 255 bytes a file name may have
DEFAULT_NAME = "model"  # a name with nothing usable in it


def model_save_name(model: str) -> str:
    """One folder name for a model path, hub id or served model name: letters, digits, `.`, `_`, `-`
    only (path separators and anything else become `--`), never starting or ending with `.` or `-`
    (so never `.` or `..`), at most MAX_NAME_CHARS (a longer name keeps its start and a hash of the whole)."""
    name = re.sub(r"[^A-Za-z0-9._-]+", "--", str(model)).strip(".-") or DEFAULT_NAME
    if len(name) > MAX_NAME_CHARS:
        digest = hashlib.sha256(str(model).encode("utf-8")).hexdigest()[:KEY_CHARS_IN_NAMES]
        name = f"{name[:MAX_NAME_CHARS - len(digest) - 2].rstrip('.-')}--{digest}"
    return name


def prediction_settings(candidate: Candidate, settings: GenerationSettings) -> dict:
    return {"suite": SUITE, **candidate.settings_record(settings)}


def default_output_dir(root: str | Path, label: str, settings: dict) -> Path:
    """<root>/<model>/<first characters of the settings key>: one folder per settings."""
    return Path(root) / model_save_name(label) / settings_key(settings)[:KEY_CHARS_IN_NAMES]


def open_log(output_dir: Path, settings: dict) -> PredictionLog:
    return PredictionLog(output_dir / PREDICTIONS, settings, id_field="idx",
                         advice="use another --output_dir (the default one is named by the settings), or move "
                                f"{output_dir / PREDICTIONS} away yourself")


def prompt_hashes(data: LongBenchChatData) -> dict:
    return {case["idx"]: prompt_sha256(case["prompt"]) for case in data.cases}


def run_predict(candidate: Candidate, log: PredictionLog, settings: GenerationSettings, data: LongBenchChatData,
                cases: list[dict], concurrency: int) -> dict:
    """Predict the cases of `cases` that the log lacks; returns what was done (predict_stats.json)."""
    hashes = prompt_hashes(data)
    done, torn = log.load(hashes)
    todo = [(case["idx"], case["prompt"], hashes[case["idx"]]) for case in cases if case["idx"] not in done]
    print(f"[predict] {len(cases) - len(todo)} of {len(cases)} cases already predicted under settings "
          f"{log.key[:KEY_CHARS_IN_NAMES]} in {log.path}; {len(todo)} to go")
    stats = {"cases": len(cases), "already_done": len(cases) - len(todo), "torn_bytes_dropped": torn,
             "settings_key": log.key}
    stats.update(predict_all(candidate, log, todo, settings, concurrency))
    write_json_atomic(log.path.with_name("predict_stats.json"), stats)
    print(f"[predict] {stats}")
    if stats["failed"]:
        print(f"[predict] WARNING: {len(stats['failed'])} cases got no answer (listed in predict_stats.json); "
              "rerun to retry them")
    return stats


def judge_jobs(data: LongBenchChatData, cases: list[dict], predictions: dict, judge_model: str, runs: int):
    """(keys by (idx, run), jobs) for every predicted case of `cases` and every run."""
    keys, jobs = {}, []
    for case in cases:
        response = predictions[case["idx"]]["response"]
        for run in range(runs):
            messages = judge_messages(data.template, case, data.shots_for(case), response, run)
            keys[(case["idx"], run)] = key = judgement_key_for(case, messages, judge_model, run)
            jobs.append((key, messages))
    return keys, jobs


def load_predictions(log: PredictionLog, data: LongBenchChatData) -> dict:
    """The log's predictions by idx, checked (settings, prompts, duplicates) before any judging."""
    return log.load(prompt_hashes(data))[0]


def run_score(judge: Judge, log: PredictionLog, predictions: dict, data: LongBenchChatData, cases: list[dict],
              runs: int, concurrency: int, label: str, lang: str) -> dict:
    """Judge every predicted case of `cases` `runs` times; write scores, summary and leaderboard row."""
    predicted = [case for case in cases if case["idx"] in predictions]
    if len(predicted) < len(cases):
        print(f"[score] WARNING: {len(cases) - len(predicted)} cases have no prediction under these settings; "
              "run --stage predict")
    keys, jobs = judge_jobs(data, predicted, predictions, judge.model, runs)
    results = {}
    for judgement in judge.judge_many(jobs, concurrency):
        results[judgement.key] = judgement
        if len(results) % 10 == 0 or len(results) == len(jobs):
            print(f"[score] {len(results)}/{len(jobs)} judgements", flush=True)
    records = [case_record(case, predictions[case["idx"]], [results[keys[(case["idx"], run)]] for run in range(runs)])
               for case in predicted]
    files = data.provenance()
    summary = {"model": label, "lang": lang, "judge_model": judge.model, "judge_endpoint": judge.endpoint, "runs": runs,
               "judge_prompt_sha256": files[TEMPLATE]["sha256"], "judge_prompt_official": files[TEMPLATE]["official"],
               "data_files": files, "chat_format": log.settings["chat_format"]["name"],
               "prediction_settings_key": log.key, "prediction_settings": log.settings,
               **summarize(records, len(cases), runs)}
    write_outputs(log.path.parent, records, summary)
    return summary


def write_outputs(output_dir: Path, records: list[dict], summary: dict) -> None:
    write_json_atomic(output_dir / "scores.json", records)
    write_json_atomic(output_dir / "summary.json", summary)
    row = leaderboard_row(summary)
    write_bytes_atomic(output_dir / "leaderboard.md", f"{LEADERBOARD_HEADER}\n{row}\n".encode("utf-8"))
    for key in ("model", "lang", "judge_model", "runs", "judge_prompt_sha256", "mean_score", "mean_score_en",
                "mean_score_zh", "scored_cases", "cases", "missing_judgements", "unpredicted_cases", "judge_tokens"):
        print(f"[score] {key}: {summary[key]}")
    if summary["missing_judgements"]:
        print(f"[score] WARNING: {summary['missing_judgements']} judgements without a rating "
              f"(listed per run in scores.json); rerun to retry them")
    print(f"{LEADERBOARD_HEADER}\n{row}\n[score] wrote {output_dir}/scores.json, summary.json, leaderboard.md")
