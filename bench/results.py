"""Record headline benchmark figures in bench/results.json (merged, atomically written).

Every bench script calls `record({...}, source=...)` with figures it measured itself; the file
keeps, per key, the value, the command/source that produced it and the date.
"""
from __future__ import annotations

import datetime
import json
from pathlib import Path

from longalign.storage import write_json_atomic

RESULTS_PATH = Path(__file__).resolve().parent / "results.json"


def record(figures: dict, source: str, machine: str, path: Path = RESULTS_PATH) -> dict:
    """Merge `figures` (key -> number) into results.json with their provenance."""
    results = json.loads(path.read_text()) if path.exists() else {}
    today = datetime.date.today().isoformat()
    for key, value in figures.items():
        results[key] = {"value": value, "source": source, "machine": machine, "date": today}
    write_json_atomic(path, dict(sorted(results.items())))
    return results


if __name__ == "__main__":
    # usage: python bench/results.py KEY=VALUE ... --source "cmd" --machine "desc"
    import argparse

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("pairs", nargs="+", help="KEY=VALUE")
    parser.add_argument("--source", required=True)
    parser.add_argument("--machine", required=True)
    args = parser.parse_args()
    figures = {k: float(v) for k, v in (p.split("=", 1) for p in args.pairs)}
    record(figures, args.source, args.machine)
