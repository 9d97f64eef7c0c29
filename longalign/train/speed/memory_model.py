"""Fast defaults: the recompute policy chosen by a GPU-memory model, layer compile on CUDA.

    from longalign.modeling.shape import ModelShape
    from longalign.train.speed.memory_model import MemorySetup, choose_recompute
    choice = choose_recompute(ModelShape.from_config(config), tokens=65536,
                              setup=MemorySetup(params=..., layer_params=...), gpu_bytes=141 * 2**30)
    choice.policy, choice.describe()     # e.g. "selective:6", "predicted peak ... GiB of ..."
    settings = choose_speed_settings(SpeedRequest(), "cuda", shape, setup, tokens, packed=True, attention=...)
    print(settings.log_line())           # train.py logs this one line at start

Activation memory of one decoder layer (bytes), for T tokens of one micro-batch (pack length, or
per-device batch x padded length), activations of b bytes per element (2 in bf16, 4 in fp32),
hidden h, query heads H, key/value heads G, head dim d, MLP width f. These are the tensors that
autograd keeps for the backward of the family's eager transformers code (counted storage by
storage in tests/test_performance.py), with a fused varlen attention kernel (FlashAttention,
torch varlen, cuDNN, compiled flex) that keeps q, k, v, its output and an fp32 log-sum-exp:

    norms     N = 2 [(4 + 2b) h + 4]   Llama: fp32 copy of the input, normalised x, weight * x
                  2 [(8 + b) h + 4]    ChatGLM: fp32 copy, fp32 normalised x, its cast result
    attention A = b (2H + 2G) d + 4H   Llama: q, k (after RoPE), v, out; lse
                  b (H + G + (H + 2G) + H) d + 4H
                                       ChatGLM: q, k, the fused qkv output (kept alive by the
                                       view v), out; lse
    MLP       M = 4 b f                gate, silu(gate), up, silu(gate) * up
    per layer, by policy (longalign.ops.recompute):
        none       T (N + A + M)
        selective  T (b h + A)         the checkpointed input + the kept attention tensors
        full       T b h               the checkpointed input

(torch.compile fuses the norms and the SwiGLU and keeps less: the model is then an upper bound.)
A checkpointed layer's `none` activations exist once more while it runs its backward (R_l, the
recompute), and a layer's backward keeps a workspace of B = T (3 b f + 8 h) (three (T, f)
gradients of the MLP, two fp32 (T, h) gradients of a norm). The loss (longalign.ops.weighted_loss) needs
C V (8 + b) + 4 V h + b T h (one chunk of C tokens: fp32 logits, their fp32 gradient and its
cast; the fp32 head-gradient accumulator; the final hidden states).

Memory per GPU for P parameters (P_l in one layer), weights of b_w bytes, W ranks of DeepSpeed
ZeRO stage s (s = 0: no DeepSpeed, torch AdamW), W_k = W if s >= k else 1:

    weights    R_w = P b_w / W_3 + [s = 3] 2 P_l b_w   (ZeRO-3: the layer running + the prefetched one)
    optimizer  R_o = P (8 m + 2 b_o) / W_1             m = 1 with fp32 master weights and fp32
                                                       gradients (DeepSpeed bf16), else 0; b_o = 4
                                                       then, else b_w (torch AdamW keeps its two
                                                       states in the weights' dtype)
    gradients  G_k = P_l b_w / W_2 per layer, G_0 = (P - L P_l) b_w / W_2 for the rest

(offload_param / offload_optimizer make R_w / R_o zero). Gradients appear during the backward
while activations are freed, so the peak is the larger of the end of the forward and the worst
layer of the backward (layers l = L-1 .. 0, S_k the activations kept by layer k):

    peak = R_w + R_o + max( sum_k S_k + loss + G_0 ,
                            max_l [ G_0 + sum_{k >= l} G_k + sum_{k <= l} S_k + R_l + B ] )

The recompute policy is the first of this ladder whose predicted peak fits MEMORY_HEADROOM x the
GPU's memory:

    none, selective:1, ..., selective:L-1, selective, full:1, ..., full:L-1, full

(`selective:K` / `full:K`: the first K layers use that policy, the rest none.) The order follows
BENCHMARKS.md §4: each kept layer saves time, and per GiB freed, keeping the attention output
(selective) costs less recompute time than recomputing it (full). A padded batch (naive, sort)
never keeps attention (`saved_attention` is packed-only), so its ladder has no selective rungs.
When even `full` does not fit, `full` is chosen and the log says so.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pyarrow.compute as pc
import torch

from longalign.ops.varlen_attention import choose_backend
from longalign.train.speed.liger import apply_liger_kernels
from longalign.modeling.shape import ModelShape
from longalign.ops.recompute import apply_recompute, decoder_layers, parse_policy

MEMORY_HEADROOM = 0.90  # of the GPU's memory: CUDA context, allocator fragmentation, NCCL buffers
ZERO3_GATHERED_LAYERS = 2  # ZeRO-3: the layer computing and the one being prefetched
FP32_BYTES = 4
NORM_STAT_BYTES = 4  # one fp32 rstd per token and norm
MLP_GRADIENTS = 3  # (T, f) gradients alive at once in an MLP backward
NORM_FP32_GRADIENTS = 2  # fp32 (T, h) gradients alive at once in a norm backward
LOSS_FP32_COPIES = 2  # one chunk's fp32 logits and their softmax gradient
GIB = 2 ** 30
# Layer compile by default only where it was measured: single GPU / DDP. Under ZeRO-3 DeepSpeed hooks
# every Linear inside a compiled layer (graph breaks), and no run has timed it yet.
COMPILE_UNDER_ZERO3 = False


def layer_activation_bytes(shape: ModelShape, tokens: int, act_bytes: int) -> dict[str, int]:
    """Bytes one layer keeps for backward under each policy (module docstring)."""
    b, h, d, H, G = act_bytes, shape.hidden, shape.head_dim, shape.heads, shape.kv_heads
    if shape.family == "chatglm":
        norms = 2 * ((8 + b) * h + NORM_STAT_BYTES)
        attention = b * (H + G + (H + 2 * G) + H) * d + FP32_BYTES * H
    else:
        norms = 2 * ((4 + 2 * b) * h + NORM_STAT_BYTES)
        attention = b * (2 * H + 2 * G) * d + FP32_BYTES * H
    mlp = 4 * b * shape.intermediate
    return {"none": tokens * (norms + attention + mlp), "selective": tokens * (b * h + attention),
            "full": tokens * b * h}


def backward_workspace_bytes(shape: ModelShape, tokens: int, act_bytes: int) -> int:
    return tokens * (MLP_GRADIENTS * act_bytes * shape.intermediate + NORM_FP32_GRADIENTS * FP32_BYTES * shape.hidden)


def loss_bytes(shape: ModelShape, tokens: int, act_bytes: int, chunk_tokens: int) -> int:
    chunk = min(chunk_tokens, tokens)
    return (chunk * shape.vocab * (LOSS_FP32_COPIES * FP32_BYTES + act_bytes)
            + FP32_BYTES * shape.vocab * shape.hidden + act_bytes * tokens * shape.hidden)


@dataclass(frozen=True)
class MemorySetup:
    """Where the token-independent memory goes (module docstring: R_w, R_o, G)."""
    params: int
    layer_params: int
    weight_bytes: int = 2
    zero_stage: int = 0
    world_size: int = 1
    master_weights: bool = False
    offload_params: bool = False
    offload_optimizer: bool = False

    def _share(self, stage: int) -> int:
        return self.world_size if self.zero_stage >= stage else 1

    def resident_bytes(self) -> int:
        """R_w + R_o: weights (+ ZeRO-3's gathered layers) and optimizer state."""
        weights = 0 if self.offload_params else self.params * self.weight_bytes // self._share(3)
        if self.zero_stage >= 3:
            weights += ZERO3_GATHERED_LAYERS * self.layer_params * self.weight_bytes
        state_bytes = FP32_BYTES if self.master_weights else self.weight_bytes
        per_param = 2 * FP32_BYTES * int(self.master_weights) + 2 * state_bytes
        optimizer = 0 if self.offload_optimizer else self.params * per_param // self._share(1)
        return weights + optimizer

    def gradient_bytes(self, layers: int) -> tuple[int, int]:
        """(G_k of one layer, G_0 of the parameters outside the layers)."""
        layer = self.layer_params * self.weight_bytes // self._share(2)
        rest = max(self.params - layers * self.layer_params, 0) * self.weight_bytes // self._share(2)
        return layer, rest


def predicted_peak_bytes(shape: ModelShape, policy: str, tokens: int, setup: MemorySetup, act_bytes: int,
                         chunk_tokens: int) -> int:
    """The module docstring's peak: end of forward, or the worst layer of the backward."""
    per_layer = layer_activation_bytes(shape, tokens, act_bytes)
    modes = parse_policy(policy, shape.layers)
    saved = [per_layer[m] for m in modes]
    recompute = [0 if m == "none" else per_layer["none"] for m in modes]
    layer_grad, other_grad = setup.gradient_bytes(shape.layers)
    workspace = backward_workspace_bytes(shape, tokens, act_bytes)
    after_forward = sum(saved) + loss_bytes(shape, tokens, act_bytes, chunk_tokens) + other_grad
    in_backward = max(other_grad + (shape.layers - l) * layer_grad + sum(saved[:l + 1]) + recompute[l] + workspace
                      for l in range(shape.layers))
    return setup.resident_bytes() + max(after_forward, in_backward)


def recompute_ladder(layers: int, packed: bool) -> list[str]:
    """Policies from fastest to least memory (module docstring)."""
    ladder = ["none"]
    if packed:
        ladder += [f"selective:{k}" for k in range(1, layers)] + ["selective"]
    return ladder + [f"full:{k}" for k in range(1, layers)] + ["full"]


@dataclass(frozen=True)
class RecomputeChoice:
    policy: str
    predicted_bytes: int
    budget_bytes: int
    none_bytes: int  # predicted peak without any recomputation

    @property
    def fits(self) -> bool:
        return self.predicted_bytes <= self.budget_bytes

    def describe(self) -> str:
        fit = "fits" if self.fits else "DOES NOT FIT (may run out of memory)"
        return (f"predicted peak {self.predicted_bytes / GIB:.1f} GiB of a {self.budget_bytes / GIB:.1f} GiB budget, "
                f"{fit}; without recompute {self.none_bytes / GIB:.1f} GiB")


def choose_recompute(shape: ModelShape, tokens: int, setup: MemorySetup, gpu_bytes: int, act_bytes: int = 2,
                     packed: bool = True, chunk_tokens: int = 4096) -> RecomputeChoice:
    """The first policy of `recompute_ladder` whose predicted peak fits MEMORY_HEADROOM x gpu_bytes."""
    budget = int(MEMORY_HEADROOM * gpu_bytes)

    def peak(policy: str) -> int:
        return predicted_peak_bytes(shape, policy, tokens, setup, act_bytes, chunk_tokens)

    ladder = recompute_ladder(shape.layers, packed)
    chosen = next((p for p in ladder if peak(p) <= budget), ladder[-1])
    return RecomputeChoice(chosen, peak(chosen), budget, peak("none"))


def _numel(p: torch.nn.Parameter) -> int:
    return int(getattr(p, "ds_numel", p.numel()))  # ZeRO-3 partitions parameters: ds_numel is the full size


def parameter_counts(model: torch.nn.Module, first_layer: torch.nn.Module) -> tuple[int, int]:
    """(all parameters, parameters of one decoder layer), full sizes under ZeRO-3 too."""
    return sum(_numel(p) for p in model.parameters()), sum(_numel(p) for p in first_layer.parameters())


def deepspeed_memory_fields(ds_config) -> dict:
    """zero_stage / offload / master-weights fields of MemorySetup from a DeepSpeed config
    (a path or a dict; None = no DeepSpeed: torch AdamW on the model's weights)."""
    if ds_config is None:
        return {}
    config = json.loads(Path(ds_config).read_text()) if isinstance(ds_config, (str, Path)) else ds_config
    zero = config.get("zero_optimization", {})

    def offloaded(key: str) -> bool:
        return str((zero.get(key) or {}).get("device", "none")).lower() in ("cpu", "nvme")

    return {"zero_stage": int(zero.get("stage", 0)), "master_weights": True,
            "offload_params": offloaded("offload_param"), "offload_optimizer": offloaded("offload_optimizer")}


def longest_row_tokens(dataset, column: str = "input_ids") -> int:
    """The longest row of an Arrow-backed datasets.Dataset, from the list offsets (no values read)."""
    lengths = pc.list_value_length(dataset.data.column(column))
    return int(pc.max(lengths).as_py() or 0)


@dataclass(frozen=True)
class SpeedSettings:
    """What train.py applies: `recompute` None = transformers' own checkpointing (its flag)."""
    recompute: str | None
    compile_layers: bool
    liger: bool
    attention: str
    reasons: tuple[str, ...]

    def log_line(self) -> str:
        return (f"speed settings: attention={self.attention} recompute={self.recompute or 'transformers'} "
                f"compile_layers={'on' if self.compile_layers else 'off'} liger={'on' if self.liger else 'off'} "
                f"({'; '.join(self.reasons)})")


@dataclass(frozen=True)
class SpeedRequest:
    """The command line's say: None = choose automatically."""
    paper_exact: bool = False
    recompute: str | None = None
    compile_layers: bool | None = None
    liger: bool = False

    def __post_init__(self):
        if self.paper_exact and (self.recompute is not None or self.compile_layers is not None or self.liger):
            raise ValueError("--paper_exact runs the paper's settings: drop --recompute / --compile_layers / --liger")


def choose_speed_settings(request: SpeedRequest, device, shape: ModelShape, setup: MemorySetup, tokens: int,
                          packed: bool, attention: str, act_bytes: int = 2, gpu_bytes: int | None = None,
                          chunk_tokens: int = 4096) -> SpeedSettings:
    """--paper_exact: the paper's settings; on CPU: today's (explicit flags only); on CUDA: the
    memory model's recompute policy, compiled layers (not under ZeRO-3 or with --liger, neither
    measured with compile), explicit flags winning."""
    if request.paper_exact:
        return SpeedSettings(None, False, False, attention, ("--paper_exact: the paper's own settings",))
    if torch.device(device).type != "cuda":
        if request.liger:
            raise ValueError("--liger needs a CUDA GPU (liger-kernel's kernels are Triton)")
        return SpeedSettings(request.recompute, bool(request.compile_layers), False, attention,
                             ("not CUDA: explicit flags only",))
    reasons = []
    recompute = request.recompute
    if recompute is None:
        if gpu_bytes is None:
            gpu_bytes = torch.cuda.get_device_properties(torch.device(device)).total_memory
        choice = choose_recompute(shape, tokens, setup, gpu_bytes, act_bytes, packed, chunk_tokens)
        recompute = choice.policy
        reasons.append(f"recompute by memory model for {tokens} tokens: {choice.describe()}")
    else:
        reasons.append("recompute given")
    compile_layers = request.compile_layers
    if compile_layers is None:
        compile_layers = not request.liger and (setup.zero_stage < 3 or COMPILE_UNDER_ZERO3)
        why = ("CUDA default" if compile_layers else
               "off: liger kernels are used uncompiled" if request.liger else "off: compile not measured under ZeRO-3")
        reasons.append(f"compile {why}")
    return SpeedSettings(recompute, compile_layers, request.liger, attention, tuple(reasons))


def training_speed_settings(request: SpeedRequest, model: torch.nn.Module, device, tokens: int, packed: bool,
                            world_size: int = 1, ds_config=None, act_bytes: int = 2,
                            gpu_bytes: int | None = None) -> SpeedSettings:
    """choose_speed_settings for a loaded training model (train.py): shape from its config,
    parameter counts from its weights, ZeRO terms from the DeepSpeed config."""
    params, layer_params = parameter_counts(model, decoder_layers(model)[0])
    weight_bytes = next(model.parameters()).element_size()
    setup = MemorySetup(params, layer_params, weight_bytes, world_size=world_size, **deepspeed_memory_fields(ds_config))
    dtype = torch.bfloat16 if act_bytes == 2 else torch.float32
    attention = choose_backend(device, dtype)
    return choose_speed_settings(request, device, ModelShape.from_config(model.config), setup, tokens, packed,
                                 attention, act_bytes, gpu_bytes)


def apply_speed_settings(model: torch.nn.Module, settings: SpeedSettings) -> bool:
    """Liger kernels, then LongAlign's recompute wrappers (+ compile); True when the wrappers now own
    the layers' checkpointing (transformers' gradient checkpointing must then stay off)."""
    if settings.liger:
        apply_liger_kernels(model)
    if settings.recompute is None and not settings.compile_layers:
        return False
    apply_recompute(model, settings.recompute or "none", compile=settings.compile_layers)
    return True
