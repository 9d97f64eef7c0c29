"""The suite's one torchrun launch for the distributed tests' cases (gloo, CPU), from the pytest side,
and the train.py one-step cases it runs.

Every test module defining `launch_cases(items, folder)` (test_train.py,
test_original_training_rules.py, test_sequence_parallel.py) gives the cases of its selected tests,
each a dict with the inputs it built, its `name`, `world` size, `out` folder and the `module` whose
`run_launch_case(case)` runs it on a rank (this one for `step_case`s, helpers.ulysses_cases for the
sequence-parallel ones). One `torchrun --nproc_per_node max(world) -m helpers.torchrun_worker SPEC`
runs them all, one after the other, and each test checks its own cases' rank results through the
`torchrun_launch` fixture (a test module imports it), so failures are still reported case by case.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers.train_runs import free_port, run_one_step

REPO = Path(__file__).resolve().parents[2]
LAUNCH_TIMEOUT_S = 900  # the whole launch, every case
WORKER = "helpers.torchrun_worker"  # run as a module (torchrun -m): tests/ and the root on its PYTHONPATH
_LAUNCHES: dict = {}


class TorchrunLaunch:
    """The recorded launch: its cases by name, each rank's result, the launch's output."""

    def __init__(self, folder: Path):
        record = json.loads((folder / "launch.json").read_text())
        self.cases, self.log = {case["name"]: case for case in record["cases"]}, record["log"]

    def case(self, name: str) -> dict:
        return self.cases[name]

    def ranks(self, name: str) -> list[dict]:
        """The case's result on each of its ranks, or the test fails with what its ranks left."""
        case = self.cases[name]
        files = [Path(case["out"], f"rank{r}.pt") for r in range(case["world"])]
        if all(f.exists() for f in files):  # this case completed (a later one may have failed)
            return [torch.load(f) for f in files]
        errors = "".join(f.read_text() for f in sorted(Path(case["out"]).glob("error_rank*.txt")))
        pytest.fail(f"case {name} left no result on every rank\n{errors or 'it did not run'}\n{self.log}")


def shared_launch(session, tmp_path_factory) -> TorchrunLaunch:
    """The session's one launch, started by the first test that asks for it. pytest-xdist's workers
    share it (and its inputs) through their common temporary folder, under a file lock."""
    from filelock import FileLock

    base = tmp_path_factory.getbasetemp()
    root = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base
    folder = root / "torchrun_launch"
    if folder not in _LAUNCHES:
        with FileLock(str(root / "torchrun_launch.lock")):
            if not (folder / "launch.json").exists():
                run_launch(folder, session.items)
        _LAUNCHES[folder] = TorchrunLaunch(folder)
    return _LAUNCHES[folder]


@pytest.fixture
def torchrun_launch(request, tmp_path_factory) -> TorchrunLaunch:
    return shared_launch(request.session, tmp_path_factory)


def items_of(items, test_name: str) -> list:
    """The collected items of the test function `test_name` (each parametrisation one item): what a
    module's `launch_cases` builds cases for."""
    return [item for item in items if getattr(item, "originalname", "") == test_name]


def run_launch(folder: Path, items) -> None:
    """Collect the selected tests' cases, launch them, record the cases and the launch's output.

    A case that raises ends its launch: the cases that had not run yet are launched again without
    it, so each case's result (or error) is its own."""
    modules = sorted({item.module for item in items if hasattr(getattr(item, "module", None), "launch_cases")},
                     key=lambda module: module.__name__)
    cases = []
    for module in modules:
        cases += module.launch_cases([item for item in items if getattr(item, "module", None) is module],
                                     folder / module.__name__)
    # The largest world sizes first: the ranks of a case have then all run the same cases before it
    # (ZeRO-3 numbers parameters per process and checks that the ranks agree).
    cases.sort(key=lambda case: -case["world"])
    for case in cases:
        Path(case["out"]).mkdir(parents=True, exist_ok=True)

    def settled(case: dict) -> bool:  # every rank's result, or an error
        out = Path(case["out"])
        return (all((out / f"rank{r}.pt").exists() for r in range(case["world"]))
                or any(out.glob("error_rank*.txt")))

    logs, pending = [], cases
    while pending:
        logs.append(launch(folder / f"spec{len(logs)}.json", pending))
        left = [case for case in pending if not settled(case)]
        if len(left) == len(pending):  # nothing ran to an end: launching again would not either
            break
        pending = left
    (folder / "launch.json").write_text(json.dumps({"cases": cases, "log": "\n".join(logs) or "no case"}))


def launch(spec_file: Path, cases: list[dict]) -> str:
    """One torchrun of max(world size) processes running `cases` (helpers.torchrun_worker); its output."""
    spec_file.write_text(json.dumps({"cases": cases}))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(max(c["world"] for c in cases)),
           "--master_port", str(free_port()), "-m", WORKER, str(spec_file)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests")]), "DS_ACCELERATOR": "cpu"}
    try:
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=LAUNCH_TIMEOUT_S)
    except subprocess.TimeoutExpired as expired:
        out = "".join(x.decode() if isinstance(x, bytes) else x for x in (expired.stdout or "", expired.stderr or ""))
        return f"launch of {[c['name'] for c in cases]} timed out after {LAUNCH_TIMEOUT_S} s\n{out[-9000:]}"
    return (f"launch of {[c['name'] for c in cases]}: exit code {proc.returncode}\n"
            f"{proc.stdout[-3000:]}{proc.stderr[-6000:]}")


# ---------- the one-step cases: train.py's run_one_step on `world` ranks ----------
def step_case(name: str, model: str, data: str, out: Path, method: str, reduction: str, world: int,
              *extra: str) -> dict:
    """A launch case running run_one_step on `world` ranks."""
    return {"module": __name__, "name": name, "model": model, "data": data, "out": str(out / name),
            "method": method, "reduction": reduction, "world": world, "extra": list(extra)}


def run_launch_case(case: dict) -> dict:
    return run_one_step(case, case["method"], case["reduction"], case["world"], *case["extra"])
