"""One fresh Python process per benchmark configuration, within a wall-time budget.

    from config_runs import run_budgeted, run_in_subprocess
    results = run_budgeted(configs, lambda config, timeout: run_in_subprocess(script, argv(config), timeout),
                           budget_s=510, config_timeout_s=150, on_result=save)

Used by bench_train_step.py --sweep and bench_peers.py. A fresh process per configuration carries
no allocator fragmentation or patched modules (liger-kernel reassigns transformers functions) into
the next, and an out-of-memory error or a crash fails only its own row. Each child runs in its own
process group, so a timeout kills it with the compile workers it started. A configuration that
would start with less than `min_start_s` of the budget left is recorded as skipped, not run; each
row is handed to `on_result` as soon as it exists (the caller writes its JSON then).
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ERROR_TAIL_CHARS = 1500  # of the child's stderr, kept in a failed row
ALLOC_CONF = "expandable_segments:True"  # less fragmentation between packs of different lengths


def run_in_subprocess(script: Path, argv: list[str], timeout_s: float) -> dict:
    """`python script *argv --out <tmp>`: its JSON result plus wall_s, or {"error": ..., "wall_s"}."""
    env = dict(os.environ)
    env.setdefault("PYTORCH_CUDA_ALLOC_CONF", ALLOC_CONF)
    env["PYTHONUNBUFFERED"] = "1"
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        proc = subprocess.Popen([sys.executable, str(script), *argv, "--out", str(out)], cwd=REPO, env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
        try:
            stdout, stderr = proc.communicate(timeout=timeout_s)
            error = None if proc.returncode == 0 and out.exists() else (
                f"exit {proc.returncode}: " + (stderr or stdout)[-ERROR_TAIL_CHARS:])
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # the child's group: it and its compile workers
            proc.communicate()
            error = f"timed out after {timeout_s:.0f} s"
        result = json.loads(out.read_text()) if error is None else {"error": error}
    return {**result, "wall_s": round(time.perf_counter() - start, 1)}


def run_budgeted(configs: list, run_one, budget_s: float, config_timeout_s: float, min_start_s: float = 20.0,
                 on_result=None, name=str, describe=lambda config: {}) -> list[dict]:
    """run_one(config, timeout_s) for each config in order while the budget lasts (module docstring);
    every row is {"config": name(config), **describe(config), **result}."""
    results, start = [], time.perf_counter()
    for index, config in enumerate(configs):
        left = budget_s - (time.perf_counter() - start)
        if left < min_start_s:
            result = {"skipped": f"skipped: {budget_s:.0f} s budget spent"}
        else:
            timeout = min(config_timeout_s, left)
            print(f"[{time.perf_counter() - start:6.1f} s] {index + 1}/{len(configs)} {name(config)} "
                  f"(timeout {timeout:.0f} s)", flush=True)
            result = run_one(config, timeout)
        results.append({"config": name(config), **describe(config), **result})
        if on_result is not None:
            on_result(results)
    return results
