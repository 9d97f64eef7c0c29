"""The table that ends `make demo`: time per stage, tokens trained, loss, retrieval, short tasks, needle.

    python -m longalign.demo.report --out data/demo --times data/demo/stage_times.tsv
    python -m longalign.demo.report --loss data/demo/model/trainer_state.json   # one line, after training

reads what the demo's stages wrote under --out (model/trainer_state.json, eval/base.json,
eval/trained.json, needle/results/summary_match.json) and the stage times (one "name<TAB>seconds"
line per stage), then writes --out/summary.json and --out/summary.md and prints the markdown.
A missing input is an error naming the file.
"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from longalign.storage import write_bytes_atomic, write_json_atomic

TRAINER_STATE = "model/trainer_state.json"
EVAL_BASE = "eval/base.json"
EVAL_TRAINED = "eval/trained.json"
NEEDLE_SUMMARY = "needle/results/summary_match.json"
NEEDLE_HEATMAP = "needle/results/heatmap_match.png"


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing (did that demo stage run?)")
    return json.loads(path.read_text(encoding="utf-8"))


def read_stage_times(path: str | Path) -> list[tuple[str, float]]:
    """[(stage, seconds)] from "name<TAB>seconds" lines."""
    rows = []
    for number, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        parts = line.split("\t")
        if len(parts) != 2:
            raise ValueError(f"{path}:{number}: expected 'name<TAB>seconds', got {line!r}")
        rows.append((parts[0], float(parts[1])))
    return rows


def training_summary(state: dict) -> dict:
    """Steps, tokens trained and the first/last logged loss from a trainer_state.json.

    Each training log holds `step_tokens`, the mean real tokens per optimizer step since the
    previous log, so tokens trained = sum over logs of step_tokens x (steps in that window).
    """
    logs = [entry for entry in state["log_history"] if "loss" in entry]
    if not logs:
        raise ValueError("trainer_state.json has no training loss logged")
    tokens, previous_step = 0.0, 0
    for entry in logs:
        tokens += entry.get("step_tokens", 0.0) * (entry["step"] - previous_step)
        previous_step = entry["step"]
    return {"steps": state["global_step"], "tokens_trained_logged": int(round(tokens)),
            "loss_first": logs[0]["loss"], "loss_first_step": logs[0]["step"],
            "loss_last": logs[-1]["loss"], "loss_last_step": logs[-1]["step"]}


def build_summary(out_dir: str | Path, stage_times: list[tuple[str, float]]) -> dict:
    out_dir = Path(out_dir)
    base, trained = _read_json(out_dir / EVAL_BASE), _read_json(out_dir / EVAL_TRAINED)
    needle = _read_json(out_dir / NEEDLE_SUMMARY)
    return {"stages": [{"stage": name, "seconds": seconds} for name, seconds in stage_times],
            "total_seconds": sum(seconds for _, seconds in stage_times),
            "load_average": list(os.getloadavg()),
            "training": training_summary(_read_json(out_dir / TRAINER_STATE)),
            "retrieval": {"context_tokens": trained["context_tokens"],
                          "query_tokens": trained["query_tokens"], "examples": len(trained["examples"]),
                          "base": base["accuracy"], "trained": trained["accuracy"],
                          "base_per_task": base["per_task"], "trained_per_task": trained["per_task"]},
            "unseen_kind": {"base": base["unseen_kind"]["accuracy"], "trained": trained["unseen_kind"]["accuracy"],
                            "per_task": trained["unseen_kind"]["per_task"]},
            "short": {"mix": trained["short"]["mix"], "examples": len(trained["short"]["examples"]),
                      "base": base["short"]["accuracy"], "trained": trained["short"]["accuracy"],
                      "skipped_seen_in_training": trained["short"]["skipped_seen_in_training"]},
            "needle": {"mean_score": needle["mean_score"], "scored": needle["scored"],
                       "heatmap": str(out_dir / NEEDLE_HEATMAP)}}


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{value:.0%}"


def markdown(summary: dict) -> str:
    t, r, n, short = summary["training"], summary["retrieval"], summary["needle"], summary["short"]
    unseen = summary["unseen_kind"]
    per_task = ", ".join(f"{task} {c['correct']}/{c['total']}" for task, c in r["trained_per_task"].items())
    unseen_tasks = ", ".join(f"{task} {c['correct']}/{c['total']}" for task, c in unseen["per_task"].items())
    lines = ["| stage | seconds |", "|---|---|"]
    lines += [f"| {s['stage']} | {s['seconds']:.0f} |" for s in summary["stages"]]
    lines += [f"| **total** | **{summary['total_seconds']:.0f}** |", "",
              "| measure | value |", "|---|---|",
              f"| tokens trained | {t['tokens_trained_logged']:,} in {t['steps']} steps |",
              f"| training loss, first -> last log | {t['loss_first']:.3f} (step {t['loss_first_step']}) -> "
              f"{t['loss_last']:.3f} (step {t['loss_last_step']}) |",
              f"| held-out retrieval exact match, before -> after training | {r['base']:.0%} -> "
              f"**{r['trained']:.0%}** ({per_task}; {r['query_tokens']['min']}-{r['query_tokens']['max']} "
              f"query tokens) |",
              f"| a needle kind never trained on, before -> after | {unseen['base']:.0%} -> "
              f"**{unseen['trained']:.0%}** ({unseen_tasks}) |",
              f"| held-out short tasks exact match, before -> after | {_percent(short['base'])} -> "
              f"**{_percent(short['trained'])}** ({short['examples']} first rounds of mix {short['mix']}) |",
              f"| needle test mean score (1-10), trained | **{n['mean_score']:.1f}** over {n['scored']} prompts |",
              f"| needle heatmap | {n['heatmap']} |",
              f"| load average (1, 5, 15 min) at the end | "
              f"{', '.join(f'{x:.1f}' for x in summary['load_average'])} |"]
    return "\n".join(lines) + "\n"


def loss_line(t: dict) -> str:
    """The one line printed after training, from `training_summary`."""
    return (f"[demo] loss: {t['loss_first']:.3f} (step {t['loss_first_step']}) -> {t['loss_last']:.3f} "
            f"(step {t['loss_last_step']}), {t['tokens_trained_logged']:,} tokens in {t['steps']} steps")


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", help="the demo's output directory")
    parser.add_argument("--times", help="stage times, one 'name<TAB>seconds' per line")
    parser.add_argument("--loss", metavar="TRAINER_STATE", help="only print the loss line of this trainer_state.json")
    args = parser.parse_args(argv)
    if args.loss:
        summary = training_summary(_read_json(Path(args.loss)))
        print(loss_line(summary))
        return summary
    if not (args.out and args.times):
        parser.error("--out and --times are required (or --loss alone)")
    summary = build_summary(args.out, read_stage_times(args.times))
    text = markdown(summary)
    write_json_atomic(Path(args.out) / "summary.json", summary)
    write_bytes_atomic(Path(args.out) / "summary.md", text.encode("utf-8"))
    print(text, end="")
    return summary


if __name__ == "__main__":
    main()
