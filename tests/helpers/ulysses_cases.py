"""The sequence-parallel cases of the suite's torchrun launch (helpers.torchrun_cases): on a rank, one
optimizer step of train.py with --sequence_parallel_size N under DeepSpeed ZeRO-3 + Ulysses (CPU
accelerator, gloo), its full gradients captured before the step."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

import train
from helpers.train_runs import argv_for

REPO = Path(__file__).resolve().parents[2]
DS_CONFIG = str(REPO / "ds_config" / "stage3_no_offload.json")


def sp_step(spec: dict, sp: int) -> dict:
    """One optimizer step (GA = spec['ga']) under DeepSpeed ZeRO-3; gradients captured before it."""
    argv = argv_for(spec["model"], spec["data"], os.path.join(spec["out"], f"sp{sp}_{spec['reduction']}"), "pack",
                    "--max_steps", "1", "--gradient_accumulation_steps", str(spec["ga"]),
                    "--loss_reduction", spec["reduction"], "--max_grad_norm", "0", "--ddp_backend", "gloo",
                    "--deepspeed", DS_CONFIG, "--sequence_parallel_size", str(sp))
    argv.remove("--use_cpu")  # accelerate then starts deepspeed.comm (gloo on the CPU accelerator)
    trainer = train.build_trainer(argv)
    captured = {}

    from transformers import TrainerCallback

    class CaptureBeforeStep(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            from deepspeed.utils import safe_get_full_grad
            engine = trainer.model_wrapped
            step = engine.step

            def capturing_step(*a, **k):
                if engine.is_gradient_accumulation_boundary() and not captured:
                    for name, p in engine.module.named_parameters():
                        captured[name] = safe_get_full_grad(p).detach().clone()
                return step(*a, **k)
            engine.step = capturing_step

    trainer.add_callback(CaptureBeforeStep())
    seen, compute_loss = [], trainer.compute_loss
    trainer.compute_loss = lambda model, inputs, **kw: (seen.append(inputs["input_ids"][0].tolist()),
                                                        compute_loss(model, inputs, **kw))[1]
    trainer.train()
    loss = [e["loss"] for e in trainer.state.log_history if "loss" in e][0]
    return {"grads": captured, "loss": loss, "rank": trainer.args.process_index, "seen": seen}


def allow_deepspeed_on_cpu() -> None:
    """accelerate starts DeepSpeed only on an accelerator (its PartialState finds no backend on a
    CPU without `cpu=True`, and `cpu=True` turns DeepSpeed off): report gloo / MULTI_CPU instead,
    so deepspeed.comm starts on gloo (DeepSpeed's CPU accelerator). Nothing else is replaced."""
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType

    os.environ.setdefault("ACCELERATE_TORCH_DEVICE", "cpu")
    PartialState._prepare_backend = lambda self, cpu=False, sagemaker_dp=False, backend=None: (
        "gloo", DistributedType.MULTI_CPU)


def run_launch_case(case: dict) -> dict:
    """A Ulysses case of the suite's launch (helpers.torchrun_worker) on this rank. Without DeepSpeed's
    shared-memory collectives op: its CPU communication backend JIT-compiles that op for ranks on one
    host (about a minute on 2 cores whenever the torch_extensions cache is cold), and only its
    inference all-reduce (DeepSpeed-inference tensor parallelism) would use it; training's
    collectives run on torch.distributed (gloo) either way."""
    import deepspeed
    from accelerate.state import PartialState
    from deepspeed.ops.op_builder.cpu.comm import ShareMemCommBuilder

    prepare_backend = PartialState._prepare_backend
    allow_deepspeed_on_cpu()
    try:
        with pytest.MonkeyPatch.context() as patch:
            patch.setitem(deepspeed.ops.__compatible_ops__, ShareMemCommBuilder.NAME, False)
            return sp_step(case, case["sp"])
    finally:
        PartialState._prepare_backend = prepare_backend  # the cases after it start accelerate unpatched
