"""A training run's output folder and resuming: fresh runs never mix, resumes are exact or refused.

Fresh run (no --resume_from_checkpoint), `prepare_fresh_output_dir`:
- the output folder is missing or empty (or holds only the RUN_MARKER of a run that saved
  nothing): used;
- it holds anything else (another run's checkpoint-8, model files...): refused, naming what is
  there and what to do (resume from its last checkpoint, another --output_dir, or
  --overwrite_output_dir);
- --overwrite_output_dir never deletes: the previous run's entries are *moved* into
  `<output_dir>/replaced-<UTC time>/` (printed; delete it yourself when you are sure), so no old
  checkpoint is ever beside a new one (HF's resume-from-last and checkpoint rotation look at
  `checkpoint-*` at the top level only). Refused, even then, when the folder holds an input of the
  run (model, data, tokenizer) or does not look like a training output (no RUN_MARKER,
  trainer_state.json or checkpoint-*).

Resume (`check_resume`), before the model is loaded:
- the checkpoint holds every file HF Trainer writes for this run's settings
  (`missing_checkpoint_files`: trainer_state.json, optimizer.pt, scheduler.pt, scaler.pt under
  fp16, rng_state.pth / rng_state_<rank>.pth for every rank, the model weights; under DeepSpeed
  `latest`, its global_step folder with every rank's model/optimizer states, scheduler.pt unless
  the DeepSpeed config has its own scheduler);
- the data is the data it was trained on: FINGERPRINT_FILE, saved in every checkpoint by
  `DataFingerprintCallback`, holds the sha256 of the dataset's Arrow files and its stats.json;
  another digest is refused (the message lists the stats that changed, e.g. seed 1 -> 2);
- the output folder holds no checkpoint later than the resumed one (it would be overwritten).
"""
from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path

from longalign.storage import data_files_digest, write_json_atomic

RUN_MARKER = "longalign_run.json"  # written by a fresh run before training: "this is a training output"
FINGERPRINT_FILE = "longalign_data.json"  # in every checkpoint: the data it was trained on
REPLACED_PREFIX = "replaced-"
TRAINER_STATE = "trainer_state.json"
MODEL_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                 "pytorch_model.bin.index.json")
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
_LISTED = 5


class RunStateError(ValueError):
    """A training output folder or checkpoint that train.py refuses; the message says what to do."""


def _listing(names: list[str]) -> str:
    return ", ".join(names[:_LISTED]) + (f" and {len(names) - _LISTED} more" if len(names) > _LISTED else "")


def checkpoints_in(folder: Path) -> list[tuple[int, str]]:
    """(step, name) of the checkpoint-N folders directly in `folder`, by step."""
    found = [(int(m.group(1)), name) for name in os.listdir(folder)
             if (m := _CHECKPOINT.match(name)) and (folder / name).is_dir()]
    return sorted(found)


# ---- the data fingerprint -------------------------------------------------------------------
def data_fingerprint(dataset_dir: str | os.PathLike) -> dict:
    """What identifies the training data: its Arrow files' sha256 and its stats.json."""
    dataset_dir = Path(dataset_dir)
    stats_file = dataset_dir / "stats.json"
    stats = json.loads(stats_file.read_text(encoding="utf-8")) if stats_file.is_file() else None
    return {"dataset": str(dataset_dir.resolve()), "data_sha256": data_files_digest(dataset_dir), "stats": stats}


def _stats_changes(saved: dict | None, current: dict | None) -> list[str]:
    saved, current = saved or {}, current or {}
    return [f"{key}: {saved.get(key)!r} -> {current.get(key)!r}" for key in sorted(set(saved) | set(current))
            if saved.get(key) != current.get(key)]


def check_same_data(checkpoint: Path, current: dict) -> None:
    """Refuse to resume `checkpoint` on data other than the data it was trained on."""
    record_file = checkpoint / FINGERPRINT_FILE
    if not record_file.is_file():
        raise RunStateError(
            f"{checkpoint} has no {FINGERPRINT_FILE} (saved by an older train.py, or its save was cut short): "
            "the data it was trained on cannot be checked. If you are sure the data is the same, write it with "
            f"`python -m longalign.train.run_state stamp {checkpoint} DATASET_DIR`; or start from its weights "
            f"(--model_name_or_path {checkpoint}) in a new --output_dir")
    saved = json.loads(record_file.read_text(encoding="utf-8"))
    if saved.get("data_sha256") == current["data_sha256"]:
        return
    changes = _stats_changes(saved.get("stats"), current["stats"])
    raise RunStateError(
        f"{checkpoint} was trained on other data than {current['dataset']} now holds (Arrow files differ"
        f"{'; stats.json: ' + _listing(changes) if changes else ''}); resuming would continue on different "
        f"rows. Rebuild the data as it was (its stats.json is in {record_file}), or start from the checkpoint's "
        f"weights (--model_name_or_path {checkpoint}) in a new --output_dir")


