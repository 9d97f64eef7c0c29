"""train.py + LongAlignTrainer on tiny random models (CPU).

Invariance runs `torchrun --nproc_per_node 2 tests/test_train.py worker SPEC` (gloo): this file is
also the worker script, so both sides run the same build_trainer -> Trainer.train code path.
"""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]

import train
from longalign.constants import IGNORE_INDEX as X
from longalign.modeling.checkpoints import make_self_describing
from longalign.modeling.configuration_chatglm import ChatGLMConfig
from longalign.modeling.loading import load_training_model
from longalign.modeling.modeling_chatglm import ChatGLMForConditionalGeneration
from longalign.train.trainer import check_data_parallel_layout, close_process_group, resolve_loss_reduction
from transformers import LlamaConfig, LlamaForCausalLM

VOCAB = 64
PATTERN = [5, 6, 7, 8]
FAMILIES = ["chatglm", "llama"]


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


def worker_main(spec_file: str) -> None:
    spec = json.loads(Path(spec_file).read_text())
    for method, reduction in INVARIANCE_CASES:
        result = run_one_step(spec, method, reduction, world=2)
        torch.save(result, os.path.join(spec["out"], f"{method}_{reduction}_rank{result['rank']}.pt"))
    close_process_group()


def relative_error(a: dict, b: dict) -> float:
    diff = torch.sqrt(sum(((a[n] - b[n]) ** 2).sum() for n in b))
    return float(diff / torch.sqrt(sum((b[n] ** 2).sum() for n in b)))


@pytest.mark.distributed
@pytest.mark.integration
@pytest.mark.subprocess
def test_gradients_are_invariant_to_world_size_and_accumulation(workdir, tmp_path):
    import datasets
    root, models, data = workdir
    spec = {"model": models["chatglm"], "data": data, "out": str(tmp_path)}
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                "--master_port", str(29500 + os.getpid() % 1000)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run(torchrun + [__file__, "worker", str(tmp_path / "spec.json")], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    for method, reduction in INVARIANCE_CASES:
        ref_loss, ref_grads = reference_step(models["chatglm"], data, method, reduction)
        single = run_one_step(spec, method, reduction, world=1)
        ranks = [torch.load(tmp_path / f"{method}_{reduction}_rank{r}.pt") for r in (0, 1)]
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
@pytest.mark.subprocess
def test_bench_train_step_smoke(tmp_path):
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "bench_train_step.py"), "--smoke", "--out",
                           str(tmp_path / "b.json")], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "b.json").read_text())
    assert result["loss_finite"] and result["tokens_per_s"] > 0 and 0 < result["mfu"] < 1
    assert result["tokens_per_step"] <= 512 and result["model_tflops_per_step"] > 0

if __name__ == "__main__" and len(sys.argv) == 3 and sys.argv[1] == "worker":
    worker_main(sys.argv[2])


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
