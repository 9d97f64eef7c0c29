"""The paper's shell scripts run under bash with stub executables first on PATH: `write_stub` makes a
stub, `launch` runs a script and returns the words the stub launcher recorded (into $ARGS_OUT)."""
from __future__ import annotations

import os
import stat
import subprocess
from pathlib import Path


def write_stub(path: Path, body: str) -> None:
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(path.stat().st_mode | stat.S_IEXEC)


def launch(script: Path, stub_bin: Path, tmp_path: Path, **env_overrides) -> list[str]:
    out = tmp_path / f"{script.stem}.args"
    env = {**{k: v for k, v in os.environ.items() if k not in ("NUM_GPUS", "MODEL", "DATA", "OUT", "HOSTFILE",
                                                                "NNODES", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT")},
           "PATH": f"{stub_bin}:{os.environ['PATH']}", "ARGS_OUT": str(out), **env_overrides}
    subprocess.run(["bash", str(script)], env=env, check=True, cwd=tmp_path, timeout=60)
    return out.read_text().splitlines()
