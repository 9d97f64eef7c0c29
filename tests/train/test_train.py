"""train.py + LongAlignTrainer on tiny random models (CPU).

The distributed tests' cases (the invariance test's here, test_original_training_rules.py's and
test_sequence_parallel.py's) run in one launch, `torchrun --nproc_per_node N tests/train/test_train.py
worker SPEC` (gloo; TorchrunLaunch): this file is also the worker script, so both sides run the same
build_trainer -> Trainer.train code path.
"""
import contextlib
import gc
import importlib
import json
import math
import os
import socket
import subprocess
import sys
import traceback
from datetime import timedelta
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]

import train
from longalign.constants import IGNORE_INDEX as X
from longalign.modeling.checkpoints import make_self_describing
from longalign.modeling.configuration_chatglm import ChatGLMConfig
from longalign.modeling.loading import load_training_model
from longalign.modeling.modeling_chatglm import ChatGLMForConditionalGeneration
from longalign.train.trainer import check_data_parallel_layout, resolve_loss_reduction
from transformers import LlamaConfig, LlamaForCausalLM

VOCAB = 64
PATTERN = [5, 6, 7, 8]
FAMILIES = ["chatglm", "llama"]


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """One intra-op thread while this module runs (the launched workers get OMP_NUM_THREADS=1):
    on models this small two threads only wait for each other, many times slower on a shared
    CPU. The setting is restored for the modules that follow. Other test files import it."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module", autouse=True)
def frozen_gc():
    """The objects alive when this module starts (the imported libraries, mostly) kept out of the
    garbage collector's scans while it runs: every Trainer run calls gc.collect() (accelerate's
    free_memory), each a scan of the whole heap, seconds per run in a test process. Objects the
    tests create are collected as usual; unfrozen again for the modules that follow (left alone
    if something else froze objects first). Other test files import it."""
    if gc.get_freeze_count():
        yield
        return
    gc.freeze()
    yield
    gc.unfreeze()


def free_port() -> int:
    """A port free now, for torchrun's --master_port (no fixed port: the suite may run in parallel)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# ---------- tiny models and datasets ----------
def make_model_dir(path: Path, family: str) -> str:
    """A random-init checkpoint of `family` (public class: stock Llama / the ChatGLM remote code)."""
    torch.manual_seed(0)
    if family == "chatglm":
        config = ChatGLMConfig(num_layers=2, hidden_size=32, ffn_hidden_size=64, kv_channels=8, num_attention_heads=4,
                               multi_query_group_num=2, padded_vocab_size=VOCAB, seq_length=512, pad_token_id=0,
                               rope_ratio=1.0)
        model = ChatGLMForConditionalGeneration(config)
    else:
        config = LlamaConfig(num_hidden_layers=2, hidden_size=32, intermediate_size=64, num_attention_heads=4,
                             num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=512, pad_token_id=0)
        model = LlamaForCausalLM(config)
    model.save_pretrained(path)
    make_self_describing(path, family)
    return str(path)


