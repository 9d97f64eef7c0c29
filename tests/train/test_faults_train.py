"""Issue 15, training stage: train.py (in-process, through its main(argv)) on a tiny ChatGLM, with
resumes from incomplete checkpoints or on other data, used output folders, a corrupt pack row and
a sort/pack pair from two sort_and_group.py runs (one of them killed: a real SIGKILL of a real
process). Items 4, 5, 7, 8 of the issue; the exact-resume case the audit found sound stays in
test_train.py (test_resume_continues_at_the_next_batch).
Issue 25: a diverging run (a learning rate that blows up) stops naming the step, or skips and
counts its steps on request, and never saves NaN weights. That run is train.py's one subprocess:
its exit code and stderr, as a user sees them."""
import json
import math
import re
import shutil
from pathlib import Path

import datasets
import pytest
import torch
from safetensors.torch import load_file

from helpers.faults_support import REPO, isolated_process_state, kill_at, process_state_restored, run_cli
from longalign import fault_points
from longalign.train.divergence import DivergenceGuard, TrainingDiverged, check_nan_policy
from longalign.constants import IGNORE_INDEX
from longalign.data.validation import DatasetValidationError
from longalign.train.run_state import RunStateError
from sort_and_group import sort_and_group
from helpers.train_runs import VOCAB, argv_for, make_model_dir, make_sequences
from train import main as train_main
from helpers.training_models import tiny_llama

SAVE = ["--save_strategy", "steps", "--save_steps", "2"]
pytestmark = pytest.mark.usefixtures(isolated_process_state.__name__)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("faults_train")
    model = make_model_dir(root / "model", "chatglm")
    base = root / "base"
    sequences = make_sequences(24)
    datasets.Dataset.from_dict({"input_ids": [s for s, _ in sequences],
                                "labels": [lab for _, lab in sequences]}).save_to_disk(str(base))
    return root, model, base


def fresh_data(setup, tmp_path, seed=1) -> Path:
    _, _, base = setup
    data = shutil.copytree(base, tmp_path / "data")
    sort_and_group(data, 1, 64, "bfd", seed, "truncate")
    return data


def train(model, data, out, *extra):
    """train.py in-process (its main(argv)): the trainer; a refusal raises."""
    return train_main(argv_for(model, str(data), str(out), "pack", "--pack_loss", *map(str, extra)))


@pytest.fixture(scope="module")
def two_steps(setup, tmp_path_factory):
    """(data, out): seed-1 data and the run that saved checkpoint-2 of it; read-only, tests copy it."""
    root = tmp_path_factory.mktemp("two_steps")
    data, out = fresh_data(setup, root), root / "out"
    with process_state_restored():
        train(setup[1], data, out, "--max_steps", "2", *SAVE)
    return data, out


def copy_of(two_steps, tmp_path) -> tuple[Path, Path]:
    return tuple(shutil.copytree(src, tmp_path / src.name) for src in two_steps)


def steps_saved(out: Path) -> list[str]:
    return sorted(p.name for p in out.iterdir() if p.name.startswith("checkpoint-"))


# ---- 4. resume: complete checkpoints, same data ------------------------------------------------
@pytest.mark.integration
@pytest.mark.parametrize("removed", ["optimizer.pt", "scheduler.pt"])
def test_resume_from_a_checkpoint_without_optimizer_or_scheduler_state_is_refused(capsys, setup, two_steps, tmp_path,
                                                                                  removed):
    _, model, _ = setup
    data, out = copy_of(two_steps, tmp_path)
    (out / "checkpoint-2" / removed).unlink()
    capsys.readouterr()
    with pytest.raises(RunStateError, match=f"is incomplete for this run's settings: no {removed}"):
        train(model, data, out, "--max_steps", "4", *SAVE, "--resume_from_checkpoint", out / "checkpoint-2")
    assert steps_saved(out) == ["checkpoint-2"] and "'loss'" not in capsys.readouterr().out  # it never trained


@pytest.mark.integration
def test_resume_after_sort_and_group_was_rerun_with_another_seed_is_refused(capsys, setup, two_steps, tmp_path):
    _, model, _ = setup
    data, out = copy_of(two_steps, tmp_path)  # seed-1 data, checkpoint-2 of a run on it
    assert json.loads((out / "checkpoint-2" / "longalign_data.json").read_text())["stats"]["seed"] == 1
    sort_and_group(data, 1, 64, "bfd", 2, "truncate")
    resume = ["--max_steps", "4", *SAVE, "--resume_from_checkpoint", out / "checkpoint-2"]
    with pytest.raises(RunStateError, match=r"was trained on other data .*seed: 1 -> 2"):
        train(model, data, out, *resume)
    assert steps_saved(out) == ["checkpoint-2"]
    sort_and_group(data, 1, 64, "bfd", 1, "truncate")  # the data as it was: the resume goes through
    capsys.readouterr()
    train(model, data, out, *resume)
    assert "'loss'" in capsys.readouterr().out  # it trained (what the refusals' checks never see)
    assert steps_saved(out) == ["checkpoint-2", "checkpoint-4"]
    assert json.loads((out / "checkpoint-4" / "trainer_state.json").read_text())["global_step"] == 4


