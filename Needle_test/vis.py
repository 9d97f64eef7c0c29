"""Stage 4: draw the depth x context-length heatmap of the scores to a PNG and print its path.

    python Needle_test/vis.py [--config Needle_test/config-eval.yaml] [--scorer judge|match]
        [--results FILE] [--out FILE.png] [--title TEXT]

A results file that is not eval.py's (not JSON, records without a numeric length, depth or score)
is an error naming the file.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path


from longalign.eval.needle_test.config import EVAL_SCHEMA, load_config, resolve

DEFAULT_CONFIG = Path(__file__).resolve().parent / "config-eval.yaml"
SCORE_RANGE = (1, 10)
FIGURE_SIZE = (12, 6)
DPI = 120
RESULT_FIELDS = ("context_length", "depth_percent", "score")  # per record; score may be null (unrated)


def read_results(path: Path) -> dict:
    """The per-prediction results eval.py wrote; anything else is an error naming `path`."""
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found; run Needle_test/eval.py first")
    try:
        results = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as err:
        results, problem = None, f"not JSON: {err}"
    else:
        problem = (next(filter(None, (_record_problem(i, r) for i, r in results.items())), None)
                   if isinstance(results, dict) and results else "expected a non-empty mapping of prediction ids")
    if problem:
        raise ValueError(f"{path}: not a results file of Needle_test/eval.py ({problem}); rerun Needle_test/eval.py")
    return results


def _record_problem(record_id: str, record) -> str | None:
    """What makes one result record unusable (None: nothing); a null score is an unrated prediction."""
    if not isinstance(record, dict):
        return f"{record_id!r} is not a record"
    for key in RESULT_FIELDS:
        value = record.get(key, "missing")
        if value is None and key == "score":
            continue
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            return f"{record_id!r}: {key} is {value!r}, expected a number"
    return None


def score_grid(results: dict):
    """(depths, lengths, grid) with grid[i][j] the mean score at depth i, length j (nan if none)."""
    import numpy as np

    cells = {}
    for record in results.values():
        if record.get("score") is not None:
            cells.setdefault((record["depth_percent"], record["context_length"]), []).append(record["score"])
    depths = sorted({r["depth_percent"] for r in results.values()})
    lengths = sorted({r["context_length"] for r in results.values()})
    grid = np.full((len(depths), len(lengths)), np.nan)
    for (depth, length), scores in cells.items():
        grid[depths.index(depth), lengths.index(length)] = statistics.fmean(scores)
    return depths, lengths, grid


def draw_heatmap(results: dict, out: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    depths, lengths, grid = score_grid(results)
    cmap = matplotlib.colormaps["RdYlGn"].with_extremes(bad="lightgrey")
    fig, ax = plt.subplots(figsize=FIGURE_SIZE)
    image = ax.imshow(np.ma.masked_invalid(grid), cmap=cmap, vmin=SCORE_RANGE[0], vmax=SCORE_RANGE[1],
                      aspect="auto", interpolation="nearest")
    ax.set_xticks(range(len(lengths)), [str(x) for x in lengths], rotation=45)
    ax.set_yticks(range(len(depths)), [f"{d:g}" for d in depths])
    ax.set_xlabel("Context length (tokens)")
    ax.set_ylabel("Depth percent")
    rated = grid[~np.isnan(grid)]
    ax.set_title(f"{title} (mean score {rated.mean():.2f})" if rated.size else f"{title} (no scores)")
    fig.colorbar(image, ax=ax, label="Score")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp.png")
    fig.savefig(tmp, dpi=DPI)
    plt.close(fig)
    tmp.replace(out)
    return out


def main(argv=None) -> Path:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(DEFAULT_CONFIG))
    p.add_argument("--scorer", default=None)
    p.add_argument("--results", default=None)
    p.add_argument("--out", default=None)
    p.add_argument("--title", default="Needle in a haystack")
    args = p.parse_args(argv)
    provided = {"save_dir", "pred_file"} if args.results else {"pred_file"}  # vis reads no predictions
    config = load_config(args.config, EVAL_SCHEMA, provided=provided)
    scorer = args.scorer or config.get("scorer", "judge")
    results_path = (Path(args.results) if args.results
                    else resolve(config, config["save_dir"]) / f"results_{scorer}.json")
    results = read_results(results_path)
    out = Path(args.out) if args.out else results_path.with_name(f"heatmap_{scorer}.png")
    draw_heatmap(results, out, args.title)
    print(f"[vis] heatmap written to {out}")
    return out


if __name__ == "__main__":
    try:
        main()
    except (FileNotFoundError, ValueError) as err:  # bad input: the message says what to do
        sys.exit(f"[vis] ERROR: {err}")
