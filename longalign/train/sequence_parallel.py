"""Sequence parallelism on DeepSpeed's Ulysses (ALST), with LongAlign's loss weighting exact.

    deepspeed --num_gpus 8 train.py ... --batch_method pack --pack_loss --sequence_parallel_size 4 \
        --deepspeed ds_config/stage3_no_offload.json --max_length 262144 ...

Engine. DeepSpeed's Arctic Long Sequence Training components, reached the way transformers'
Trainer reaches them (`TrainingArguments.parallelism_config = ParallelismConfig(sp_backend=
"deepspeed", sp_size=N)`, built by `parallelism_config`): accelerate calls
`UlyssesSPAttentionHF.register_with_transformers`, which wraps the model's registered core
attention ("longalign_varlen") in Ulysses' all-to-all, creates the SP groups (ranks gN .. gN+N-1)
and hands them to `deepspeed.initialize`; the Trainer wraps the training data loader in
`UlyssesSPDataLoaderAdapter`, which gathers one batch from each rank of an SP group and gives
rank s the s-th of N equal slices (dim 1) of every tensor of each of them in turn.

Notation. World W = DP x N ranks; rank r = (g, s): SP group g, SP rank s. A step has M micro-steps
per rank; at micro-step m, group g trains pack P(g, m) of T tokens, padded to T' = T + ((-T) mod N)
so the N slices are equal; rank (g, s) holds positions [s T'/N, (s+1) T'/N).

Attention stays block-diagonal. Position ids restart at 0 at every sequence (and at the padding
tail, its own segment without targets); they travel sharded with the tokens, so RoPE sees the same
positions as with N = 1. In every attention call Ulysses all-gathers them back to the whole pack's
(1, T') before the core attention, which (having no cu_seq_lens) derives the whole pack's
boundaries from them (`longalign.modeling.packed_attention.cu_seqlens_from_positions`) and runs
the registered varlen kernel over all T' tokens for its Hq/N query heads (Hkv/N key/value heads,
or one replicated head when N > Hkv). So every backend and the `selective` recompute work as they
do without SP. Ulysses needs Hq % N == 0 and (Hkv % N == 0 or N % Hkv == 0) (`check_head_counts`).

Targets are shifted before sharding (`sequence_parallel_batch`). Over the WHOLE pack:
    t, w = longalign.ops.weighted_loss.shift_targets(labels, loss_weights, cu_seqlens)
t_i is the target of position i inside its sequence (IGNORE at each sequence's last token), w_i
its weight for the reduction (collators: 1/N_k with N_k counted over all of sequence k's tokens,
1/sum_k N_k of the pack, or 1). The batch carries `labels = loss.labels_for_targets(t)`, whose
plain shift -- the one the DeepSpeed adapter applies to `labels` before slicing -- gives
`shift_labels` == t exactly, and `shift_loss_weights` = w. A slice's last token therefore keeps
the next slice's first label as its target, and no target crosses a sequence boundary.

Loss, exact for N > 1 (longalign/train/trainer.py has the N = 1 formulas). Rank (g, s) computes
    S_{g,s,m} = sum_{i in slice s of P(g,m)} w_i l_i,      so   sum_s S_{g,s,m} = S_P = sum_{i in P} w_i l_i,
the N = 1 pack sum (the hidden state of every position depends on the whole pack, as with N = 1).
Every micro-batch carries its pack's counts (a list: copied to all N ranks), so all-reducing them
over the W ranks and M micro-steps counts each pack N times: D = that sum / N (K sequences,
packs, or target tokens). Ulysses' all-to-all is differentiable (its backward is the reverse
exchange), so the local gradients of a group sum to the gradient of its pack:
sum_s grad^{(g,s)} S_{g,s,m} = grad S_P. DeepSpeed sums gradients over all W ranks (the
sequence-data-parallel group) after dividing them by A (`gradient_divisor`):
    A = W / N = DP  for ZeRO 0/1/2  (stage_1_and_2.py, engine.py: div_(world_size / sequence_parallel_size)),
    A = W           for ZeRO-3 with its default reduce_scatter (coalesced_collectives.reduce_scatter_coalesced
                    divides by the group size; measured: A = DP there gives half the gradients at N = 2).
(ZeRO-3 with reduce_scatter false divides buckets within reduce_bucket_size by DP and larger
ones by W: refused.) Rank r backpropagates L_{r,m} = A * S_{r,m} / D, so
    grad = (1/A) sum_r sum_m grad^{(r)} L_{r,m} = grad[(1/D) sum_{packs P of the step} S_P],
which is the N = 1 objective: (1/K) sum_k (1/N_k) sum_{i in k} l_i for `sequence`, the mean of
pack token means for `pack_mean`, the global token mean for `token`. With N = 1, A = W: the
trainer's L = W S / D. The logged loss (HF: mean over the W ranks of the summed returned losses)
is returned as (W / A) L_{r,m}: (1/W) sum_{r,m} W S_{r,m} / D = (1/D) sum_P S_P, the true loss.

Data order (`sequence_parallel_order`). Rank (g, s) reads sampler positions i W + g N + s
(i = 0, 1, ...); the adapter trains, at micro-step m = i N + s, group g on the batch its rank s
read in round i. The sampler maps position i W + g N + s to stored row (i N + s) DP + g, so
micro-step m trains stored rows [m DP, (m+1) DP) on the DP groups: the N = 1 layout with DP in
place of W (sort_and_group.py --group_size DP, a multiple of DP x per-device batch 1).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from longalign.train.collators import COUNTS_KEY, PackCollator
from longalign.constants import IGNORE_INDEX
from longalign.ops.weighted_loss import labels_for_targets, shift_targets
from longalign.modeling.packed_attention import ATTN_IMPLEMENTATION
from longalign.modeling.shape import ModelShape

SP_BACKEND = "deepspeed"  # accelerate's ParallelismConfig.sp_backend: DeepSpeed's Ulysses (ALST)
PAD_TOKEN_ID = 0  # input id of the padding tail (never a target, its own attention segment)


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def check_sequence_parallel_layout(sp: int, world_size: int, per_device_batch: int, batch_method: str,
                                   uses_deepspeed: bool) -> int:
    """The data-parallel size DP = W / N; an error that says what to change otherwise."""
    if not isinstance(sp, int) or sp < 1:
        raise ValueError(f"--sequence_parallel_size must be an integer >= 1, got {sp!r}")
    if sp == 1:
        return world_size
    if not uses_deepspeed:
        raise ValueError("--sequence_parallel_size > 1 runs on DeepSpeed's Ulysses: add --deepspeed "
                         "ds_config/stage3_no_offload.json (ZeRO-3) and launch with deepspeed/torchrun")
    if batch_method != "pack":
        raise ValueError(f"--sequence_parallel_size splits packs across GPUs: it needs --batch_method pack "
                         f"(got {batch_method!r}; padded naive/sort batches would be sliced with their padding)")
    if per_device_batch != 1:
        raise ValueError(f"--sequence_parallel_size needs --per_device_train_batch_size 1 (one pack per SP "
                         f"group per micro-step), got {per_device_batch}; use --gradient_accumulation_steps")
    if world_size % sp:
        raise ValueError(f"world size {world_size} is not a multiple of --sequence_parallel_size {sp}: "
                         f"choose one of {divisors(world_size)}")
    return world_size // sp


def gradient_divisor(world_size: int, sp: int, deepspeed_config: dict | None) -> int:
    """A: what the gradient all-reduce divides the summed gradients by (module docstring)."""
    if sp == 1 or deepspeed_config is None:
        return world_size
    zero = deepspeed_config.get("zero_optimization", {})
    if int(zero.get("stage", 0)) != 3:
        return world_size // sp
    if not zero.get("reduce_scatter", True):
        raise ValueError("ZeRO-3 with zero_optimization.reduce_scatter false averages gradients over W / N for "
                         "small buckets and W for large ones under sequence parallelism: set reduce_scatter true")
    return world_size


def head_counts(config) -> tuple[int, int]:
    """(query heads, key/value heads) of a llama or chatglm config (`ModelShape`)."""
    shape = ModelShape.from_config(config)
    return shape.heads, shape.kv_heads


def valid_sizes(heads: int, kv_heads: int) -> list[int]:
    """SP sizes Ulysses accepts (DeepSpeed's UlyssesSPAttentionHF rules, module docstring)."""
    return [n for n in divisors(heads) if kv_heads % n == 0 or n % kv_heads == 0]


def check_head_counts(config, sp: int) -> None:
    """Hq % N == 0 and (Hkv % N == 0 or N % Hkv == 0); an error listing the sizes that work."""
    heads, kv = head_counts(config)
    if sp > 1 and sp not in valid_sizes(heads, kv):
        raise ValueError(f"--sequence_parallel_size {sp}: Ulysses splits attention heads across the SP group "
                         f"and this model has {heads} query / {kv} key-value heads; choose one of "
                         f"{valid_sizes(heads, kv)}")


def expose_head_geometry(config) -> None:
    """Give a ChatGLM config the field names DeepSpeed reads (`num_key_value_heads`, `head_dim`).

    `register_with_transformers` reads num_attention_heads, num_key_value_heads, head_dim (else
    hidden/heads) and num_hidden_layers; ChatGLM names them multi_query_group_num and kv_channels.
    No-op for Llama. The two extra fields are saved in the checkpoint's config.json (unused there).
    """
    if getattr(config, "model_type", None) != "chatglm":
        return
    config.num_key_value_heads = head_counts(config)[1]
    config.head_dim = config.kv_channels


def parallelism_config(sp: int, data_parallel_size: int):
    """accelerate's ParallelismConfig for Ulysses SP over DP groups, core attention ours.

    accelerate's DeepSpeedSequenceParallelConfig allow-lists transformers' built-in attention names
    in its constructor; DeepSpeed itself accepts any registered implementation equal to the model's
    (`register_with_transformers` checks ALL_ATTENTION_FUNCTIONS), so ours is set after construction.
    """
    try:
        from accelerate import ParallelismConfig
        from accelerate.utils import DeepSpeedSequenceParallelConfig
    except ImportError as error:
        raise ImportError("--sequence_parallel_size needs accelerate>=1.12 (ParallelismConfig with "
                          "sp_backend='deepspeed'), transformers>=5 and deepspeed>=0.18.2") from error

    handler = DeepSpeedSequenceParallelConfig(sp_seq_length_is_variable=True)
    handler.sp_attn_implementation = ATTN_IMPLEMENTATION
    return ParallelismConfig(sp_backend=SP_BACKEND, sp_size=sp, dp_replicate_size=data_parallel_size,
                             sp_handler=handler)


def sequence_parallel_batch(batch: dict, sp: int) -> dict:
    """A PackCollator batch -> the batch the Ulysses data loader slices (module docstring).

    Pack of T = 5, cu_seqlens [0 3 5], labels [X 5 6 | X 7], N = 2 (padded to T' = 6):
        input_ids [a b c | d e | 0], position_ids [0 1 2 | 0 1 | 0], labels [X 5 6 X 7 X]
        -> shift_labels (made by the adapter) [5 6 X | 7 X | X]: rank 0 [5 6 X], rank 1 [7 X X]
    shift_loss_weights: the reduction's weights of those targets (0 on X). Counts stay a list.
    """
    cu = batch["cu_seq_lens_q"].long()
    targets, weights = shift_targets(batch["labels"], batch["loss_weights"], cu)
    pad = (-targets.numel()) % sp
    input_ids = torch.cat([batch["input_ids"][0], torch.full((pad,), PAD_TOKEN_ID, dtype=torch.long)])
    positions = torch.cat([batch["position_ids"][0], torch.arange(pad, dtype=torch.long)])
    targets = torch.cat([targets, torch.full((pad,), IGNORE_INDEX, dtype=torch.long)])
    weights = torch.cat([weights, torch.zeros(pad, dtype=weights.dtype)])
    longest = max(int(batch["max_length_q"]), pad)
    return {"input_ids": input_ids[None], "labels": labels_for_targets(targets), "position_ids": positions[None],
            "shift_loss_weights": weights[None], "max_length_q": longest, "max_length_k": longest,
            COUNTS_KEY: batch[COUNTS_KEY].tolist()}


class SequenceParallelPackCollator:
    """Pack rows -> `sequence_parallel_batch` of the given PackCollator's batch (its weights and
    counts: the reduction's, with the original's warm-up packs if it cuts them)."""

    def __init__(self, pack_collator: PackCollator, sequence_parallel_size: int):
        if not isinstance(pack_collator, PackCollator):
            raise ValueError(f"--sequence_parallel_size splits packs: it needs a PackCollator, got "
                             f"{type(pack_collator).__name__}")
        if sequence_parallel_size < 2:
            raise ValueError("SequenceParallelPackCollator is for --sequence_parallel_size >= 2")
        self.pack, self.sp = pack_collator, sequence_parallel_size

    def __call__(self, rows) -> dict:
        return sequence_parallel_batch(self.pack(rows), self.sp)


def sequence_parallel_order(rows: int, world_size: int, sp: int) -> list[int]:
    """Stored row for each sampler position (module docstring); `rows` a multiple of W.

    W = 4, N = 2 (DP = 2): positions 0..7 -> rows [0 2 1 3 4 6 5 7]; rank (g, s) = 2g + s reads
    positions i W + 2g + s, so micro-step 0 trains rows 0 (group 0) and 1 (group 1), step 1 rows 2, 3.
    """
    if rows % world_size:
        raise ValueError(f"{rows} rows are not a multiple of world size {world_size}")
    dp = world_size // sp
    order = []
    for position in range(rows):
        i, rest = divmod(position, world_size)
        g, s = divmod(rest, sp)
        order.append((i * sp + s) * dp + g)
    return order


class StoredOrderSampler(torch.utils.data.Sampler):
    """Yields the given row indices in order (one pass, no shuffling)."""

    def __init__(self, indices: list[int]):
        self.indices = list(indices)

    def __iter__(self):
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


@dataclass(frozen=True)
class SequenceParallelPlan:
    """--sequence_parallel_size N, decided once (train.py) and handed to LongAlignTrainer: N, the
    world size W, the data-parallel size W / N, and what N > 1 changes in the model config, the
    collator, the data order, the gradient divisor and the step counts. N = 1 changes nothing."""
    size: int = 1
    world_size: int = 1

    def __post_init__(self):
        if self.size < 1 or self.world_size % self.size:
            raise ValueError(f"world size {self.world_size} is not a multiple of sequence_parallel_size {self.size}")

    @property
    def data_parallel_size(self) -> int:
        return self.world_size // self.size

    def prepare_model(self, config) -> None:
        """Check the heads split over N and give a ChatGLM config the names DeepSpeed reads."""
        if self.size > 1:
            check_head_counts(config, self.size)
            expose_head_geometry(config)

    def wrap_collator(self, collator):
        return SequenceParallelPackCollator(collator, self.size) if self.size > 1 else collator

    def sampler(self, rows: int) -> "StoredOrderSampler | None":
        """The stored order as the adapter trains it (one rank's rows after the other's); None for N = 1."""
        if self.size == 1:
            return None
        return StoredOrderSampler(sequence_parallel_order(rows, self.world_size, self.size))

    def gradient_divisor(self, deepspeed_config: dict | None) -> int:
        return gradient_divisor(self.world_size, self.size, deepspeed_config)

    def count_packs_once(self, counts: torch.Tensor) -> torch.Tensor:
        """All N ranks of a group carry their pack's counts: divide the summed counts by N (exact)."""
        if self.size > 1:
            if bool((counts % self.size).any()):
                raise RuntimeError(f"step counts {counts.tolist()} are not N = {self.size} copies of the packs' counts")
            counts = counts // self.size
        return counts
