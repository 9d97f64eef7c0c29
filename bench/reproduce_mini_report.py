"""bench/reproduce_mini.py's plan, verdicts and tables: pure functions of the data and the run records.

    python bench/reproduce_mini_report.py A.json B.json [--out merged.json]   # one table from several reports

A run record has `seed`, `data` (`0k`, `half`, `full`), `method` (`naive`, `sort`, `pack`,
`pack_weighted`) and its measures. An *arm* names one (data, method) pair (`ARMS`); the full-data
pack_weighted run is both arm `full` (data quantity) and arm `pack_weighted` (training methods).
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys

import numpy as np

ARMS = {"0k": ("0k", "pack_weighted"), "half": ("half", "pack_weighted"), "full": ("full", "pack_weighted"),
        "naive": ("full", "naive"), "sort": ("full", "sort"), "pack": ("full", "pack"),
        "pack_weighted": ("full", "pack_weighted")}
EXPERIMENTS = {"quantity": ("0k", "half", "full"), "methods": ("naive", "sort", "pack", "pack_weighted")}
HEADLINE_METRIC = "long_accuracy"
HEADLINE_KEY = "mini_long_task_exact_match_{arm}"  # bench/results.json's keys, one per arm
METRICS = ("train_seconds", "train_tokens", "optimizer_steps", "long_accuracy", "long_loss",
           "unseen_kind_accuracy", "needle_accuracy", "short_loss", "short_accuracy")

# ChatGLM3-6B-64k. Table 2 (data quantity: LongAlign-0k / 5k / 10k + ShareGPT; 0k -> `0k`, 5k -> `half`,
# 10k -> `full`) and Table 3 with its training-time figure (8 x A800); MT-Bench is the short-task score.
PAPER = {"quantity": {"longbench_chat": {"0k": 3.73, "half": 5.97, "full": 6.21},
                      "mt_bench": {"0k": 5.34, "half": 5.51, "full": 5.5}},
         "methods": {"hours": {"naive": 45.4, "sort": 19.1, "pack": 20.5, "pack_weighted": 20.5},
                     "longbench_chat": {"naive": 5.87, "sort": 5.4, "pack": 5.76, "pack_weighted": 6.21},
                     "mt_bench": {"naive": 5.61, "sort": 5.76, "pack": 5.64, "pack_weighted": 5.5}}}
# (name, ours better is, metric, arm a, arm b, what the paper found)
QUANTITY_DIRECTIONS = (
    ("long data lifts long tasks (all vs none)", "higher", "long_accuracy", "full", "0k",
     "LongBench-Chat 3.73 -> 6.21, LongAlign-0k -> 10k"),
    ("half the long data lifts long tasks", "higher", "long_accuracy", "half", "0k",
     "LongBench-Chat 3.73 -> 5.97, LongAlign-0k -> 5k"),
    ("more long data lifts long tasks further", "higher", "long_accuracy", "full", "half",
     "LongBench-Chat 5.97 -> 6.21, LongAlign-5k -> 10k"),
    ("long data lifts the needle test", "higher", "needle_accuracy", "full", "0k",
     "Fig. 4: more long data, fewer needle retrieval errors"))
METHOD_DIRECTIONS = (
    ("sorted batching trains faster than naive", "lower", "train_seconds", "sort", "naive",
     "45.4 h -> 19.1 h, 2.4x"),
    ("packing trains faster than naive", "lower", "train_seconds", "pack_weighted", "naive",
     "45.4 h -> 20.5 h, 2.2x"),
    ("loss weighting improves long tasks over plain packing", "higher", "long_accuracy", "pack_weighted", "pack",
     "LongBench-Chat 5.76 -> 6.21"),
    ("loss weighting lowers the long-task answer loss of plain packing", "lower", "long_loss", "pack_weighted",
     "pack", "LongBench-Chat 5.76 -> 6.21"))
DIRECTIONS = QUANTITY_DIRECTIONS + METHOD_DIRECTIONS
SHORT_LEVEL_TOLERANCE = 0.10  # "level": every seed's short-task loss within 10% (relative) of the 0k run's
# (name, metric, arm a, arm b, tolerance, what the paper found)
LEVELS = (("short-task quality stays level with all the long data", "short_loss", "full", "0k",
           SHORT_LEVEL_TOLERANCE, "MT-Bench 5.34 -> 5.50, LongAlign-0k -> 10k: comparable"),
          ("short-task quality stays level with half the long data", "short_loss", "half", "0k",
           SHORT_LEVEL_TOLERANCE, "MT-Bench 5.34 -> 5.51, LongAlign-0k -> 5k: comparable"))


def planned_run(data: str, method: str, lengths: np.ndarray, grouping: dict, batch: int, grad_accum: int,
                epochs: float) -> dict:
    """About how many optimizer steps and tokens one run takes: real tokens, and processed tokens
    (padding included: naive's simulated on one shuffle of `lengths`, sort's from the sort
    output's padding fraction; packs are not padded)."""
    real = int(lengths.sum())
    if method == "naive":
        order = np.random.default_rng(0).permutation(len(lengths))
        batches = [lengths[order[i:i + batch]] for i in range(0, len(order), batch)]
        micro, accum, processed = len(batches), grad_accum, sum(len(b) * int(b.max()) for b in batches)
    elif method == "sort":
        micro, accum, processed = grouping["rows"] // batch, grad_accum, real / (1 - grouping["sort_padding_fraction"])
    else:
        micro, accum, processed = grouping["packs"], grouping["pack_grad_accum"], real
    return {"data": data, "method": method, "optimizer_steps": math.ceil(epochs * max(1, micro // accum)),
            "train_tokens": round(epochs * real), "processed_tokens": round(epochs * processed)}


def plan_lines(plan: list[dict], seeds: int) -> list[str]:
    lines = [f"[reproduce_mini] plan per seed: {r['data']}/{r['method']}: ~{r['optimizer_steps']} steps, "
             f"{r['train_tokens']:,} tokens ({r['processed_tokens']:,} processed)" for r in plan]
    total = sum(r["processed_tokens"] for r in plan) * seeds
    return lines + [f"[reproduce_mini] plan: {total:,} processed tokens over {seeds} seeds"]


def mean_sd(values: list[float]) -> dict:
    return {"mean": statistics.fmean(values), "sd": statistics.stdev(values) if len(values) > 1 else 0.0,
            "n": len(values)}


def arm_values(runs: list[dict], metric: str, a: str, b: str) -> list[tuple[float, float]]:
    """(arm a's, arm b's) `metric` for every seed that ran both arms and measured it."""
    by_seed: dict[int, dict] = {}
    for run in runs:
        for arm, key in ARMS.items():
            if (run["data"], run["method"]) == key:
                by_seed.setdefault(run["seed"], {})[arm] = run.get(metric)
    return [(v[a], v[b]) for _, v in sorted(by_seed.items()) if v.get(a) is not None and v.get(b) is not None]


def direction(runs: list[dict], name: str, better: str, metric: str, a: str, b: str, paper: str) -> dict:
    """Whether arm `a` beats arm `b` on `metric` in every seed that ran both (the paper's direction).

    Verdicts: "reproduced" (a better in every seed), "not reproduced" (a worse in some seed and
    better in none), "tie" (equal in every seed: the metric cannot tell them apart, e.g. both 0),
    "mixed", "not measured" (no seed ran both, or the runs predate the metric).
    """
    sign = -1.0 if better == "lower" else 1.0
    gains = [sign * (va - vb) for va, vb in arm_values(runs, metric, a, b)]
    if not gains:
        verdict = "not measured"
    elif all(g > 0 for g in gains):
        verdict = "reproduced"
    elif all(g == 0 for g in gains):
        verdict = "tie"
    elif all(g <= 0 for g in gains):
        verdict = "not reproduced"
    else:
        verdict = "mixed"
    return {"direction": name, "paper": paper, "metric": metric, "a": a, "b": b, "better": better,
            "seeds_in_direction": sum(g > 0 for g in gains), "seeds": len(gains),
            "gain": mean_sd(gains) if gains else None, "verdict": verdict}


def relative_change(value: float, reference: float) -> float:
    if reference == 0:
        return 0.0 if value == 0 else math.inf
    return (value - reference) / abs(reference)


def level(runs: list[dict], name: str, metric: str, a: str, b: str, tolerance: float, paper: str) -> dict:
    """Whether arm `a`'s `metric` stays within `tolerance` (relative) of arm `b`'s in every seed.

    Verdicts: "level" (every seed within), "not level" (some seed outside; `change` says which
    way), "not measured" (no seed ran both).
    """
    changes = [relative_change(va, vb) for va, vb in arm_values(runs, metric, a, b)]
    verdict = ("not measured" if not changes else
               "level" if all(abs(c) <= tolerance for c in changes) else "not level")
    return {"level": name, "paper": paper, "metric": metric, "a": a, "b": b, "tolerance": tolerance,
            "seeds_within": sum(abs(c) <= tolerance for c in changes), "seeds": len(changes),
            "change": mean_sd(changes) if changes else None, "verdict": verdict}


def summarize(runs: list[dict]) -> dict:
    """Mean +- sd of every measure per arm that ran, the verdicts, and the headline figures."""
    arms = {}
    for arm, key in ARMS.items():
        mine = [r for r in runs if (r["data"], r["method"]) == key]
        if mine:
            arms[arm] = {m: mean_sd([r[m] for r in mine]) for m in METRICS if all(r.get(m) is not None for r in mine)}
    headline = {HEADLINE_KEY.format(arm=arm): s[HEADLINE_METRIC]["mean"] for arm, s in arms.items()
                if HEADLINE_METRIC in s}
    speedups = {arm: mean_sd([naive / mine for mine, naive in pairs])
                for arm in EXPERIMENTS["methods"] if (pairs := arm_values(runs, "train_seconds", arm, "naive"))}
    return {"arms": arms, "directions": [direction(runs, *d) for d in DIRECTIONS],
            "levels": [level(runs, *spec) for spec in LEVELS], "speedup_vs_naive": speedups, "headline": headline}


def _cell(stat: dict | None, fmt: str) -> str:
    return f"{stat['mean']:{fmt}} ± {stat['sd']:{fmt}}" if stat else "—"


def _measured_cells(s: dict) -> str:
    return " | ".join(_cell(s.get(metric), fmt) for metric, fmt in (
        ("train_seconds", ".1f"), ("train_tokens", ",.0f"), ("long_accuracy", ".3f"), ("unseen_kind_accuracy", ".3f"),
        ("needle_accuracy", ".3f"), ("long_loss", ".3f"), ("short_loss", ".3f"), ("short_accuracy", ".3f")))


MEASURED_HEADER = ("train s | tokens trained | long-task exact match | unseen-kind exact match | needle exact match | "
                   "long-task answer loss | short-task loss | short-task exact match")


def markdown(summary: dict) -> str:
    """Two tables (data quantity, training methods) with the paper's figures beside ours, each
    followed by its verdict lines."""
    lines = []
    for experiment, paper_columns in (("quantity", ("longbench_chat", "mt_bench")),
                                      ("methods", ("hours", "longbench_chat", "mt_bench"))):
        arms = [a for a in EXPERIMENTS[experiment] if a in summary["arms"]]
        if not arms:
            continue
        first = "long data" if experiment == "quantity" else "method"
        paper = PAPER[experiment]
        lines += [f"| {first} | {MEASURED_HEADER} | " + " | ".join(f"paper: {c}" for c in paper_columns) + " |",
                  "|---" * (9 + len(paper_columns)) + "|"]
        lines += [f"| {arm} | {_measured_cells(summary['arms'][arm])} | "
                  + " | ".join(str(paper[c][arm]) for c in paper_columns) + " |" for arm in arms]
        lines.append("")
        for d in summary["directions"]:
            if d["a"] in arms and d["b"] in arms:
                gain = f"{_cell(d['gain'], '.3f')} {d['metric']}" if d["gain"] else "no runs"
                if d["metric"] == "train_seconds" and d["b"] == "naive" and d["a"] in summary["speedup_vs_naive"]:
                    gain += f" (speed-up {_cell(summary['speedup_vs_naive'][d['a']], '.2f')}x)"
                lines.append(f"- {d['direction']} (paper: {d['paper']}): **{d['verdict']}** — {d['a']} vs "
                             f"{d['b']}, {d['seeds_in_direction']}/{d['seeds']} seeds in the paper's direction, "
                             f"gain {gain}")
        for v in summary["levels"]:
            if v["a"] in arms and v["b"] in arms:
                c = v["change"]
                change = f"{c['mean']:+.1%} ± {c['sd']:.1%} {v['metric']}" if c else "no runs"
                lines.append(f"- {v['level']} (paper: {v['paper']}): **{v['verdict']}** — {v['a']} vs {v['b']}, "
                             f"{v['seeds_within']}/{v['seeds']} seeds within ±{v['tolerance']:.0%}, change {change}")
        lines.append("")
    return "\n".join(lines)


def merge_runs(reports: list[dict]) -> list[dict]:
    """The runs of several reports (e.g. seeds or experiments split over processes) as one list;
    a later report's run replaces an earlier one of the same (seed, data, method), so list last
    the report whose timings belong beside naive's (the methods process):
        [A: (0, full, pack_weighted) 42 s], [B: (0, full, pack_weighted) 40 s, (0, full, naive)] -> B's two
    """
    merged = {}
    for report in reports:
        for run in report["runs"]:
            merged[(run["seed"], run["data"], run["method"])] = run
    return list(merged.values())


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description="Merge reproduce_mini.py reports into one summary and tables.")
    parser.add_argument("reports", nargs="+", help="JSON reports of bench/reproduce_mini.py (later ones win)")
    parser.add_argument("--out", default=None, help="write {sources, runs, summary} here")
    args = parser.parse_args(argv)
    reports = []
    for path in args.reports:
        try:
            with open(path, encoding="utf-8") as f:
                reports.append(json.load(f))
        except (OSError, ValueError) as err:
            parser.error(f"{path}: {err}")
        if not isinstance(reports[-1], dict) or "runs" not in reports[-1]:
            parser.error(f"{path}: not a reproduce_mini.py report (no 'runs' key)")
    runs = merge_runs(reports)
    merged = {"sources": [{"path": path, "command": r.get("command"), "device": r.get("device"), "date": r.get("date")}
                          for path, r in zip(args.reports, reports)], "runs": runs, "summary": summarize(runs)}
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            json.dump(merged, f, indent=1)
    sys.stdout.write(markdown(merged["summary"]))
    print(json.dumps(merged["summary"]["headline"], indent=1))
    return merged


if __name__ == "__main__":
    main()
