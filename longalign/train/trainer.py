"""LongAlignTrainer: HF Trainer with the paper's data order and explicit loss normalisation.

Loss. The model returns S = sum_i w_i l_i (loss_aggregation="sum", weights from
longalign/train/collators.py). One optimizer step sees M micro-batches on each of W data-parallel ranks;
the trainer all-reduces their counts before the first forward of the step and uses

    sequence  : D = K = sequences with >= 1 target in the step   -> (1/K) sum_k (1/N_k) sum_{i in k} l_i
    pack_mean : D = packs (padded rows) with >= 1 target          -> mean over packs of each pack's token mean
    token     : D = target tokens in the step                     -> global token mean

Each micro-batch (r, m) backpropagates L_rm = W * S_rm / D. DDP and DeepSpeed average gradients
over the W ranks and the trainer does not divide by M (nor lets accelerate/DeepSpeed do it), so
the step's gradient is (1/W) sum_r sum_m W/D grad S_rm = grad[(1/D) sum_{r,m} S_rm]: the same for
any split of the global batch into ranks x micro-steps. D = max(D, 1): a step without targets
has S = 0 and a zero gradient. The logged loss is HF's mean over ranks of sum_m L_rm =
(1/D) sum_{r,m} S_rm, the true loss of the step. transformers' own `num_items_in_batch` scaling is
bypassed: `get_batch_samples`, `compute_loss` and `training_step` are overridden. Sequence
parallelism (N ranks share each pack): W in L_rm becomes DeepSpeed's gradient divisor A (W or
W / N), counts are divided by N and the logged loss multiplied by W / A; derivation in
longalign/train/sequence_parallel.py.

`loss_denominator="micro_step"` is the original code's rule instead (README differences): each
micro-step m is normalised by its own count D_m (all ranks) and HF's 1/GA averages them,
L_rm = W * S_rm / (D_m * GA), so the step's gradient is grad[(1/GA) sum_m (1/D_m) sum_r S_rm], the
average of per-micro-step means. With GA = 1 both rules are the same.

Data order (sort, pack). Rows are read in stored order; micro-step j gives rank r the rows
[(j W + r) b, (j W + r + 1) b) (b = per-device batch: accelerate hands batch j W + r of the
sequential sampler to rank r). A micro-step therefore trains W b consecutive rows; the dataset's
`group_size` G (stats.json) must be a multiple of W b. G == W b is the paper's layout (one group
per data-parallel step); G = c W b splits each group into c consecutive micro-steps (warned).
Rows past the last whole multiple of W b are dropped with a warning, so every rank runs the same
number of micro-steps (sort_and_group.py completes groups, so none are dropped when W b | G).
Naive: HF's seeded random sampler.

Non-finite loss / gradient norm / weights: stopped, or skipped with --nan_policy skip, counted
(longalign/train/divergence.py; `nan_policy`).

Throughput logs (per optimizer step, averaged over the logging window, all ranks):
step_sequences, step_tokens (real, unpadded), tokens_per_s, and
    mfu = [6 N T + 6 n_layers d sum_k L_k^2] / (seconds * W * peak)
with N the parameters used in matmuls (input embedding excluded unless tied to the output),
T real tokens, d the attention width (heads x head dim), L_k sequence lengths (causal attention:
QK^T and PV forward 2 L^2 d each, halved by causality, backward twice the forward). Activation
recomputation is not counted (model FLOPs, not hardware FLOPs).
"""
from __future__ import annotations

import logging
import time

import torch
from torch.utils.data import SequentialSampler
from transformers import Trainer

from longalign.train.collators import BATCH_METHODS, COUNT_FIELDS, COUNTS_KEY, check_reduction
from longalign.train.divergence import SKIPPED_LOG_KEY, DivergenceGuard, local_gradient_norm
from longalign.modeling.shape import ModelShape
from longalign.train.parallel_layout import check_data_parallel_layout
from longalign.train.sequence_parallel import SequenceParallelPlan

