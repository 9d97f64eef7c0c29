"""A prewarmed Python for tests whose scripts launch Python processes (scripts/demo.sh, the benches).

Such a process spends most of its seconds on CPU importing torch and transformers. `prewarmed_python`
starts one interpreter that imports them once (nothing of this repository) and gives a `python`
executable that behaves as `python [-u] -m MODULE ...` / `python [-u] SCRIPT ...` do: each run is a
fork of that interpreter, in a process of its own, with its own argv, working directory, environment,
stdin/stdout/stderr, imports of this repository, atexit handlers and exit code (128 + N when killed
by signal N). A run whose caller goes away (killed, timed out) is killed. Any other interpreter
option (`-c`, `-X`, ...) is refused with exit code 2. The interpreter runs one OpenMP thread (torch
started with more has its pool running, which a fork would leave hanging): a run takes the intra-op
thread count its OMP_NUM_THREADS names, one where none is named. Where the interpreter cannot start,
or would have a second thread at the fork, the plain interpreter is given instead (with a warning).

The executable needs the variables it comes with (`variables`) in the environment of the processes
that run it: demo.sh's environment, or the test's os.environ for a bench it launches children from
(torchrun's workers: PYTHON_EXEC).
"""
from __future__ import annotations

import atexit
import contextlib
import os
import signal
import subprocess
import sys
import warnings
from pathlib import Path

# what the launched scripts import first (not datasets or transformers.trainer: pyarrow starts a thread)
PRELOADED = ("torch", "numpy", "transformers", "transformers.modeling_utils",
             "transformers.models.llama.modeling_llama", "transformers.models.auto.tokenization_auto")
SOCKET_VAR = "LONGALIGN_TEST_PYTHON_SOCKET"

SERVER = r"""
import atexit, importlib, json, os, runpy, select, signal, socket, struct, sys, threading, traceback

def run(request, fds):  # the forked process of one run; never returns
    for target, fd in zip((0, 1, 2), fds):
        os.dup2(fd, target)
        os.close(fd)
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    argv, code = list(request["argv"]), 0
    try:
        threads = os.environ.get("OMP_NUM_THREADS", "")
        if threads.isdigit() and int(threads) > 1 and "torch" in sys.modules:
            sys.modules["torch"].set_num_threads(int(threads))
        unbuffered = bool(os.environ.get("PYTHONUNBUFFERED"))
        while argv and argv[0] == "-u":
            argv, unbuffered = argv[1:], True
        if unbuffered:
            for stream in (sys.stdout, sys.stderr):
                stream.reconfigure(line_buffering=True, write_through=True)
        pythonpath = os.environ.get("PYTHONPATH")  # its entries next, as an interpreter starting here puts them
        sys.path[:] = ["", *(os.path.abspath(p) for p in pythonpath.split(os.pathsep))] if pythonpath else [""]
        sys.path += SITE_PATH
        if argv and argv[0] == "-m" and len(argv) > 1:  # as `python -m`: the working directory first on sys.path
            sys.argv, sys.path[0] = argv[1:], os.getcwd()
            runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
        elif argv and not argv[0].startswith("-"):  # as `python SCRIPT`: the script's folder first on sys.path
            sys.argv, sys.path[0] = argv, os.path.dirname(os.path.abspath(argv[0]))
            runpy.run_path(argv[0], run_name="__main__")
        else:
            print(f"prewarmed python: only [-u] -m MODULE or [-u] SCRIPT, not {request['argv']}", file=sys.stderr)
            code = 2
    except SystemExit as stop:
        if stop.code is None or isinstance(stop.code, int):
            code = stop.code or 0
        else:
            print(stop.code, file=sys.stderr)
            code = 1
    except BaseException:
        traceback.print_exc()
        code = 1
    try:
        atexit._run_exitfuncs()
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:
                pass
        os._exit(code)


def monitor(conn):  # forks the run, reports its exit code; kills it if the caller goes away
    head, fds, _, _ = socket.recv_fds(conn, 8, 3)
    size, payload = struct.unpack("Q", head)[0], b""
    while len(payload) < size:
        payload += conn.recv(size - len(payload))
    request = json.loads(payload)  # its environment keeps the socket: the runs it launches come here too
    pid = os.fork()
    if pid == 0:
        conn.close()
        run(request, fds)
    for fd in fds:
        os.close(fd)
    pidfd = os.pidfd_open(pid) if hasattr(os, "pidfd_open") else None
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        ready, _, _ = select.select([conn] + ([pidfd] if pidfd is not None else []), [], [],
                                    None if pidfd is not None else 0.1)
        if conn in ready and not conn.recv(1, socket.MSG_PEEK):  # the caller is gone
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            return
    conn.sendall(struct.pack("i", os.waitstatus_to_exitcode(status)))


path, preload, parent = sys.argv[1], [name for name in sys.argv[2].split(",") if name], os.getppid()
own = os.environ.get("PYTHONPATH")  # sys.path without this interpreter's first entry and PYTHONPATH entries
own = {os.path.abspath(p) for p in own.split(os.pathsep)} if own else set()
SITE_PATH = [p for p in sys.path[1:] if p not in own]
for name in preload:
    importlib.import_module(name)
tasks = f"/proc/{os.getpid()}/task"
threads = len(os.listdir(tasks)) if os.path.isdir(tasks) else threading.active_count()
if threads != 1:  # a fork copies only the calling thread: another one could hold a lock forever
    raise SystemExit(f"{threads} threads after importing {preload}: not forking")
listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
listener.bind(path)
listener.listen(64)
signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # the monitors are reaped by the kernel
print("ready", flush=True)
listener.settimeout(2.0)
while True:
    try:
        conn, _ = listener.accept()
    except TimeoutError:
        if os.getppid() != parent:  # the test process is gone (killed): so is this interpreter
            os.killpg(0, signal.SIGKILL)
        continue
    conn.settimeout(None)
    if os.fork() == 0:
        listener.close()
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        try:
            monitor(conn)
        finally:
            os._exit(0)
    conn.close()
"""

