"""Non-finite training steps: stopped (default) or skipped on request, never hidden, never saved.

Every optimizer step checks, on all ranks together, the loss of each of its micro-steps and the
norm of the step's whole gradient (before it is clipped and before the optimizer runs):
- `--nan_policy stop` (default): a non-finite loss or gradient norm raises `TrainingDiverged`
  naming the step and the values, before the optimizer step (under DeepSpeed, whose engine steps
  inside the backward pass: right after it); the run exits non-zero, nothing more is saved (the
  last checkpoint is the one before the step), no final model is written.
- `--nan_policy skip`: the optimizer step of that batch is skipped (every gradient set to None,
  so AdamW leaves weights and moments alone; the step number and learning-rate schedule advance),
  warned with the step, and counted: `nonfinite_steps_skipped` in every training log (so in
  trainer_state.json's log_history, restored on resume). The logged loss of a window holding a
  skipped batch is that non-finite value, not hidden.
Under fp16 the gradient check is left to the loss scaler, which skips overflow steps itself (only
the loss is checked there); skip needs bf16 or fp32 without DeepSpeed, whose engine steps inside
the backward pass (`check_nan_policy`).

Before any checkpoint or the final model is saved, the weights (each rank's shard) are checked:
a NaN/inf weight raises `TrainingDiverged` instead of saving.

transformers' `logging_nan_inf_filter` (on by default) logs a non-finite loss as the mean of the
window's earlier losses, i.e. 0 when every loss of the window is non-finite; train.py turns it off.
"""
from __future__ import annotations

import logging
import math
from pathlib import Path

import torch
from transformers import TrainerCallback

from longalign.train.run_state import checkpoints_in

logger = logging.getLogger(__name__)

NAN_POLICIES = ("stop", "skip")
SKIPPED_LOG_KEY = "nonfinite_steps_skipped"
_SHOWN_NAMES = 3


class TrainingDiverged(RuntimeError):
    """A non-finite loss, gradient norm or weight in training; the message names the step."""


def check_nan_policy(policy: str, deepspeed, fp16: bool) -> None:
    """Refuse an unknown policy, and skip where this process cannot skip an optimizer step."""
    if policy not in NAN_POLICIES:
        raise ValueError(f"--nan_policy must be one of {NAN_POLICIES}, got {policy!r}")
    if policy == "skip" and deepspeed:
        raise ValueError("--nan_policy skip is not available with --deepspeed (its engine steps inside the "
                         "backward pass, before the step can be checked); use --nan_policy stop")
    if policy == "skip" and fp16:
        raise ValueError("--nan_policy skip is not available with --fp16 (its loss scaler already skips "
                         "overflow steps); use --nan_policy stop, or --bf16")


def nonfinite_parameters(model: torch.nn.Module) -> list[str]:
    """Names of the parameters holding NaN/inf (this rank's shard under ZeRO-3)."""
    bad = []
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            values = getattr(parameter, "ds_tensor", parameter)  # ZeRO-3: the local partition
            if values.numel() and not bool(torch.isfinite(values).all()):
                bad.append(name)
    return bad


def local_gradient_norm(model: torch.nn.Module) -> float:
    """The 2-norm of every gradient of `model` (the whole norm once DDP has synchronised them)."""
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    if not grads:
        return 0.0
    return float(torch.nn.utils.get_total_norm(grads, 2.0))


def _any_rank(flags: torch.Tensor) -> torch.Tensor:
    """Element-wise max of `flags` over every rank (the flags themselves without a process group)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MAX)
    return flags


class DivergenceGuard(TrainerCallback):
    """The checks of the module docstring. The trainer hands it each micro-step's loss
    (`record_loss`) and how to read the step's gradient norm (`grad_norm(model)`, None: not checked)."""

    def __init__(self, policy: str, grad_norm, device):
        if policy not in NAN_POLICIES:
            raise ValueError(f"nan_policy must be one of {NAN_POLICIES}, got {policy!r}")
        self.policy, self.grad_norm, self.device = policy, grad_norm, device
        self.skipped = 0
        self._losses: list[torch.Tensor] = []

    def record_loss(self, loss: torch.Tensor) -> None:
        self._losses.append(loss.detach().float().reshape(()))

    def on_train_begin(self, args, state, control, **kwargs):
        self._losses = []  # a resumed run continues the count of its checkpoint's logs
        self.skipped = max((int(entry[SKIPPED_LOG_KEY]) for entry in state.log_history if SKIPPED_LOG_KEY in entry),
                           default=0)

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        step = state.global_step + 1
        losses = torch.stack(self._losses).cpu() if self._losses else torch.zeros(0)
        self._losses = []
        bad_losses = losses[~torch.isfinite(losses)]
        norm = self.grad_norm(model)
        local = [float(bad_losses.numel() > 0), float(norm is not None and not math.isfinite(norm))]
        loss_bad, norm_bad = (bool(v) for v in _any_rank(torch.tensor(local, device=self.device)).tolist())
        if not (loss_bad or norm_bad):
            return
        found = ([f"loss {bad_losses[0].item()}" if bad_losses.numel() else "a non-finite loss on another rank"]
                 if loss_bad else []) + ([f"gradient norm {norm}"] if norm_bad else [])
        what = f"step {step}: {' and '.join(found)}"
        if self.policy == "stop":
            raise TrainingDiverged(f"{what}: training diverged; stopped, nothing saved from this step (--nan_policy "
                                   f"stop){_last_checkpoint_hint(args.output_dir)}. Lower --learning_rate (or set "
                                   "--max_grad_norm), or pass --nan_policy skip to skip such steps (counted)")
        for parameter in model.parameters():
            parameter.grad = None  # AdamW leaves parameters without a gradient untouched
        self.skipped += 1
        logger.warning("%s: optimizer step skipped (--nan_policy skip; %d skipped so far)", what, self.skipped)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if control.should_save:
            self.check_weights(model, f"step {state.global_step}: checkpoint-{state.global_step}")

    def on_epoch_end(self, args, state, control, model=None, **kwargs):
        if control.should_save:
            self.check_weights(model, f"step {state.global_step}: checkpoint-{state.global_step}")

    def check_weights(self, model: torch.nn.Module, what: str) -> None:
        """Raise TrainingDiverged, before `what` is saved, if any rank holds a NaN/inf weight."""
        bad = nonfinite_parameters(model)
        if not bool(_any_rank(torch.tensor([float(bool(bad))], device=self.device)).item()):
            return
        names = ", ".join(bad[:_SHOWN_NAMES]) + (f" and {len(bad) - _SHOWN_NAMES} more" if len(bad) > _SHOWN_NAMES
                                                 else "") if bad else "on another rank"
        raise TrainingDiverged(f"{what}: the weights hold NaN/inf ({names}); not saved. Lower --learning_rate "
                               "(or set --max_grad_norm) and train again")


def _last_checkpoint_hint(output_dir) -> str:
    folder = Path(output_dir)
    saved = checkpoints_in(folder) if folder.is_dir() else []
    return f"; the last checkpoint is {folder / saved[-1][1]}" if saved else "; no checkpoint was saved"
