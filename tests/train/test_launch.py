"""The paper's scripts on one node or several: scripts/_launch.sh and longalign/train/launch.py.

The scripts run under bash with stub `deepspeed`, `scontrol` and `srun` executables first on PATH
(the stub launcher records its arguments and a copy of the hostfile it is given), on data that is
only the sort/ and pack/ stats.json the group-size check reads. One test starts train.py for real
the way one node of a multi-node job starts: DeepSpeed's launcher with the NNODES form's words
(--hostfile, --no_ssh, --node_rank 0), two CPU processes on gloo, two optimizer steps.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

from longalign.train import launch
from helpers.script_stubs import write_stub

LAUNCH_ENV = ("NUM_GPUS", "MODEL", "DATA", "OUT", "HOSTFILE", "NNODES", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT",
              "PORT", "SP", "PY", "RECIPE", "TMPDIR")
deepspeed_available = pytest.mark.skipif(
    __import__("importlib").util.find_spec("deepspeed") is None, reason="deepspeed is not installed")
RECORD = ('out="$ARGS_OUT${NODE_RANK:+.$NODE_RANK}"; echo deepspeed > "$out"; printf "%s\\n" "$@" >> "$out"\n'
          'prev=""; for a in "$@"; do [ "$prev" = --hostfile ] && cp "$a" "$out.hostfile"; prev=$a; done; true\n')


@pytest.fixture
def bin_dir(tmp_path):
    """Stub deepspeed (records), nvidia-smi (must not be needed: GPUs come from NUM_GPUS or the
    hostfile), scontrol (two hosts) and srun (runs its command once per node with SLURM_NODEID)."""
    path = tmp_path / "bin"
    path.mkdir()
    write_stub(path / "deepspeed", RECORD)
    write_stub(path / "nvidia-smi", 'echo "nvidia-smi called" >&2; exit 1\n')
    write_stub(path / "scontrol", 'printf "gpu-a\\ngpu-b\\n"\n')
    write_stub(path / "srun", 'while [ "${1#--}" != "$1" ]; do shift; done\n'
                              'for id in $(seq 0 $((SLURM_JOB_NUM_NODES - 1))); do\n'
                              '    SLURM_NODEID=$id "$@" || exit $?\ndone\n')
    return path


def fake_data(root: Path, group_size: int, max_length: int = 65536) -> str:
    """DATA with the sort/ and pack/ stats.json of sort_and_group.py --group_size G (nothing else)."""
    data = root / "llama" / "10k"
    for method in ("sort", "pack"):
        (data / method).mkdir(parents=True, exist_ok=True)
        (data / method / "stats.json").write_text(json.dumps({"group_size": group_size, "max_length": max_length}))
    return str(data)


def run_script(script: str, bin_dir: Path, tmp_path: Path, *args: str, **env_overrides):
    """(process, recorded launcher words per node rank ('' = single launcher)) of bash scripts/<script>."""
    out = tmp_path / "args"
    (tmp_path / "tmp").mkdir(exist_ok=True)
    env = {**{k: v for k, v in os.environ.items() if k not in LAUNCH_ENV},
           "PATH": f"{bin_dir}:{os.environ['PATH']}", "ARGS_OUT": str(out), "TMPDIR": str(tmp_path / "tmp"),
           "MODEL": "/m", "OUT": "/o", **env_overrides}
    proc = subprocess.run(["bash", str(REPO / "scripts" / script), *args], env=env, cwd=tmp_path, capture_output=True,
                          text=True, timeout=120)
    words = {p.name[len("args"):].lstrip("."): p.read_text().splitlines()
             for p in tmp_path.glob("args*") if not p.name.endswith(".hostfile")}
    return proc, words


def launcher_words(words: list[str]) -> list[str]:
    return words[:words.index("train.py")]


@pytest.mark.subprocess
def test_one_node_is_the_paper_command_after_the_group_size_check(bin_dir, tmp_path):
    data = fake_data(tmp_path, group_size=8)
    proc, words = run_script("llama_pack.sh", bin_dir, tmp_path, NUM_GPUS="8", DATA=data)
    assert proc.returncode == 0, proc.stderr
    assert launcher_words(words[""]) == ["deepspeed", "--num_gpus", "8", "--master_port", "29500"]
    assert "[launch] world size 8: one node of NUM_GPUS=8" in proc.stderr
    assert f"{data}/pack/stats.json: group_size 8 fits 8 rows per micro-step" in proc.stderr


@pytest.mark.subprocess
def test_hostfile_form_counts_the_slots_of_every_host(bin_dir, tmp_path):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("# two nodes\n\ngpu-a slots=8\ngpu-b slots=4\n")
    data = fake_data(tmp_path, group_size=12)
    proc, words = run_script("llama_sort.sh", bin_dir, tmp_path, HOSTFILE=str(hostfile), DATA=data, PORT="29511")
    assert proc.returncode == 0, proc.stderr
    assert launcher_words(words[""]) == ["deepspeed", "--hostfile", str(hostfile), "--master_port", "29511"]
    assert "[launch] world size 12: 2 hosts" in proc.stderr and f"{data}/sort/stats.json" in proc.stderr
    proc, words = run_script("llama_sort.sh", bin_dir, tmp_path, HOSTFILE=str(hostfile), DATA=data,
                             MASTER_ADDR="gpu-a")
    assert launcher_words(words[""]) == ["deepspeed", "--hostfile", str(hostfile), "--master_addr", "gpu-a",
                                         "--master_port", "29500"]


@pytest.mark.subprocess
def test_per_node_form_runs_deepspeed_without_ssh_on_a_hostfile_of_all_nodes(bin_dir, tmp_path):
    data = fake_data(tmp_path, group_size=16)
    proc, words = run_script("chatglm_pack.sh", bin_dir, tmp_path, "--max_steps", "20", NNODES="2", NODE_RANK="1",
                             MASTER_ADDR="10.1.2.3", MASTER_PORT="29611", NUM_GPUS="8", DATA=data)
    assert proc.returncode == 0, proc.stderr
    node = launcher_words(words["1"])
    hostfile = node[2]
    assert node == ["deepspeed", "--hostfile", hostfile, "--no_ssh", "--node_rank", "1", "--master_addr", "10.1.2.3",
                    "--master_port", "29611"]
    assert (tmp_path / "args.1.hostfile").read_text() == "node0 slots=8\nnode1 slots=8\n"
    assert not Path(hostfile).exists() and list((tmp_path / "tmp").iterdir()) == []  # removed on exit
    assert words["1"][-2:] == ["--max_steps", "20"]
    assert "[launch] world size 16: NNODES=2 x NUM_GPUS=8 (this is node 1)" in proc.stderr


@deepspeed_available
def test_deepspeed_reads_the_hostfiles_as_the_launcher_counts_them(tmp_path):
    from deepspeed.launcher.runner import fetch_hostfile
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("# two nodes\n\ngpu-a slots=8\ngpu-b slots=4 # the small one\n")
    assert launch.read_hostfile(str(hostfile)) == dict(fetch_hostfile(str(hostfile))) == {"gpu-a": 8, "gpu-b": 4}
    launch_main(tmp_path, "--num_gpus", "8", "--nnodes", "3", "--node_rank", "2", "--master_addr", "a",
                "--node_hostfile", str(hostfile))
    assert dict(fetch_hostfile(str(hostfile))) == {"node0": 8, "node1": 8, "node2": 8}  # W = 24 for DeepSpeed too


@pytest.mark.subprocess
@pytest.mark.parametrize("form", ["nnodes", "hostfile", "sequence_parallel"])
def test_group_size_mismatch_stops_before_any_launcher_starts(bin_dir, tmp_path, form):
    """Data grouped for one 8-GPU node, launched on two: an error naming both numbers and the fix."""
    group_size = 4 if form == "sequence_parallel" else 8
    data = fake_data(tmp_path, group_size=group_size, max_length=262144)
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("gpu-a slots=8\ngpu-b slots=8\n")
    env = ({"HOSTFILE": str(hostfile)} if form == "hostfile" else
           {"NNODES": "2", "NODE_RANK": "0", "MASTER_ADDR": "gpu-a", "NUM_GPUS": "8"})
    if form == "sequence_parallel":
        env["SP"] = "2"
    proc, words = run_script("llama_pack.sh", bin_dir, tmp_path, DATA=data, **env)
    assert proc.returncode != 0 and words == {}
    ranks = ("data-parallel size 8 (world size 16 / --sequence_parallel_size 2)" if form == "sequence_parallel"
             else "world size 16")
    expected = 8 if form == "sequence_parallel" else 16
    assert f"{data}/pack/stats.json: the dataset's group_size {group_size} " in proc.stderr
    assert f"is not a multiple of {ranks} x per-device batch 1 = {expected}" in proc.stderr
    assert (f"`python sort_and_group.py --train_file {data} --group_size {expected} --max_length 262144`"
            in proc.stderr)
    assert list((tmp_path / "tmp").iterdir()) == []  # the NNODES form's hostfile is removed on the error too


def launch_main(tmp_path: Path, *extra: str, data: str | None = None):
    return launch.main(["--train_file", data or str(tmp_path / "no_data"), "--batch_method", "pack",
                        "--master_port", "29500", *extra])


@pytest.mark.parametrize("setting,message", [
    (["--hostfile", "{hf}", "--nnodes", "2", "--node_rank", "0"],
     "HOSTFILE is set together with NNODES/NODE_RANK"),
    (["--hostfile", "{hf}", "--num_gpus", "8"], "HOSTFILE is set together with NUM_GPUS"),
    (["--num_gpus", "8", "--nnodes", "2", "--master_addr", "a"], "NODE_RANK not set"),
    (["--num_gpus", "8", "--node_rank", "0"], "NNODES, MASTER_ADDR not set"),
    (["--num_gpus", "8", "--nnodes", "2", "--node_rank", "2", "--master_addr", "a"],
     "NODE_RANK=2 is not below NNODES=2"),
    (["--num_gpus", "8", "--nnodes", "two", "--node_rank", "0", "--master_addr", "a"],
     "NNODES='two': expected an integer >= 1"),
    (["--num_gpus", "0"], "NUM_GPUS='0': expected an integer >= 1"),
    (["--num_gpus", "3", "--sequence_parallel_size", "2"],
     "world size 3 is not a multiple of --sequence_parallel_size 2"),
    (["--hostfile", "{tmp}/absent"], "absent: no such file"),
])
def test_launch_settings_are_refused_with_the_variable_named(tmp_path, setting, message):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("a slots=8\n")
    argv = [word.format(hf=hostfile, tmp=tmp_path) for word in setting]
    with pytest.raises(SystemExit) as exc:
        launch_main(tmp_path, "--node_hostfile", str(tmp_path / "out_hostfile"), *argv)
    assert message in str(exc.value.code) and str(exc.value.code).startswith("[launch] ERROR: ")
    assert not (tmp_path / "out_hostfile").exists()  # refused before it is written


@pytest.mark.parametrize("text,message", [
    ("a slots=8\nb slots=eight\n", ":2: expected 'HOST slots=N' (DeepSpeed's hostfile format), got 'b slots=eight'"),
    ("a slots=8\n# b\na slots=8\n", ":3: host a is listed twice"),
    ("a slots=0\n", ":1: a has slots=0"),
    ("# nothing\n\n", ": no 'HOST slots=N' line"),
])
def test_bad_hostfile_lines_are_named_by_file_and_line(tmp_path, text, message):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text(text)
    with pytest.raises(SystemExit) as exc:
        launch_main(tmp_path, "--hostfile", str(hostfile))
    assert f"{hostfile}{message}" in str(exc.value.code)


def test_missing_group_stats_are_reported_with_the_command_that_builds_them(tmp_path, capsys):
    """No stats.json to compare: the launch goes on (train.py stops on the missing data itself)."""
    words = launch_main(tmp_path, "--num_gpus", "8", "--nnodes", "2", "--node_rank", "0", "--master_addr", "a",
                        "--node_hostfile", str(tmp_path / "hf"))
    assert words[:4] == ["deepspeed", "--hostfile", str(tmp_path / "hf"), "--no_ssh"]
    err = capsys.readouterr().err
    assert f"{tmp_path}/no_data/pack/stats.json not found, group size not checked" in err
    assert f"`python sort_and_group.py --train_file {tmp_path}/no_data --group_size 16`" in err


def test_group_size_of_several_micro_steps_is_accepted_as_train_py_accepts_it(tmp_path, capsys):
    data = fake_data(tmp_path, group_size=32)
    launch_main(tmp_path, "--num_gpus", "8", "--nnodes", "2", "--node_rank", "0", "--master_addr", "a",
                "--node_hostfile", str(tmp_path / "hf"), data=data)
    assert "group_size 32 fits 16 rows per micro-step, each group split over 2" in capsys.readouterr().err


@pytest.mark.subprocess
def test_slurm_example_starts_one_launcher_per_node(bin_dir, tmp_path):
    data = fake_data(tmp_path, group_size=16)
    proc, words = run_script("slurm/multinode.sh", bin_dir, tmp_path, "--max_steps", "20", DATA=data,
                             NUM_GPUS="8", RECIPE="llama_sort_13b", SLURM_SUBMIT_DIR=str(REPO),
                             SLURM_JOB_NODELIST="gpu-[a-b]", SLURM_JOB_NUM_NODES="2")
    assert proc.returncode == 0, proc.stderr
    assert sorted(words) == ["0", "1"]
    for rank in ("0", "1"):
        node = launcher_words(words[rank])
        assert node == ["deepspeed", "--hostfile", node[2], "--no_ssh", "--node_rank", rank, "--master_addr",
                        "gpu-a", "--master_port", "29500"]
        train_args = words[rank][len(node) + 1:]
        assert train_args[train_args.index("--model_name_or_path") + 1] == "/m"
        assert train_args[-2:] == ["--max_steps", "20"]
    proc, words = run_script("slurm/multinode.sh", bin_dir, tmp_path, DATA=data, RECIPE="llama_huge",
                             SLURM_SUBMIT_DIR=str(REPO), SLURM_JOB_NODELIST="gpu-a", SLURM_JOB_NUM_NODES="1")
    assert proc.returncode != 0 and "RECIPE=llama_huge: no scripts/llama_huge.sh" in proc.stderr


@pytest.mark.subprocess
@deepspeed_available
def test_one_node_of_a_multi_node_job_trains_two_steps_on_gloo(tmp_path):
    """NNODES=1 NODE_RANK=0 on 2 CPU processes: the launcher words _launch.sh uses, DeepSpeed's own
    launcher (--hostfile --no_ssh --node_rank), train.py on DDP/gloo (no ZeRO config on CPU)."""
    from helpers.train_runs import argv_for, free_port, make_model_dir, make_sequences, make_train_file
    model = make_model_dir(tmp_path / "model", "llama")
    data = make_train_file(tmp_path / "data", make_sequences(16), group_size=2)
    words = launch.main(["--train_file", data, "--batch_method", "pack", "--num_gpus", "2", "--nnodes", "1",
                         "--node_rank", "0", "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
                         "--node_hostfile", str(tmp_path / "hostfile")])
    deepspeed = str(Path(sys.executable).parent / "deepspeed")
    out = tmp_path / "out"
    cmd = [deepspeed, *words[1:], "train.py", *argv_for(model, data, str(out), "pack", "--pack_loss",
                                                       "--max_steps", "2", "--ddp_backend", "gloo")]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests")])}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    assert "world_size=2" in proc.stdout
    state = json.loads((out / "trainer_state.json").read_text())
    assert state["global_step"] == 2 and all(e["step_sequences"] > 0 for e in state["log_history"] if "loss" in e)