CLIENT = r"""
import json, os, socket, struct, sys
conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
conn.connect(os.environ["%s"])
payload = json.dumps({"argv": sys.argv[1:], "cwd": os.getcwd(), "env": dict(os.environ)}).encode()
socket.send_fds(conn, [struct.pack("Q", len(payload))], [0, 1, 2])
conn.sendall(payload)
reply = b""
while len(reply) < 4:
    chunk = conn.recv(4 - len(reply))
    if not chunk:
        sys.exit("prewarmed python: the run's monitor went away")
    reply += chunk
code = struct.unpack("i", reply)[0]
sys.exit(code if code >= 0 else 128 - code)
""" % SOCKET_VAR


_SHARED: tuple[str, dict] | None = None


def shared_prewarmed_python(tmp_path_factory) -> tuple[str, dict]:
    """(python, variables) of this test process's one prewarmed interpreter: started on first use (with
    os.environ as it is then) in a folder of tmp_path_factory's, stopped when the process exits."""
    global _SHARED
    if _SHARED is None:
        context = prewarmed_python(tmp_path_factory.mktemp("prewarmed_python"))
        _SHARED = context.__enter__()
        atexit.register(context.__exit__, None, None, None)
    return _SHARED


def launch_through(monkeypatch, prewarmed: tuple[str, dict]) -> str:
    """Python processes launched by code running in this test (sys.executable; torchrun's workers:
    PYTHON_EXEC) run through `prewarmed`'s python, for the rest of the test."""
    python, variables = prewarmed
    for name, value in {**variables, "PYTHON_EXEC": python}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(sys, "executable", python)
    return python


@contextlib.contextmanager
def prewarmed_python(folder: Path, env: dict | None = None, preload=PRELOADED):
    """Yield (python, variables) (module docstring); `env`: the interpreter's environment (default
    os.environ), whose variables the preloaded libraries may read at import."""
    folder = Path(folder)
    sock, client = folder / "py.sock", folder / "python"
    if len(str(sock)) > 100 or len(sys.executable) > 120 or not hasattr(os, "fork"):  # AF_UNIX path, #! line
        yield sys.executable, {}
        return
    sock.unlink(missing_ok=True)  # a socket file left by an earlier interpreter of this folder
    client.write_text(f"#!{sys.executable} -IS\n{CLIENT}")
    client.chmod(0o755)
    with open(folder / "server.log", "w") as log:
        server = subprocess.Popen([sys.executable, "-c", SERVER, str(sock), ",".join(preload)],
                                  env={**(os.environ if env is None else env), "OMP_NUM_THREADS": "1"}, cwd=folder,
                                  stdout=subprocess.PIPE, stderr=log, text=True, start_new_session=True)
    try:
        if server.stdout.readline().strip() == "ready":
            yield str(client), {SOCKET_VAR: str(sock)}
        else:
            warnings.warn(f"no prewarmed python ({folder / 'server.log'}): the plain {sys.executable} runs")
            yield sys.executable, {}
    finally:
        os.killpg(server.pid, signal.SIGKILL)  # with any run still going
        server.wait()
        server.stdout.close()