def write_fingerprint(checkpoint: str | os.PathLike, fingerprint: dict) -> None:
    write_json_atomic(Path(checkpoint) / FINGERPRINT_FILE, fingerprint)


def fingerprint_callback(fingerprint: dict):
    """A TrainerCallback that saves `fingerprint` into every checkpoint (world process 0)."""
    from transformers import TrainerCallback

    class DataFingerprintCallback(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            if state.is_world_process_zero:
                write_fingerprint(Path(args.output_dir) / f"checkpoint-{state.global_step}", fingerprint)

    return DataFingerprintCallback()


# ---- checkpoint completeness ---------------------------------------------------------------------
def _deepspeed_config(deepspeed) -> dict | None:
    if not deepspeed:
        return None
    if isinstance(deepspeed, dict):
        return deepspeed
    return json.loads(Path(deepspeed).read_text(encoding="utf-8"))


def _deepspeed_missing(checkpoint: Path, config: dict, world_size: int, bf16: bool) -> list[str]:
    """DeepSpeed's own layout: `latest` -> tag folder -> per-rank model / optimizer states."""
    latest = checkpoint / "latest"
    if not latest.is_file():
        return ["latest"]
    tag = latest.read_text().strip()
    if not (checkpoint / tag).is_dir():
        return [f"{tag}/"]
    stage = int((config.get("zero_optimization") or {}).get("stage", 0) or 0)
    names = set(os.listdir(checkpoint / tag))
    ranks = range(world_size)
    expected = ([f"zero_pp_rank_{r}_mp_rank_00_model_states.pt" for r in ranks] if stage == 3
                else ["mp_rank_00_model_states.pt"])
    missing = [f"{tag}/{name}" for name in expected if name not in names]
    bf16_setting = (config.get("bf16") or {}).get("enabled", False)
    if stage >= 1 or (bf16 if bf16_setting == "auto" else bool(bf16_setting)):  # DeepSpeed's bf16 optimizer
        missing += [f"{tag}/[bf16_]zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in ranks
                    if not {f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt",
                            f"bf16_zero_pp_rank_{r}_mp_rank_00_optim_states.pt"} & names]
    if stage >= 1:
        saved_ranks = {n for n in names if n.endswith("_optim_states.pt")}
        if len(saved_ranks) > world_size:
            missing.append(f"(saved by {len(saved_ranks)} ranks, resumed on {world_size}: DeepSpeed needs the same)")
    return missing


def missing_checkpoint_files(checkpoint: str | os.PathLike, training_args) -> list[str]:
    """The files HF Trainer (and DeepSpeed) write for these settings that `checkpoint` lacks."""
    checkpoint = Path(checkpoint)
    names = set(os.listdir(checkpoint))
    world = training_args.world_size
    required = [TRAINER_STATE]
    required += ["rng_state.pth"] if world == 1 else [f"rng_state_{r}.pth" for r in range(world)]
    config = _deepspeed_config(training_args.deepspeed)
    if config is None:
        required += ["optimizer.pt", "scheduler.pt"] + (["scaler.pt"] if training_args.fp16 else [])
        missing = [name for name in required if name not in names]
        if not names & set(MODEL_WEIGHTS):
            missing.append("model weights (model.safetensors or an index)")
        return missing
    if "scheduler" not in config:  # HF's own scheduler next to a DeepSpeed optimizer
        required.append("scheduler.pt")
    return [name for name in required if name not in names] + _deepspeed_missing(checkpoint, config, world,
                                                                                 training_args.bf16)


# ---- the output folder ----------------------------------------------------------------------------
def _is_inside(path, folder: Path) -> bool:
    if path is None or not os.path.lexists(path):
        return False
    path = Path(path).resolve()
    return path == folder or folder in path.parents


def _entries_of_a_previous_run(output_dir: Path) -> list[str]:
    return sorted(name for name in os.listdir(output_dir) if name != RUN_MARKER)


def _move_aside(output_dir: Path, entries: list[str]) -> Path:
    target = output_dir / f"{REPLACED_PREFIX}{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}"
    target.mkdir()
    for name in entries + ([RUN_MARKER] if (output_dir / RUN_MARKER).exists() else []):
        os.rename(output_dir / name, target / name)
    return target


def prepare_fresh_output_dir(output_dir: str | os.PathLike, overwrite: bool, inputs: list,
                             run_record: dict) -> Path | None:
    """Check and prepare the folder of a fresh run (module doc); the saving process only
    (`start_run`).

    Returns where a previous run was moved to (--overwrite_output_dir), else None. Writes
    RUN_MARKER (`run_record`: what this run trains on).
    """
    output_dir = Path(output_dir).resolve()
    if os.path.lexists(output_dir) and not output_dir.is_dir():
        raise RunStateError(f"--output_dir {output_dir} is an existing file, not a folder: choose another path")
    previous = _entries_of_a_previous_run(output_dir) if output_dir.is_dir() else []
    moved = None
    if previous:
        steps = [name for _, name in checkpoints_in(output_dir)]
        if not overwrite:
            hint = f"resume with --resume_from_checkpoint {output_dir / steps[-1]}, " if steps else ""
            raise RunStateError(
                f"--output_dir {output_dir} already holds {_listing(previous)} from another run; a new run there "
                f"would mix with it. {hint}choose another --output_dir, or pass --overwrite_output_dir to move "
                f"the old entries into {output_dir / (REPLACED_PREFIX + '<time>')}/ (nothing is deleted)")
        looks_trained = (output_dir / RUN_MARKER).exists() or (output_dir / TRAINER_STATE).exists() or steps
        if not looks_trained:
            raise RunStateError(f"--output_dir {output_dir} holds {_listing(previous)} but is not a training "
                                "output (no trainer_state.json, checkpoint-* or " + RUN_MARKER + "): choose "
                                "another --output_dir (--overwrite_output_dir only moves a previous run aside)")
        held = [str(p) for p in inputs if _is_inside(p, output_dir)]
        if held:
            raise RunStateError(f"--output_dir {output_dir} holds inputs of this run ({_listing(held)}): choose "
                                "another --output_dir (not even --overwrite_output_dir moves a run's inputs)")
        moved = _move_aside(output_dir, previous)
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        write_json_atomic(output_dir / RUN_MARKER, run_record)
    except OSError as err:
        raise RunStateError(f"cannot write in --output_dir {output_dir} ({err.strerror}): train.py checks "
                            "this before it loads the model; choose a writable --output_dir") from err
    return moved


def check_resume(checkpoint: str | os.PathLike, output_dir: str | os.PathLike, training_args,
                 fingerprint: dict) -> None:
    """Refuse an incomplete checkpoint, other data, or later checkpoints that would be overwritten."""
    checkpoint, output_dir = Path(checkpoint).resolve(), Path(output_dir).resolve()
    if not checkpoint.is_dir():
        raise RunStateError(f"--resume_from_checkpoint {checkpoint}: no such checkpoint folder")
    missing = missing_checkpoint_files(checkpoint, training_args)
    if missing:
        raise RunStateError(
            f"{checkpoint} is incomplete for this run's settings: no {_listing(missing)} (saved with "
            "--save_only_model, by another world size or DeepSpeed setting, or its save was cut short). "
            "Resuming would restart optimizer / scheduler / RNG state silently: resume from a complete "
            f"checkpoint, or start from its weights (--model_name_or_path {checkpoint}) in a new --output_dir")
    check_same_data(checkpoint, fingerprint)
    match = _CHECKPOINT.match(checkpoint.name)
    if checkpoint.parent == output_dir and match and output_dir.is_dir():
        later = [name for step, name in checkpoints_in(output_dir) if step > int(match.group(1))]
        if later:
            raise RunStateError(f"--output_dir {output_dir} holds {_listing(later)}, later than {checkpoint.name} "
                                "you resume from: the resumed run would overwrite them. Resume from the last "
                                "one, or move the later ones away first")


def start_run(dataset_dir, training_args, overwrite: bool, inputs: list, run_record: dict) -> dict:
    """train.py's checks before the model loads; returns the data fingerprint for the checkpoints.

    Resume: `check_resume` (every process; it only reads); a fresh run, or a resume into another
    output folder: `prepare_fresh_output_dir` on the process that saves, while the others wait
    (`TrainingArguments.main_process_first`), so no process ever inspects the folder while the
    main one is writing its marker or moving a previous run aside. If the main process refuses the
    folder it exits with the error and the launcher stops the others.
    """
    fingerprint = data_fingerprint(dataset_dir)
    output_dir, resume = Path(training_args.output_dir).resolve(), training_args.resume_from_checkpoint
    if resume:
        check_resume(resume, output_dir, training_args, fingerprint)
    if not resume or Path(resume).resolve().parent != output_dir:
        with training_args.main_process_first(local=training_args.save_on_each_node, desc="output folder check"):
            if training_args.should_save:
                moved = prepare_fresh_output_dir(output_dir, overwrite, inputs, {**run_record, "data": fingerprint})
                if moved is not None:
                    print(f"--overwrite_output_dir: the previous run in {output_dir} was moved to {moved} "
                          "(nothing deleted)", flush=True)
    return fingerprint


def main(argv=None) -> None:
    """`python -m longalign.train.run_state stamp CHECKPOINT DATASET_DIR`: vouch that a checkpoint saved
    without a fingerprint was trained on DATASET_DIR (writes its FINGERPRINT_FILE)."""
    import argparse

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("command", choices=["stamp"])
    parser.add_argument("checkpoint")
    parser.add_argument("dataset_dir", help="the dataset train.py reads (<train_file>, or its sort/ or pack/)")
    args = parser.parse_args(argv)
    if (Path(args.checkpoint) / FINGERPRINT_FILE).exists():
        parser.error(f"{args.checkpoint} already has a {FINGERPRINT_FILE}")
    write_fingerprint(args.checkpoint, data_fingerprint(args.dataset_dir))
    print(f"wrote {Path(args.checkpoint) / FINGERPRINT_FILE}")


if __name__ == "__main__":
    main()