# ---- 5. a fresh run into another run's folder --------------------------------------------------
@pytest.mark.integration
def test_a_fresh_run_into_a_used_output_folder_is_refused_or_moves_the_old_run_aside(capsys, setup, tmp_path):
    _, model, _ = setup
    data, out = fresh_data(setup, tmp_path), tmp_path / "out"
    train(model, data, out, "--max_steps", "4", *SAVE)
    old_state = (out / "checkpoint-4" / "trainer_state.json").read_text()
    with pytest.raises(RunStateError, match=r"already holds checkpoint-2, checkpoint-4\b.*--resume_from_checkpoint"):
        train(model, data, out, "--max_steps", "2", *SAVE)
    assert steps_saved(out) == ["checkpoint-2", "checkpoint-4"]
    capsys.readouterr()
    train(model, data, out, "--max_steps", "2", *SAVE, "--overwrite_output_dir")
    [moved] = [p for p in out.iterdir() if p.name.startswith("replaced-")]
    assert f"moved to {moved}" in capsys.readouterr().out
    assert steps_saved(out) == ["checkpoint-2"] and steps_saved(moved) == ["checkpoint-2", "checkpoint-4"]
    assert (moved / "checkpoint-4" / "trainer_state.json").read_text() == old_state  # nothing lost


# ---- 7. a corrupt pack row ---------------------------------------------------------------------------
def corrupt_row(data: Path, row: int, change) -> None:
    pack = datasets.load_from_disk(str(data / "pack"))
    rows = pack.to_list()
    change(rows[row])
    stats = (data / "pack" / "stats.json").read_text()
    shutil.rmtree(data / "pack")
    datasets.Dataset.from_list(rows, features=pack.features).save_to_disk(str(data / "pack"))
    (data / "pack" / "stats.json").write_text(stats)


@pytest.mark.integration
@pytest.mark.parametrize("what, change, message", [
    ("collapsed cu_seqlens", lambda r: r.update(cu_seqlens=[0, len(r["input_ids"])]), "num_sequences differs"),
    ("token id >= vocab", lambda r: r["input_ids"].__setitem__(1, VOCAB), "input_ids outside"),
    ("labels shorter than ids", lambda r: r.update(labels=r["labels"][:-1]), "differ in length"),
])
def test_a_corrupt_pack_row_is_refused_before_the_first_step_by_its_dataset_row(capsys, setup, tmp_path, what,
                                                                                    change, message):
    _, model, _ = setup
    data = fresh_data(setup, tmp_path)
    row = next(i for i, r in enumerate(datasets.load_from_disk(str(data / "pack"))) if len(r["cu_seqlens"]) > 2)
    corrupt_row(data, row, change)
    capsys.readouterr()
    with pytest.raises(DatasetValidationError, match=f"pack: row {row}: .*{message}"):
        train(model, data, tmp_path / "out", "--max_steps", "2")
    assert "'loss'" not in capsys.readouterr().out


# ---- 8. sort/ and pack/ from different sort_and_group.py runs ------------------------------------------
@pytest.mark.subprocess
def test_train_refuses_a_sort_pack_pair_left_by_a_killed_sort_and_group(setup, tmp_path):
    _, model, _ = setup
    data = fresh_data(setup, tmp_path, seed=1)
    kill_at([REPO / "sort_and_group.py", "--train_file", data, "--group_size", "1", "--max_length", "64",
             "--seed", "2"], fault_points.BETWEEN_SORT_AND_PACK, tmp_path)
    for method in ("pack", "sort"):
        with pytest.raises(DatasetValidationError, match="come from different sort_and_group.py runs"):
            train_main(argv_for(model, str(data), str(tmp_path / method), method, "--max_steps", "1"))
        assert not (tmp_path / method).exists()


# ---- a diverging run ------------------------------------------------------------------
DIVERGING = ["--learning_rate", "1e30"]  # the second step's update makes every activation overflow


