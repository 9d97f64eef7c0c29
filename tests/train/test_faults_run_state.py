"""Issue 15 items 4-5, library level: checkpoint completeness, the data fingerprint, fresh output folders.

The completeness list is checked against a checkpoint HF Trainer really wrote (train.main on a tiny
model). DeepSpeed is not installed on the CPU test machine: its layout (`latest`, global_stepN/
with per-rank model / optimizer states) is checked on folders laid out as DeepSpeed's engine.py
names them (_get_ckpt_name, _get_zero_ckpt_name), not on a real DeepSpeed save.
train.py's use of these checks (exit codes, messages) is in test_faults_train.py."""
import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest

from longalign.train.run_state import (FINGERPRINT_FILE, RUN_MARKER, RunStateError, check_resume, check_same_data,
                                 data_fingerprint, main as run_state_main, missing_checkpoint_files,
                                 prepare_fresh_output_dir)
from helpers.train_runs import argv_for, make_model_dir, make_sequences, make_train_file


def settings(world_size=1, deepspeed=None, fp16=False, bf16=False):
    return SimpleNamespace(world_size=world_size, deepspeed=deepspeed, fp16=fp16, bf16=bf16)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A real HF Trainer checkpoint (checkpoint-2 of a 2-step pack run)."""
    import train

    root = tmp_path_factory.mktemp("run_state")
    model = make_model_dir(root / "model", "chatglm")
    data = make_train_file(root / "data", make_sequences(16), group_size=1)
    out = root / "out"
    train.main(argv_for(model, data, str(out), "pack", "--max_steps", "2", "--save_strategy", "steps",
                        "--save_steps", "2"))
    return root, Path(data), out / "checkpoint-2"


@pytest.mark.integration
def test_a_checkpoint_hf_trainer_wrote_is_complete_and_carries_the_fingerprint(trained):
    _, data, checkpoint = trained
    assert missing_checkpoint_files(checkpoint, settings()) == []
    saved = json.loads((checkpoint / FINGERPRINT_FILE).read_text())  # train.py's callback
    assert saved == data_fingerprint(data / "pack")


@pytest.mark.integration
@pytest.mark.parametrize("removed", ["optimizer.pt", "scheduler.pt", "rng_state.pth", "trainer_state.json",
                                     "model.safetensors"])
def test_a_checkpoint_without_a_file_hf_wrote_is_incomplete(trained, tmp_path, removed):
    _, data, checkpoint = trained
    copy = shutil.copytree(checkpoint, tmp_path / "checkpoint-2")
    (copy / removed).unlink()
    assert missing_checkpoint_files(copy, settings())
    with pytest.raises(RunStateError, match=rf"incomplete .*{removed.split('.')[0]}"):
        check_resume(copy, tmp_path / "new", settings(), data_fingerprint(Path(data) / "pack"))


@pytest.mark.integration
def test_other_world_size_and_fp16_need_their_own_files(trained):
    _, _, checkpoint = trained
    assert missing_checkpoint_files(checkpoint, settings(world_size=2)) == ["rng_state_0.pth", "rng_state_1.pth"]
    assert missing_checkpoint_files(checkpoint, settings(fp16=True)) == ["scaler.pt"]


def deepspeed_layout(folder: Path, stage: int, ranks: int, bf16: bool, scheduler_pt: bool = True) -> Path:
    folder.mkdir()
    (folder / "latest").write_text("global_step2")
    states = folder / "global_step2"
    states.mkdir()
    for rank in range(ranks):
        if stage == 3:
            (states / f"zero_pp_rank_{rank}_mp_rank_00_model_states.pt").write_bytes(b"")
        (states / f"{'bf16_' if bf16 else ''}zero_pp_rank_{rank}_mp_rank_00_optim_states.pt").write_bytes(b"")
    if stage != 3:
        (states / "mp_rank_00_model_states.pt").write_bytes(b"")
    names = ["trainer_state.json", *[f"rng_state_{r}.pth" for r in range(ranks)]] if ranks > 1 else \
        ["trainer_state.json", "rng_state.pth"]
    for name in names + (["scheduler.pt"] if scheduler_pt else []):
        (folder / name).write_bytes(b"")
    return folder


@pytest.mark.parametrize("stage, bf16", [(3, True), (3, False), (2, True), (1, False)])
def test_deepspeed_layouts(tmp_path, stage, bf16):
    config = {"zero_optimization": {"stage": stage}, "bf16": {"enabled": "auto"}}
    checkpoint = deepspeed_layout(tmp_path / "checkpoint-2", stage, 4, bf16)
    assert missing_checkpoint_files(checkpoint, settings(4, config, bf16=bf16)) == []
    assert missing_checkpoint_files(checkpoint, settings(8, config, bf16=bf16))  # ranks 4-7 missing
    assert missing_checkpoint_files(checkpoint, settings(2, config, bf16=bf16))[-1].startswith("(saved by 4 ranks")
    (checkpoint / "global_step2" / f"{'bf16_' if bf16 else ''}zero_pp_rank_3_mp_rank_00_optim_states.pt").unlink()
    assert "global_step2/[bf16_]zero_pp_rank_3_mp_rank_00_optim_states.pt" in missing_checkpoint_files(
        checkpoint, settings(4, config, bf16=bf16))
    (checkpoint / "latest").unlink()
    assert missing_checkpoint_files(checkpoint, settings(4, config, bf16=bf16)) == ["latest"]


def test_deepspeed_scheduler_pt_only_for_hf_schedulers(tmp_path):
    checkpoint = deepspeed_layout(tmp_path / "checkpoint-2", 3, 1, False, scheduler_pt=False)
    config = {"zero_optimization": {"stage": 3}}
    assert missing_checkpoint_files(checkpoint, settings(1, config)) == ["scheduler.pt"]
    assert missing_checkpoint_files(checkpoint, settings(1, {**config, "scheduler": {"type": "WarmupLR"}})) == []


@pytest.mark.integration
def test_resume_on_other_data_is_refused_naming_what_changed(trained, tmp_path):
    _, data, checkpoint = trained
    copy = shutil.copytree(checkpoint, tmp_path / "checkpoint-2")
    (copy / FINGERPRINT_FILE).unlink()  # as a checkpoint of an older train.py
    same = data_fingerprint(data / "pack")
    with pytest.raises(RunStateError, match=f"no {FINGERPRINT_FILE}"):
        check_same_data(copy, same)
    run_state_main(["stamp", str(copy), str(data / "pack")])
    check_same_data(copy, same)
    other = dict(same, data_sha256="0" * 64, stats={**(same["stats"] or {}), "seed": 7})
    with pytest.raises(RunStateError, match=r"other data .*seed: None -> 7|other data .*seed: \d+ -> 7"):
        check_same_data(copy, other)


@pytest.mark.integration
def test_later_checkpoints_in_the_output_folder_are_never_overwritten(trained, tmp_path):
    _, data, checkpoint = trained
    out = tmp_path / "out"
    copy = shutil.copytree(checkpoint, out / "checkpoint-2")
    (out / "checkpoint-4").mkdir()
    with pytest.raises(RunStateError, match="holds checkpoint-4, later than checkpoint-2"):
        check_resume(copy, out, settings(), data_fingerprint(data / "pack"))
    (out / "checkpoint-4").rmdir()
    check_resume(copy, out, settings(), data_fingerprint(data / "pack"))


def test_a_used_output_folder_is_refused_and_overwrite_moves_it_aside(tmp_path):
    out = tmp_path / "out"
    (out / "checkpoint-8").mkdir(parents=True)
    (out / "trainer_state.json").write_text("{}")
    with pytest.raises(RunStateError, match=r"checkpoint-8, trainer_state.json from another run.*"
                                            r"--resume_from_checkpoint .*checkpoint-8"):
        prepare_fresh_output_dir(out, False, [], {"run": 1})
    moved = prepare_fresh_output_dir(out, True, [], {"run": 2})
    assert moved.parent == out and moved.name.startswith("replaced-")
    assert sorted(p.name for p in moved.iterdir()) == ["checkpoint-8", "trainer_state.json"]
    assert sorted(p.name for p in out.iterdir()) == [RUN_MARKER, moved.name]
    assert json.loads((out / RUN_MARKER).read_text()) == {"run": 2}


def test_a_run_that_saved_nothing_does_not_block_its_rerun(tmp_path):
    prepare_fresh_output_dir(tmp_path / "out", False, [], {"run": 1})
    prepare_fresh_output_dir(tmp_path / "out", False, [], {"run": 2})  # only the marker was there
    assert json.loads((tmp_path / "out" / RUN_MARKER).read_text()) == {"run": 2}


def test_overwrite_never_moves_inputs_or_an_unrelated_folder(tmp_path):
    out = tmp_path / "out"
    (out / "checkpoint-2").mkdir(parents=True)
    with pytest.raises(RunStateError, match="holds inputs of this run"):
        prepare_fresh_output_dir(out, True, [out / "checkpoint-2"], {})
    home = tmp_path / "home"
    home.mkdir()
    (home / "thesis.tex").write_text("keep")
    with pytest.raises(RunStateError, match="not a training output"):
        prepare_fresh_output_dir(home, True, [], {})
    assert sorted(p.name for p in home.iterdir()) == ["thesis.tex"] and (out / "checkpoint-2").is_dir()


def test_an_output_path_that_is_a_file_or_unwritable_is_refused(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(RunStateError, match="is an existing file"):
        prepare_fresh_output_dir(tmp_path / "file", True, [], {})
    with pytest.raises(RunStateError, match="cannot write in --output_dir"):
        prepare_fresh_output_dir(tmp_path / "file" / "sub", False, [], {})


class RankArgs(SimpleNamespace):
    """The TrainingArguments members start_run reads, for one rank of a multi-process run."""

    def main_process_first(self, local=True, desc="work"):
        import contextlib

        self.waited.append((local, desc))
        return contextlib.nullcontext()


def test_only_the_saving_process_inspects_a_fresh_output_folder(tmp_path):
    """A non-saving rank must not read the folder the main rank is writing: a multi-process run
    once failed when rank 1 found rank 0's half-written run marker (its atomic temp file)."""
    from longalign.train.run_state import start_run

    data = tmp_path / "data"
    data.mkdir()
    out = tmp_path / "out"
    out.mkdir()
    (out / f"{RUN_MARKER}.tmp-abc123").write_text("{")  # the main rank mid-write
    other_rank = RankArgs(output_dir=str(out), resume_from_checkpoint=None, should_save=False,
                          save_on_each_node=False, waited=[])
    start_run(data, other_rank, overwrite=False, inputs=[], run_record={})
    assert other_rank.waited == [(False, "output folder check")]  # it waited for the main rank
    assert sorted(p.name for p in out.iterdir()) == [f"{RUN_MARKER}.tmp-abc123"]  # and touched nothing
    main_rank = RankArgs(**{**vars(other_rank), "should_save": True, "waited": []})
    with pytest.raises(RunStateError, match="already holds"):  # the main rank still checks
        start_run(data, main_rank, overwrite=False, inputs=[], run_record={})
