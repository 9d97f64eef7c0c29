"""Helpers of the fault-injection tests: CLI runs, paused-then-killed runs, file snapshots, and the
in-process runs of the scripts' `main(argv)` (argv builders, process state restored after each run)."""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

# The checkout whose scripts the CLI runs use: this one, or (LONGALIGN_FAULTS_REPO=/path/to/main) another,
# to watch these tests fail on the code before the fixes.
REPO = Path(os.environ.get("LONGALIGN_FAULTS_REPO") or Path(__file__).resolve().parents[2])
CLI_TIMEOUT_S = 300
PAUSE_WAIT_S = 120


def cli_env(**extra) -> dict:
    env = {**os.environ, "PYTHONPATH": str(REPO), "TOKENIZERS_PARALLELISM": "false", **extra}
    for name in ("LONGALIGN_FAULT_PAUSE_AT", "LONGALIGN_FAULT_READY_FILE", "LONGALIGN_NO_RENAME_EXCHANGE"):
        if name not in extra:
            env.pop(name, None)
    return env


def run_cli(args: list, prefix: tuple = (), cwd: Path = REPO, **env) -> subprocess.CompletedProcess:
    """Run `python ARGS` (from the repository root by default); returns the completed process."""
    return subprocess.run([*prefix, sys.executable, *map(str, args)], cwd=cwd, env=cli_env(**env),
                          capture_output=True, text=True, timeout=CLI_TIMEOUT_S)


def kill_at(args: list, point: str, scratch: Path, **env) -> subprocess.CompletedProcess:
    """Run `python ARGS` until it pauses at fault point `point`, then SIGKILL it from outside."""
    ready = scratch / f"ready-{time.monotonic_ns()}"
    proc = subprocess.Popen([sys.executable, *map(str, args)], cwd=REPO, text=True,
                            env=cli_env(LONGALIGN_FAULT_PAUSE_AT=point, LONGALIGN_FAULT_READY_FILE=str(ready), **env),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + PAUSE_WAIT_S
    while not ready.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    if not ready.exists():
        proc.kill()
        out, err = proc.communicate()
        raise AssertionError(f"never paused at {point} (rc {proc.returncode}):\n{out[-2000:]}\n{err[-4000:]}")
    os.kill(proc.pid, signal.SIGKILL)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def snapshot(path: Path) -> dict:
    """{relative path: sha256} of every file under `path` (or of `path` itself), for 'unchanged'."""
    path = Path(path)
    if path.is_file():
        return {".": hashlib.sha256(path.read_bytes()).hexdigest()}
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file()}


def no_write_permission_prefix(folder: Path) -> tuple:
    """Make `folder` unwritable for the CLI; returns the command prefix that makes that hold.

    A non-root user: chmod 0555 is enough. Root ignores modes, so the CLI then runs under setpriv
    without CAP_DAC_OVERRIDE (still uid 0, so it can read root's files, but not write 0555 folders).
    """
    folder.chmod(0o555)
    if os.geteuid() != 0:
        return ()
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("running as root without setpriv: cannot make a folder unwritable")
    return (setpriv, "--bounding-set=-dac_override,-dac_read_search", "--")


def write_jsonl(path: Path, rows: list, prefix: bytes = b"") -> Path:
    """Rows as JSON lines (a str row is written as is, e.g. a raw escape); `prefix` before line 1."""
    text = "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows)
    path.write_bytes(prefix + text.encode("utf-8"))
    return path


# ---- in-process runs of the scripts' main(argv) ----------------------------------------------------
def pre_tokenize_argv(tokenizer, raw: dict, out, *extra) -> list[str]:
    """pre_tokenize.py's arguments for the tests' llama run of raw["long"] + raw["short"]."""
    return [str(a) for a in ("--model", "llama", "--tokenizer", tokenizer, "--long", raw["long"], "--short",
                             raw["short"], "--num_proc", "1", "--max_length", "512", "--output_dir", out, *extra)]


def sort_and_group_argv(train_file, *extra) -> list[str]:
    return [str(a) for a in ("--train_file", train_file, "--max_length", "512", *extra)]


@contextlib.contextmanager
def process_state_restored():
    """Undo what an in-process stage run may change for the rest of the process: the random
    generators (HF Trainer seeds them all), the environment, torch's default dtype and a process
    group (train.py closes one only when it finishes). torch and numpy only where already imported."""
    env, py_rng = dict(os.environ), random.getstate()
    np, torch = sys.modules.get("numpy"), sys.modules.get("torch")
    np_rng = np.random.get_state() if np else None
    torch_state = (torch.get_rng_state(), torch.get_default_dtype()) if torch else None
    try:
        yield
    finally:
        torch = sys.modules.get("torch")
        if torch is not None and torch.distributed.is_available() and torch.distributed.is_initialized():
            from longalign.train.trainer import close_process_group

            close_process_group()
        for name in set(os.environ) - set(env):
            del os.environ[name]
        os.environ.update(env)
        random.setstate(py_rng)
        if np_rng is not None:
            np.random.set_state(np_rng)
        if torch_state is not None:
            torch.set_rng_state(torch_state[0])
            torch.set_default_dtype(torch_state[1])


@pytest.fixture
def isolated_process_state():
    """`process_state_restored` around one test (use: pytestmark = pytest.mark.usefixtures(...))."""
    with process_state_restored():
        yield


@contextlib.contextmanager
def private_remote_code_cache(folder: Path):
    """Tokenizer code that transformers imports (trust_remote_code) is copied into `folder`, not the
    user's HF modules cache, and its modules are forgotten afterwards (so a second load runs it again)."""
    from transformers import dynamic_module_utils

    cache, path, modules = dynamic_module_utils.HF_MODULES_CACHE, list(sys.path), set(sys.modules)
    dynamic_module_utils.HF_MODULES_CACHE = str(folder)
    try:
        yield
    finally:
        dynamic_module_utils.HF_MODULES_CACHE = cache
        sys.path[:] = path
        for name in set(sys.modules) - modules:
            if name.split(".")[0] == dynamic_module_utils.TRANSFORMERS_DYNAMIC_MODULE_NAME:
                del sys.modules[name]