@pytest.mark.subprocess
def test_a_diverging_run_exits_nonzero_naming_the_step_and_saves_no_final_model(setup, tmp_path):
    """train.py's exit-code test: a subprocess, its exit code and stderr as a user sees them."""
    _, model, _ = setup
    data, out = fresh_data(setup, tmp_path), tmp_path / "out"
    done = run_cli([REPO / "train.py", *argv_for(model, str(data), str(out), "pack", "--pack_loss", "--max_steps",
                                                 "6", *SAVE, *DIVERGING)])
    found = re.search(r"TrainingDiverged: step (\d+): loss nan", done.stderr)
    assert done.returncode != 0 and found, done.stderr[-3000:]
    step = int(found.group(1))
    assert f"the last checkpoint is {out / 'checkpoint-2'}" in done.stderr and step in (3, 4)
    assert steps_saved(out) == ["checkpoint-2"] and not (out / "model.safetensors").exists()
    saved = load_file(out / "checkpoint-2" / "model.safetensors")
    assert all(torch.isfinite(value).all() for value in saved.values())


def test_nan_policy_skip_skips_and_counts_each_step_and_logs_its_loss_as_nan(setup, tmp_path):
    _, model, _ = setup
    data, out = fresh_data(setup, tmp_path), tmp_path / "out"
    trainer = train_main(argv_for(model, str(data), str(out), "pack", "--pack_loss", "--max_steps", "5",
                                  *DIVERGING, "--nan_policy", "skip"))
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    skipped = [entry["step"] for entry in logs if not math.isfinite(entry["loss"])]
    assert skipped and all(math.isnan(entry["loss"]) for entry in logs if entry["step"] in skipped)  # never 0
    assert [entry["nonfinite_steps_skipped"] for entry in logs] == [sum(s <= e["step"] for s in skipped) for e in logs]
    state = json.loads((out / "trainer_state.json").read_text())
    assert state["log_history"][-1]["nonfinite_steps_skipped"] == len(skipped) == trainer.divergence.skipped
    saved = load_file(out / "model.safetensors")  # the weights the skipped steps left alone: finite
    assert all(torch.isfinite(value).all() for value in saved.values())


@pytest.mark.parametrize("deepspeed, fp16, message", [("ds.json", False, "--deepspeed"), (None, True, "--fp16")])
def test_nan_policy_skip_is_refused_where_a_step_cannot_be_skipped(deepspeed, fp16, message):
    check_nan_policy("stop", deepspeed, fp16)
    with pytest.raises(ValueError, match=f"--nan_policy skip is not available with {message}"):
        check_nan_policy("skip", deepspeed, fp16)


def test_nan_weights_are_never_saved_as_a_checkpoint_or_final_model():
    from transformers import TrainerControl, TrainerState, TrainingArguments

    model = tiny_llama()
    guard = DivergenceGuard("stop", lambda m: 0.0, "cpu")
    state, control = TrainerState(global_step=7), TrainerControl()
    guard.on_step_end(TrainingArguments("unused", use_cpu=True), state, control, model=model)  # finite: no error
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[0, 0] = float("inf")
    guard.on_step_end(TrainingArguments("unused", use_cpu=True), state, control, model=model)  # no save this step
    control.should_save = True
    with pytest.raises(TrainingDiverged, match=r"step 7: checkpoint-7: the weights hold NaN/inf "
                                               r"\(model\.layers\.1\.mlp\.up_proj\.weight\); not saved"):
        guard.on_step_end(TrainingArguments("unused", use_cpu=True), state, control, model=model)
    with pytest.raises(TrainingDiverged, match="the final model: the weights hold NaN/inf"):
        guard.check_weights(model, "step 7: the final model")


# ---- a dataset without any target ------------------------------------------------------------------------
def test_train_refuses_a_dataset_without_any_target_naming_its_folder(setup, tmp_path):
    _, model, _ = setup
    no_targets = tmp_path / "no_targets"
    ids = [s for s, _ in make_sequences(4)]
    datasets.Dataset.from_dict({"input_ids": ids, "labels": [[IGNORE_INDEX] * len(s) for s in ids]}).save_to_disk(
        str(no_targets))
    with pytest.raises(DatasetValidationError, match=rf"{no_targets}: no row has a target token"):
        train_main(argv_for(model, str(no_targets), str(tmp_path / "out"), "naive", "--max_steps", "1"))
    assert not (tmp_path / "out" / "model.safetensors").exists()


@pytest.mark.parametrize("flag", ["--seed", "--data_seed"])
def test_a_negative_seed_is_refused_naming_its_flag(setup, tmp_path, flag):
    _, model, base = setup
    with pytest.raises(ValueError, match=rf"{flag} must be an integer in \[0, 2\*\*32\), got -1"):
        train_main(argv_for(model, str(base), str(tmp_path / "out"), "naive", flag, "-1"))
    assert not (tmp_path / "out").exists()
