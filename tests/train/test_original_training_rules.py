"""train.py flags that restore the original code's training rules (README differences table):
--loss_denominator micro_step and --original_warmup_packs, on tiny random models (CPU).

The two-rank check runs in the suite's one torchrun launch (helpers.torchrun_cases, gloo): the
per-micro-step counts are all-reduced over ranks.
"""
import os
from pathlib import Path

import pytest
import torch

from helpers.torchrun_cases import items_of, step_case, torchrun_launch  # noqa: F401
from helpers.train_runs import (FAMILIES, argv_for, frozen_gc, make_model_dir, make_sequences,  # noqa: F401
                                make_train_file, one_torch_thread, relative_error, run_one_step)

import train
from longalign.constants import IGNORE_INDEX as X
from longalign.modeling.loading import load_training_model

MICRO_STEP = ("--loss_denominator", "micro_step")


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    root = tmp_path_factory.mktemp("original_rules")
    models = {family: make_model_dir(root / f"model_{family}", family) for family in FAMILIES}
    data = make_train_file(root / "data", make_sequences(120), group_size=2)  # 40 packs of 1, 2, 3 sequences
    return root, models, data


def micro_step_reference(model_dir: str, data: str, rows_per_micro_step: int, micro_steps: int):
    """The original's step loss written out: per micro-step, the mean over its packs' sequences of
    each sequence's token mean (its K_m = sequences with targets); then HF's 1/GA average."""
    import datasets
    model = load_training_model(model_dir, dtype=torch.float32)
    rows = datasets.load_from_disk(os.path.join(data, "pack")).select(range(rows_per_micro_step * micro_steps))
    step_loss = 0
    for m in range(micro_steps):
        means = []
        for row in rows.select(range(m * rows_per_micro_step, (m + 1) * rows_per_micro_step)):
            cu = row["cu_seqlens"]
            for a, b in zip(cu[:-1], cu[1:]):
                ids, labels = row["input_ids"][a:b], row["labels"][a:b]
                if any(t != X for t in labels[1:]):
                    means.append(model(torch.tensor([ids]), labels=torch.tensor([labels])).loss)
        step_loss = step_loss + sum(means) / len(means) / micro_steps
    step_loss.backward()
    return step_loss.item(), {n: p.grad.detach().clone() for n, p in model.named_parameters()}


MICRO_STEP_TEST = "test_micro_step_denominator_is_the_originals_average_of_means"


def launch_cases(items, folder: Path) -> list[dict]:
    """The micro-step test's two-rank run, on the inputs `workdir` builds (chatglm, 120 sequences)."""
    if not items_of(items, MICRO_STEP_TEST):
        return []
    model = make_model_dir(folder / "model_chatglm", "chatglm")
    data = make_train_file(folder / "data", make_sequences(120), group_size=2)
    return [step_case("micro_step", model, data, folder, "pack", "sequence", 2, *MICRO_STEP)]


@pytest.mark.distributed
@pytest.mark.subprocess
def test_micro_step_denominator_is_the_originals_average_of_means(torchrun_launch, tmp_path):
    """1 rank x GA 4 and 2 ranks x GA 2 each equal the original's rule for their micro-steps, and
    differ from the project's default (one K for the whole step)."""
    launched = torchrun_launch.case("micro_step")
    model, data = launched["model"], launched["data"]
    spec = {"model": model, "data": data, "out": str(tmp_path)}
    single = run_one_step(spec, "pack", "sequence", 1, *MICRO_STEP)
    ref_loss, ref_grads = micro_step_reference(model, data, rows_per_micro_step=1, micro_steps=4)
    assert relative_error(single["grads"], ref_grads) < 1e-5
    assert abs(single["loss"] - ref_loss) < 1e-5 * abs(ref_loss)
    default = run_one_step(spec, "pack", "sequence", 1)  # packs of 1, 2, 3, 1 sequences: K = 7 vs 1, 2, 3, 1
    assert relative_error(default["grads"], ref_grads) > 1e-2

    ranks = torchrun_launch.ranks("micro_step")
    ref_loss, ref_grads = micro_step_reference(model, data, rows_per_micro_step=2, micro_steps=2)
    assert relative_error(ranks[0]["grads"], ref_grads) < 1e-5
    assert relative_error(ranks[1]["grads"], ranks[0]["grads"]) < 1e-6
    assert abs(ranks[0]["loss"] - ref_loss) < 1e-5 * abs(ref_loss)


@pytest.mark.integration
def test_original_warmup_packs_double_the_first_32_packs(workdir):
    """With the learning rate at 0 every step sees the same model: the steps over packs 0..31
    (8 steps x GA 4) log twice the loss without the flag, the step over packs 32..35 the same
    (the packs are far below 32,768 tokens, so only the weights change)."""
    root, models, data = workdir
    losses = {}
    for flag in ([], ["--original_warmup_packs"]):
        argv = argv_for(models["llama"], data, str(root / f"warmup_{len(flag)}"), "pack", "--pack_loss",
                        "--max_steps", "9", "--gradient_accumulation_steps", "4", "--learning_rate", "0", *flag)
        trainer = train.build_trainer(argv)
        trainer.train()
        losses[bool(flag)] = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses[True]) == 9
    assert losses[True][:8] == pytest.approx([2 * loss for loss in losses[False][:8]], rel=1e-5)
    assert losses[True][8] == pytest.approx(losses[False][8], rel=1e-5)
