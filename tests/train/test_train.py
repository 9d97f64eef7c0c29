"""train.py + LongAlignTrainer on tiny random models (CPU).

The invariance test's two-rank runs are cases of the suite's one torchrun launch
(helpers.torchrun_cases, `torchrun --nproc_per_node N -m helpers.torchrun_worker SPEC`, gloo): the
worker and this file run the same build_trainer -> Trainer.train code path (helpers.train_runs).
"""
import json
import math
import os
from pathlib import Path

import pytest
import torch

import train
from helpers.torchrun_cases import items_of, step_case, torchrun_launch  # noqa: F401
from helpers.train_runs import (FAMILIES, argv_for, frozen_gc, make_model_dir, make_sequences,  # noqa: F401
                                make_train_file, one_torch_thread, reference_step, relative_error, run_one_step,
                                save_dataset)
from longalign.constants import IGNORE_INDEX as X
from longalign.train.trainer import check_data_parallel_layout, resolve_loss_reduction


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


# ---------- loss normalisation: reference, world size 1 x GA 4, world size 2 x GA 2 (in the launch) ----------
INVARIANCE_CASES = [("pack", "sequence"), ("pack", "pack_mean"), ("pack", "token"), ("sort", "sequence"),
                    ("sort", "token")]
INVARIANCE_TEST = "test_gradients_are_invariant_to_world_size_and_accumulation"


def launch_cases(items, folder: Path) -> list[dict]:
    """The two-rank runs of the invariance test, on the inputs `workdir` builds (chatglm, 48 sequences)."""
    if not items_of(items, INVARIANCE_TEST):
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