def make_sequences(n: int, seed: int = 0) -> list[tuple[list[int], list[int]]]:
    """Learnable: a prompt of random tokens, then an answer cycling through PATTERN."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        prompt = torch.randint(3, VOCAB, (int(torch.randint(2, 8, (1,), generator=g)),), generator=g).tolist()
        phase = prompt[-1] % len(PATTERN)
        answer = [PATTERN[(phase + j) % len(PATTERN)] for j in range(int(torch.randint(6, 16, (1,), generator=g)))]
        out.append((prompt + answer, [X] * len(prompt) + answer))
    return out


def save_dataset(rows: dict, path: Path, stats: dict | None = None) -> None:
    import datasets
    datasets.Dataset.from_dict(rows).save_to_disk(str(path))
    if stats is not None:
        (path / "stats.json").write_text(json.dumps(stats))


def make_train_file(path: Path, sequences, group_size: int, per_pack: int = 3) -> str:
    """pre_tokenize-like dir with sort/ and pack/ subdirs (DESIGN.md §1-2), stored order = list order."""
    save_dataset({"input_ids": [s for s, _ in sequences], "labels": [l for _, l in sequences]}, path)
    save_dataset({"input_ids": [s for s, _ in sequences], "labels": [l for _, l in sequences]},
                 path / "sort", {"group_size": group_size})
    packs = {"input_ids": [], "labels": [], "cu_seqlens": []}
    for start in range(0, len(sequences), per_pack):
        members = sequences[start:start + per_pack][: 1 + (start // per_pack) % per_pack]  # 1, 2, 3 members
        packs["input_ids"].append(sum((s for s, _ in members), []))
        packs["labels"].append(sum((l for _, l in members), []))
        packs["cu_seqlens"].append([0] + torch.tensor([len(s) for s, _ in members]).cumsum(0).tolist())
    n_packs = len(packs["input_ids"]) - len(packs["input_ids"]) % group_size
    save_dataset({k: v[:n_packs] for k, v in packs.items()}, path / "pack", {"group_size": group_size})
    return str(path)


def argv_for(model, data, out, method, *extra):
    return ["--model_name_or_path", model, "--train_file", data, "--output_dir", out, "--batch_method", method,
            "--per_device_train_batch_size", "1", "--learning_rate", "2e-2", "--lr_scheduler_type", "cosine",
            "--warmup_steps", "0.03", "--adam_beta2", "0.95", "--weight_decay", "0", "--logging_steps", "1",
            "--save_strategy", "no", "--use_cpu", "--seed", "1", "--dataloader_num_workers", "0",
            "--disable_tqdm", "true", *extra]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    models = {family: make_model_dir(root / f"model_{family}", family) for family in FAMILIES}
    data = make_train_file(root / "data", make_sequences(48), group_size=2)
    return root, models, data


# ---------- training ----------
@pytest.mark.integration
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method,extra", [("naive", []), ("sort", []), ("pack", ["--pack_loss"]), ("pack", [])])
def test_each_batch_method_trains_with_falling_loss(workdir, family, method, extra):
    root, models, data = workdir
    out = root / f"out_{family}_{method}_{len(extra)}"
    trainer = train.main(argv_for(models[family], data, str(out), method, "--max_steps", "16",
                                  "--gradient_accumulation_steps", "2", *extra))
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    losses = [entry["loss"] for entry in logs]
    assert len(losses) == 16 and all(math.isfinite(v) for v in losses)
    assert sum(losses[-3:]) / 3 < 0.7 * sum(losses[:3]) / 3, losses
    for key in ("learning_rate", "step_sequences", "step_tokens", "tokens_per_s", "mfu"):
        assert all(key in entry and math.isfinite(entry[key]) for entry in logs), key
    assert logs[0]["step_sequences"] > 0 and logs[0]["step_tokens"] >= logs[0]["step_sequences"]


@pytest.mark.integration
def test_saved_model_reloads(workdir):
    root, models, data = workdir
    out = root / "out_reload"
    trainer = train.main(argv_for(models["chatglm"], data, str(out), "pack", "--max_steps", "2", "--pack_loss"))
    from transformers import AutoModelForCausalLM
    reloaded = AutoModelForCausalLM.from_pretrained(str(out), trust_remote_code=True)  # the code it ships
    assert type(reloaded).__name__ == "ChatGLMForConditionalGeneration"
    assert type(reloaded).__module__.startswith("transformers_modules.")  # not this package's module
    trained = trainer.model.state_dict()
    for name, value in reloaded.state_dict().items():
        assert torch.equal(value, trained[name]), name


@pytest.mark.integration
@pytest.mark.parametrize("method", ["pack", "naive"])
def test_resume_continues_at_the_next_batch(workdir, method):
    root, models, data = workdir
    common = ["--max_steps", "4", "--gradient_accumulation_steps", "2", "--save_strategy", "steps",
              "--save_steps", "2"]
    straight = root / f"straight_{method}"
    train.main(argv_for(models["chatglm"], data, str(straight), method, *common))
    resumed = root / f"resumed_{method}"
    train.main(argv_for(models["chatglm"], data, str(resumed), method, *common,
                        "--resume_from_checkpoint", str(straight / "checkpoint-2")))
    from safetensors.torch import load_file
    a, b = load_file(straight / "model.safetensors"), load_file(resumed / "model.safetensors")
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-6, atol=1e-7, msg=name)
    start = load_file(Path(models["chatglm"]) / "model.safetensors")
    assert any(not torch.equal(start[n], a[n]) for n in a)  # it did train


# ---------- loss normalisation: reference, world size 1 x GA 4, world size 2 x GA 2 ----------
INVARIANCE_CASES = [("pack", "sequence"), ("pack", "pack_mean"), ("pack", "token"), ("sort", "sequence"),
                    ("sort", "token")]


class GradCapture:
    """TrainerCallback recording the summed-over-micro-steps gradients before the optimizer step."""

    def __new__(cls, model):
        from transformers import TrainerCallback

        class _Capture(TrainerCallback):
            grads = None

            def on_pre_optimizer_step(self, args, state, control, **kwargs):
                self.grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
        return _Capture()


def run_one_step(spec: dict, method: str, reduction: str, world: int, *extra: str) -> dict:
    """One optimizer step over the first 4 rows; returns grads, loss, rows seen by this rank."""
    ga = 4 // world
    argv = argv_for(spec["model"], spec["data"], os.path.join(spec["out"], f"{method}_{reduction}_{world}"),
                    method, "--max_steps", "1", "--gradient_accumulation_steps", str(ga),
                    "--loss_reduction", reduction, "--max_grad_norm", "0",
                    *(["--ddp_backend", "gloo"] if world > 1 else []), *extra)
    trainer = train.build_trainer(argv)
    capture = GradCapture(trainer.model)
    trainer.add_callback(capture)
    seen, collate = [], trainer.data_collator
    trainer.data_collator = lambda rows: (seen.extend(r["input_ids"] for r in rows), collate(rows))[1]
    trainer.train()
    loss = [e["loss"] for e in trainer.state.log_history if "loss" in e][0]
    return {"grads": capture.grads, "loss": loss, "seen": seen, "rank": trainer.args.process_index}


def reference_step(model_dir: str, data: str, method: str, reduction: str) -> tuple[float, dict]:
    """The step loss written out from per-sequence token means (model run on each sequence alone)."""
    import datasets
    model = load_training_model(model_dir, dtype=torch.float32)
    rows = datasets.load_from_disk(os.path.join(data, method)).select(range(4))
    packs = []
    for row in rows:
        cu = row.get("cu_seqlens") or [0, len(row["input_ids"])]
        packs.append([(row["input_ids"][a:b], row["labels"][a:b]) for a, b in zip(cu[:-1], cu[1:])])
    terms = []  # (pack index, N_k, mean token loss of sequence k)
    for p, pack in enumerate(packs):
        for ids, labels in pack:
            n = sum(1 for t in labels[1:] if t != X)
            if n:
                out = model(torch.tensor([ids]), labels=torch.tensor([labels]))
                terms.append((p, n, out.loss))
    if reduction == "sequence":
        loss = sum(m for _, _, m in terms) / len(terms)
    elif reduction == "token":
        loss = sum(n * m for _, n, m in terms) / sum(n for _, n, _ in terms)
    else:
        per_pack = [sum(n * m for q, n, m in terms if q == p) / sum(n for q, n, _ in terms if q == p)
                    for p in sorted({q for q, _, _ in terms})]
        loss = sum(per_pack) / len(per_pack)
    loss.backward()
    return loss.item(), {n: p.grad.detach().clone() for n, p in model.named_parameters()}


def relative_error(a: dict, b: dict) -> float:
    diff = torch.sqrt(sum(((a[n] - b[n]) ** 2).sum() for n in b))
    return float(diff / torch.sqrt(sum((b[n] ** 2).sum() for n in b)))


# ---------- one torchrun launch for the distributed cases of the suite ----------
LAUNCH_TIMEOUT_S = 900  # the whole launch, every case
_LAUNCHES: dict = {}


class TorchrunLaunch:
    """The distributed tests' cases run in one torchrun launch (the project's rule for them).

    Every test module defining `launch_cases(items, folder)` (this one,
    test_original_training_rules.py, test_sequence_parallel.py) gives the cases of its selected
    tests, each with the inputs it built; one torchrun of max(world size) processes runs them all,
    one after the other (worker_main below), and each test checks its own cases' rank results, so
    failures are still reported case by case.
    """

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
    """One torchrun of max(world size) processes running `cases` (worker_main); its output."""
    spec_file.write_text(json.dumps({"cases": cases}))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(max(c["world"] for c in cases)),
           "--master_port", str(free_port()), __file__, "worker", str(spec_file)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests")]), "DS_ACCELERATOR": "cpu"}
    try:
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=LAUNCH_TIMEOUT_S)
    except subprocess.TimeoutExpired as expired:
        out = "".join(x.decode() if isinstance(x, bytes) else x for x in (expired.stdout or "", expired.stderr or ""))
        return f"launch of {[c['name'] for c in cases]} timed out after {LAUNCH_TIMEOUT_S} s\n{out[-9000:]}"
    return (f"launch of {[c['name'] for c in cases]}: exit code {proc.returncode}\n"
            f"{proc.stdout[-3000:]}{proc.stderr[-6000:]}")


@contextlib.contextmanager
def case_process_group(case: dict, launch_store):
    """Rank r < case['world'] of the launch as rank r of a launch of case['world'] processes: the
    environment such a launch gives (a store of the case's own, hosted by rank 0, its port passed on
    through the launch's store), so accelerate / DeepSpeed start the process group from it as in
    that launch. After the case: its process group closed, and the state DeepSpeed, accelerate and
    transformers keep about it (group references, singletons, the DeepSpeed config, the attention
    registry, where Ulysses wraps the core attention) and the environment put back, so the next
    case starts as in a fresh process."""
    from accelerate.state import AcceleratorState, GradientState
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    rank, name = os.environ["RANK"], case["name"]
    environ, attention = dict(os.environ), dict(ALL_ATTENTION_FUNCTIONS._local_mapping)
    server = None
    if rank == "0":
        server = torch.distributed.TCPStore(os.environ["MASTER_ADDR"], 0, is_master=True, wait_for_workers=False,
                                            timeout=timedelta(seconds=LAUNCH_TIMEOUT_S))
        launch_store.set(f"{name}/port", str(server.port))
    world = str(case["world"])
    os.environ.update(WORLD_SIZE=world, LOCAL_WORLD_SIZE=world, GROUP_WORLD_SIZE=world, ROLE_WORLD_SIZE=world,
                      MASTER_PORT=launch_store.get(f"{name}/port").decode())
    yield
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        deepspeed_comm = sys.modules.get("deepspeed.comm.comm")
        if deepspeed_comm is not None and deepspeed_comm.cdb is not None:
            deepspeed_comm.destroy_process_group()  # also drops DeepSpeed's group references (SP groups too)
        else:
            torch.distributed.destroy_process_group()
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    if "deepspeed" in sys.modules:
        from transformers.integrations.deepspeed import unset_hf_deepspeed_config
        unset_hf_deepspeed_config()
    ALL_ATTENTION_FUNCTIONS._local_mapping.clear()
    ALL_ATTENTION_FUNCTIONS._local_mapping.update(attention)
    os.environ.clear()
    os.environ.update(environ)
    launch_store.set(f"{name}/done/{rank}", "1")
    if server is not None:  # rank 0 hosts the case's store: until every rank is done with it
        launch_store.wait([f"{name}/done/{r}" for r in range(case["world"])])


def worker_main(spec_file: str) -> None:
    """Every case of the spec, one after the other: a case of world size W runs on ranks 0..W-1
    (`run_launch_case` of its module), the other ranks skip it. A case that raises leaves its
    traceback in its folder and ends the launch."""
    spec = json.loads(Path(spec_file).read_text())
    rank = int(os.environ["RANK"])
    launch_store = torch.distributed.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]),
                                              is_master=False, timeout=timedelta(seconds=LAUNCH_TIMEOUT_S))
    gc.freeze()  # as frozen_gc does in a test process; again after each case, for what it imported
    for case in spec["cases"]:
        if rank >= case["world"]:
            continue
        try:
            with case_process_group(case, launch_store):
                result = importlib.import_module(case["module"]).run_launch_case(case)
                torch.save(result, os.path.join(case["out"], f"rank{result['rank']}.pt"))
            gc.collect()
            gc.freeze()
        except BaseException:
            Path(case["out"], f"error_rank{rank}.txt").write_text(traceback.format_exc())
            raise


def step_case(name: str, model: str, data: str, out: Path, method: str, reduction: str, world: int,
              *extra: str) -> dict:
    """A launch case running run_one_step on `world` ranks."""
    return {"module": "test_train", "name": name, "model": model, "data": data, "out": str(out / name),
            "method": method, "reduction": reduction, "world": world, "extra": list(extra)}


def run_launch_case(case: dict) -> dict:
    return run_one_step(case, case["method"], case["reduction"], case["world"], *case["extra"])


# ---------- loss normalisation: the invariance test (its two-rank runs in the launch) ----------
INVARIANCE_TEST = "test_gradients_are_invariant_to_world_size_and_accumulation"


def launch_cases(items, folder: Path) -> list[dict]:
    """The two-rank runs of the invariance test, on the inputs `workdir` builds (chatglm, 48 sequences)."""
    if not any(getattr(item, "originalname", "") == INVARIANCE_TEST for item in items):
        return []
    model = make_model_dir(folder / "model_chatglm", "chatglm")
    data = make_train_file(folder / "data", make_sequences(48), group_size=2)
    return [step_case(f"invariance-{method}-{reduction}", model, data, folder, method, reduction, 2)
            for method, reduction in INVARIANCE_CASES]


@pytest.mark.distributed
@pytest.mark.integration
@pytest.mark.subprocess
def test_gradients_are_invariant_to_world_size_and_accumulation(torchrun_launch, tmp_path):
    import datasets
    for method, reduction in INVARIANCE_CASES:
        launched = torchrun_launch.case(f"invariance-{method}-{reduction}")
        model, data = launched["model"], launched["data"]
        spec = {"model": model, "data": data, "out": str(tmp_path)}
        ref_loss, ref_grads = reference_step(model, data, method, reduction)
        single = run_one_step(spec, method, reduction, world=1)
        ranks = torchrun_launch.ranks(launched["name"])
        case = f"{method}/{reduction}"
        assert relative_error(single["grads"], ref_grads) < 1e-5, case
        assert relative_error(ranks[0]["grads"], ref_grads) < 1e-5, case
        assert relative_error(ranks[1]["grads"], ranks[0]["grads"]) < 1e-6, case
        assert abs(single["loss"] - ref_loss) < 1e-5 * abs(ref_loss) + 1e-6, case
        assert abs(ranks[0]["loss"] - ref_loss) < 1e-5 * abs(ref_loss) + 1e-6, case
        # stored order: micro-step j gives rank r row 2j + r; world size 1 reads rows 0..3
        # (accelerate's loader collates one batch ahead: only the first ones were trained on)
        stored = datasets.load_from_disk(os.path.join(data, method))["input_ids"][:4]
        assert single["seen"][:4] == stored, case
        assert ranks[0]["seen"][:2] == [stored[0], stored[2]], case
        assert ranks[1]["seen"][:2] == [stored[1], stored[3]], case


# ---------- arguments and layout errors ----------
def test_default_reductions_reproduce_the_paper_rows():
    assert resolve_loss_reduction("pack", True, None) == "sequence"
    assert resolve_loss_reduction("pack", False, None) == "pack_mean"
    assert resolve_loss_reduction("sort", False, None) == "sequence"
    assert resolve_loss_reduction("naive", False, None) == "sequence"
    assert resolve_loss_reduction("pack", False, "token") == "token"
    with pytest.raises(ValueError, match="pack_loss"):
        resolve_loss_reduction("sort", True, None)
    with pytest.raises(ValueError, match="pack_loss"):
        resolve_loss_reduction("pack", True, "token")


@pytest.mark.integration
def test_group_size_must_be_a_multiple_of_world_size_times_batch(workdir):
    assert check_data_parallel_layout(8, 8, 1) == 1
    assert check_data_parallel_layout(8, 2, 2) == 2
    with pytest.raises(ValueError, match="group_size 8 .* world size 3"):
        check_data_parallel_layout(8, 3, 1)
    root, models, data = workdir
    with pytest.raises(ValueError, match="group_size 2"):
        train.build_trainer(argv_for(models["chatglm"], data, str(root / "bad"), "sort",
                                     "--per_device_train_batch_size", "3"))


@pytest.mark.integration
def test_missing_sorted_dataset_is_a_clear_error(workdir, tmp_path):
    root, models, _ = workdir
    save_dataset({"input_ids": [[1, 2]], "labels": [[X, 2]]}, tmp_path / "only_naive")
    with pytest.raises(FileNotFoundError, match="sort_and_group.py"):
        train.build_trainer(argv_for(models["chatglm"], str(tmp_path / "only_naive"), str(tmp_path / "o"), "pack"))



@pytest.mark.slow
def test_bench_train_step_smoke(tmp_path):
    """The script's main in this process (its command line's path): the JSON it writes to --out."""
    import bench_train_step
    with torch.random.fork_rng(devices=[]):  # the bench seeds torch's global generator
        bench_train_step.main(["--smoke", "--out", str(tmp_path / "b.json")])
    result = json.loads((tmp_path / "b.json").read_text())
    assert result["loss_finite"] and result["tokens_per_s"] > 0 and 0 < result["mfu"] < 1
    assert result["tokens_per_step"] <= 512 and result["model_tflops_per_step"] > 0


@pytest.mark.integration
def test_recompute_policy_gives_the_same_step(workdir, tmp_path):
    """--recompute selective (attention kept, the rest recomputed), full and offload: the same gradients
    and loss as plain training, through train.py's own path."""
    root, models, data = workdir
    spec = {"model": models["llama"], "data": data, "out": str(tmp_path)}
    plain = run_one_step(spec, "pack", "sequence", 1)
    for policy in ("selective", "full:1", "offload"):
        spec["out"] = str(tmp_path / policy.replace(":", "_"))
        policied = run_one_step(spec, "pack", "sequence", 1, "--recompute", policy)
        assert relative_error(policied["grads"], plain["grads"]) <= 1e-6, policy
        assert policied["loss"] == pytest.approx(plain["loss"], rel=1e-6)
    trainer = train.build_trainer(argv_for(models["llama"], data, str(tmp_path / "o"), "pack",
                                           "--recompute", "selective", "--gradient_checkpointing"))
    from longalign.ops.recompute import decoder_layers
    assert all("forward" in vars(layer) for layer in decoder_layers(trainer.model))  # wrapped
    assert not trainer.args.gradient_checkpointing  # transformers' checkpointing stays off


if __name__ == "__main__" and len(sys.argv) == 3 and sys.argv[1] == "worker":
    worker_main(sys.argv[2])