logger = logging.getLogger(__name__)

# Dense bf16 peak of one H100 SXM in TFLOP/s (NVIDIA datasheet, without sparsity). The paper
# trained on A800 80G (312); pass --peak_tflops for another GPU.
DEFAULT_PEAK_TFLOPS = 989.0
DENOMINATOR_FIELD = {"sequence": "sequences", "pack_mean": "packs", "token": "target_tokens"}
LOSS_DENOMINATORS = ("step", "micro_step")  # the project's global count, or the original's per micro-step


def close_process_group() -> None:
    """End a distributed run: every rank waits for the others, then the default process group is
    destroyed, as torch.distributed asks before a process exits. Left to interpreter teardown, a
    rank can abort after its work is done ("terminate called without an active exception", seen
    with gloo when a peer has already exited). No-op when no process group is initialised."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


def resolve_loss_reduction(batch_method: str, pack_loss: bool, loss_reduction: str | None) -> str:
    """The reduction of the paper's row when --loss_reduction is not given.

    pack + --pack_loss -> sequence (Eq. 2); pack -> pack_mean ("Packing" row);
    naive / sort -> sequence (per-device batch 1 in the paper: each GPU a sequence's token mean).
    """
    if batch_method not in BATCH_METHODS:
        raise ValueError(f"--batch_method must be one of {BATCH_METHODS}, got {batch_method!r}")
    if pack_loss and batch_method != "pack":
        raise ValueError("--pack_loss weights sequences inside packs: it needs --batch_method pack")
    if loss_reduction is not None:
        check_reduction(loss_reduction)
        if pack_loss and loss_reduction != "sequence":
            raise ValueError(f"--pack_loss means --loss_reduction sequence, got {loss_reduction!r}")
        return loss_reduction
    if batch_method == "pack":
        return "sequence" if pack_loss else "pack_mean"
    return "sequence"


def loss_denominator(counts: torch.Tensor, reduction: str) -> torch.Tensor:
    """D of the module docstring from the step's global counts (float, >= 1)."""
    value = counts[COUNT_FIELDS.index(DENOMINATOR_FIELD[reduction])]
    return value.clamp(min=1).to(torch.float64)


def matmul_parameters(model: torch.nn.Module) -> int:
    """Parameters that take part in matmuls: all but the input embedding (unless tied)."""
    def numel(p):  # ZeRO-3 partitions parameters: ds_numel is the full size
        return int(getattr(p, "ds_numel", p.numel()))

    total = sum(numel(p) for p in model.parameters())
    embedding = model.get_input_embeddings().weight
    output = model.get_output_embeddings()
    tied = output is not None and output.weight is embedding
    return total if tied else total - numel(embedding)


def training_flops(n_params: int, layers: int, width: int, tokens: int, sum_sq_lengths: int) -> float:
    """Model FLOPs of forward + backward (module docstring): 6 N T + 6 n_layers d sum L^2."""
    return 6.0 * n_params * tokens + 6.0 * layers * width * sum_sq_lengths


class LongAlignTrainer(Trainer):
    """HF Trainer + stored-order data for sort/pack and the explicit loss reduction above."""

    def __init__(self, *args, batch_method: str, loss_reduction: str, group_size: int | None = None,
                 peak_tflops: float = DEFAULT_PEAK_TFLOPS, loss_denominator: str = "step",
                 sequence_parallel: SequenceParallelPlan | None = None, nan_policy: str = "stop", **kwargs):
        super().__init__(*args, **kwargs)
        check_reduction(loss_reduction)
        if loss_denominator not in LOSS_DENOMINATORS:
            raise ValueError(f"loss_denominator must be one of {LOSS_DENOMINATORS}, got {loss_denominator!r}")
        self.loss_denominator = loss_denominator
        if batch_method not in BATCH_METHODS:
            raise ValueError(f"batch_method must be one of {BATCH_METHODS}, got {batch_method!r}")
        plan = sequence_parallel or SequenceParallelPlan(1, self.args.world_size)
        if plan.world_size != self.args.world_size:
            raise ValueError(f"the sequence-parallel plan is for world size {plan.world_size}, "
                             f"the run has {self.args.world_size}")
        self.sequence_parallel = plan
        self.data_parallel_size = plan.data_parallel_size  # W / N: ranks with distinct data
        ds_config = self.args.hf_deepspeed_config.config if self.is_deepspeed_enabled else None
        self.gradient_divisor = plan.gradient_divisor(ds_config)
        if batch_method != "naive":
            if group_size is None:
                raise ValueError(f"--batch_method {batch_method} needs the dataset's group_size")
            per_group = check_data_parallel_layout(group_size, self.args.world_size,
                                                   self.args.per_device_train_batch_size, plan.size)
            if per_group > 1:
                logger.warning("group_size %d = %d micro-steps of data-parallel size %d x batch %d: each group "
                               "is split over consecutive micro-steps", group_size, per_group,
                               self.data_parallel_size, self.args.per_device_train_batch_size)
        self.batch_method, self.loss_reduction = batch_method, loss_reduction
        self.peak_flops = peak_tflops * 1e12
        self.flops_params = matmul_parameters(self.model)
        shape = ModelShape.from_config(self.model.config)
        self.flops_layers, self.flops_width = shape.layers, shape.attention_width
        self._step_denominator = None
        self._micro_step_denominators: list[torch.Tensor] = []  # loss_denominator="micro_step": D_m * GA
        self._window_counts = torch.zeros(len(COUNT_FIELDS), dtype=torch.float64)
        self._window_start, self._window_step0 = None, 0
        self._unclipped_grad_norm = None  # set by the last micro-step of each optimizer step
        self.divergence = DivergenceGuard(nan_policy, self._step_grad_norm, self.args.device)
        self.add_callback(self.divergence)  # after DefaultFlowCallback: it sees should_save

    # ---- data order ----
    def _get_train_sampler(self, train_dataset=None):
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        if self.batch_method == "naive":
            return super()._get_train_sampler(dataset) if train_dataset is not None else super()._get_train_sampler()
        rows_per_micro_step = self.args.world_size * self.args.per_device_train_batch_size
        usable = len(dataset) - len(dataset) % rows_per_micro_step
        if usable < len(dataset):
            logger.warning("dropping the last %d of %d rows: they do not fill a micro-step of %d rows "
                           "on every rank", len(dataset) - usable, len(dataset), rows_per_micro_step)
        if usable == 0:
            raise ValueError(f"{len(dataset)} rows cannot fill one micro-step of {rows_per_micro_step} rows")
        sampler = self.sequence_parallel.sampler(usable)  # SP: one rank's rows after the other's
        return sampler if sampler is not None else SequentialSampler(range(usable))

    # ---- loss ----
    def get_batch_samples(self, epoch_iterator, num_batches, device=None):
        """Fetch the step's micro-batches and all-reduce their counts into the denominator D."""
        if self._window_start is None:
            self._window_start, self._window_step0 = time.perf_counter(), self.state.global_step
        batches = []
        for _ in range(num_batches):
            try:
                batches.append(next(epoch_iterator))
            except StopIteration:
                break
        if any(COUNTS_KEY not in batch for batch in batches):
            raise KeyError(f"batch has no {COUNTS_KEY!r}: use longalign.train.collators' collators")
        per_batch = torch.zeros((len(batches), len(COUNT_FIELDS)), dtype=torch.long)
        for m, batch in enumerate(batches):
            per_batch[m] = torch.as_tensor(batch[COUNTS_KEY])  # a list under SP
        per_batch = per_batch.to(self.args.device)
        if self.accelerator.num_processes > 1:  # every rank calls this once per optimizer step
            per_batch = self.accelerator.reduce(per_batch, reduction="sum")
        per_batch = self.sequence_parallel.count_packs_once(per_batch)
        counts = per_batch.sum(dim=0)
        self._window_counts += counts.cpu().to(torch.float64)
        self._step_denominator = loss_denominator(counts, self.loss_reduction)
        if self.loss_denominator == "micro_step":
            accumulation = self.args.gradient_accumulation_steps  # HF divides every micro-step by GA
            self._micro_step_denominators = [loss_denominator(c, self.loss_reduction) * accumulation
                                             for c in per_batch]
        return batches, self._step_denominator

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """L = A * S / D in training (module docstring; A = W without SP); the model's weighted
        mean otherwise."""
        inputs = {k: v for k, v in inputs.items() if k != COUNTS_KEY}
        if model.training and self._step_denominator is not None:
            outputs = model(**inputs, loss_aggregation="sum")
            denominator = (self._micro_step_denominators.pop(0) if self.loss_denominator == "micro_step"
                           else self._step_denominator)
            scale = self.gradient_divisor / denominator.to(outputs.loss.device)
            loss = outputs.loss * scale.to(outputs.loss.dtype)
        else:
            outputs = model(**inputs, loss_aggregation="mean")
            loss = outputs.loss
        return (loss, outputs) if return_outputs else loss

    def training_step(self, model, inputs, num_items_in_batch=None):
        """Forward + backward of one micro-batch, without any gradient-accumulation rescaling."""
        model.train()
        if hasattr(self.optimizer, "train") and callable(self.optimizer.train):
            self.optimizer.train()
        inputs = self._prepare_inputs(inputs)
        with self.compute_loss_context_manager():
            loss = self.compute_loss(model, inputs)
        del inputs
        kwargs = {}
        if self.is_deepspeed_enabled:  # DeepSpeed would otherwise divide by its GA steps
            kwargs["scale_wrt_gas"] = False
        self.accelerator.backward(loss, **kwargs)
        logged = loss.detach() * (self.args.world_size / self.gradient_divisor)  # what HF logs: module docstring
        self.divergence.record_loss(logged)
        if self.accelerator.sync_gradients and not (self.is_deepspeed_enabled or self.args.fp16):
            self._unclipped_grad_norm = local_gradient_norm(model)  # the step's whole gradient, before HF clips it
        return logged

    def _step_grad_norm(self, model) -> float | None:
        """The step's gradient norm for the divergence check; None under fp16 (the loss scaler's)."""
        if self.args.fp16:
            return None
        if self.is_deepspeed_enabled:
            norm = self.model_wrapped.get_global_grad_norm()
            return None if norm is None else float(norm)
        norm, self._unclipped_grad_norm = self._unclipped_grad_norm, None
        return norm

    # ---- logs ----
    def log(self, logs, start_time=None):
        """Add step_sequences, step_tokens, tokens_per_s and mfu to each training log."""
        if "loss" in logs and self._window_start is not None:
            steps = max(self.state.global_step - self._window_step0, 1)
            seconds = max(time.perf_counter() - self._window_start, 1e-9)
            c = dict(zip(COUNT_FIELDS, self._window_counts.tolist()))
            flops = training_flops(self.flops_params, self.flops_layers, self.flops_width,
                                   c["tokens"], c["sum_sq_lengths"])
            logs["step_sequences"] = c["sequences"] / steps
            logs["step_tokens"] = c["tokens"] / steps
            logs["tokens_per_s"] = c["tokens"] / seconds
            logs["mfu"] = flops / (seconds * self.accelerator.num_processes * self.peak_flops)
            self._window_counts.zero_()
            self._window_start = None
        if self.divergence.policy == "skip":
            logs[SKIPPED_LOG_KEY] = self.divergence.skipped
        super().log(logs, start_time)
