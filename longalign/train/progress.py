"""A training progress bar that shows the loss in the bar instead of printing every log.

`train.py --progress bar` replaces the Trainer's ProgressCallback / PrinterCallback (a printed
dict per log) with `LossProgressBar`: one tqdm bar over the optimizer steps whose postfix holds
the last logged loss, learning rate and grad norm. The logs themselves still go to
trainer_state.json and to every `report_to` integration unchanged.
"""
from __future__ import annotations

from tqdm.auto import tqdm
from transformers import TrainerCallback
from transformers.trainer_callback import PrinterCallback, ProgressCallback

PROGRESS_STYLES = ("logs", "bar")  # logs: transformers' default; bar: LossProgressBar
SHOWN = {"loss": "loss", "learning_rate": "lr", "grad_norm": "grad"}


class LossProgressBar(TrainerCallback):
    """One bar over the training steps; the latest loss, lr and grad norm in its postfix."""

    def __init__(self):
        self.bar = None

    def on_train_begin(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            self.bar = tqdm(total=state.max_steps, initial=state.global_step, desc="train", dynamic_ncols=True)

    def on_step_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.update(state.global_step - self.bar.n)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.bar is not None and logs:
            shown = {short: f"{logs[key]:.4g}" for key, short in SHOWN.items()
                     if isinstance(logs.get(key), (int, float))}
            if shown:
                self.bar.set_postfix(shown, refresh=True)

    def on_train_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def use_progress_style(trainer, style: str) -> None:
    """Install `style` (PROGRESS_STYLES) on a built Trainer."""
    if style not in PROGRESS_STYLES:
        raise ValueError(f"--progress must be one of {PROGRESS_STYLES}, got {style!r}")
    if style == "bar":
        trainer.remove_callback(ProgressCallback)
        trainer.remove_callback(PrinterCallback)
        trainer.add_callback(LossProgressBar())
