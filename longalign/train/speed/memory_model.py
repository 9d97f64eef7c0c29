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
autograd keeps for the backward (counted storage by storage in tests/train/test_performance.py, eager
and compiled). The attention core (`Kernels.attention`) keeps, per token:

    fused kernels (FlashAttention, torch varlen, flex): q, k (after RoPE), v, out, fp32 lse
          A = b (2H + 2G) d + 4H          ChatGLM: b (H + G + (H + 2G) + H) d + 4H (the fused qkv
                                          output, kept alive by the view v)
    per-sequence SDPA (cudnn, reference): besides, k and v repeated to H heads and the per-sequence
          outputs beside their concatenation: A + 3 b H d while the kept graph holds q, k, v
          (selective); 5 b H d + 4H when nothing else does (none: the originals of k, v die)

and the rest of the layer, by how its norms and SwiGLU run (`Kernels.fused`):

    eager     N + M,  N = 2 [(4 + 2b) h + 4]   Llama: fp32 copy of the input, normalised x, weight * x
                          2 [(8 + b) h + 4]    ChatGLM: fp32 copy, fp32 normalised x, its cast result
                      M = 4 b f                gate, silu(gate), up, silu(gate) * up
    fused     F = 4 b h + 8 + 3 b f            torch.compile (inductor's partition) or Liger's kernels:
                                               each norm's input and output and fp32 rstd; gate, up and
                                               silu(gate) * up (the rest is recomputed in the backward)

    per layer, by policy (longalign.ops.recompute):
        none       T (A + N + M)  or  T (A + F)
        selective  T (b h + A)         the checkpointed input + the kept attention tensors
        full       T b h               the checkpointed input
        offload    0                   selective's tensors are in host memory (see below)

A checkpointed layer's `none` activations exist once more while it runs its backward (R_l, the
recompute), less what is already kept: the attention tensors under selective/offload (the kernel
is not re-run), and with fused kernels the layer input (the compiled graph saves the checkpointed
input itself). Its backward peaks in the MLP's: W = T (2 b f + b h) (the gradients of silu(gate)
and up beside that of the down projection's input, once that input is freed, and the gradient
arriving from above). An `offload` layer in backward has its own selective tensors back on the
GPU and the previous layer's prefetched (2 T (b h + A) beside R_l); at the end of the forward up
to OFFLOAD_LAYERS_IN_FLIGHT layers' copies may be pending. When the loss backward starts, the
activations of every layer exist beside the final norm's (eager, outside the layers: N / 2), the
final hidden states and their gradient (2 b T h) and the loss (longalign.ops.weighted_loss): C V (8 + b) + 4 V h
(one chunk of C tokens: fp32 logits, their fp32 gradient and its cast; the fp32 head-gradient
accumulator).

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

    peak = R_w + R_o + max( sum_k S_k + final norm + loss + G_0 ,
                            max_l [ G_0 + sum_{k >= l} G_k + sum_{k <= l} S_k + R_l + W ] )

Pinned by tests/train/test_performance.py against every peak recorded under bench/measured/ (one H200,
compiled and eager, 64k to 512k tokens, three widths; bench/measured_memory.py).

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

from longalign.modeling.shape import ModelShape
from longalign.ops.recompute import OFFLOAD_LAYERS_IN_FLIGHT, apply_recompute, decoder_layers, parse_policy
from longalign.ops.varlen_attention import choose_backend
from longalign.train.speed.liger import apply_liger_kernels

MEMORY_HEADROOM = 0.90  # of the GPU's memory: CUDA context, allocator fragmentation, NCCL buffers
ZERO3_GATHERED_LAYERS = 2  # ZeRO-3: the layer computing and the one being prefetched
FP32_BYTES = 4
NORM_STAT_BYTES = 4  # one fp32 rstd per token and norm
MLP_NET_GRADIENTS = 2  # (T, f) gradients beyond the freed down-projection input, in an MLP backward
FUSED_SAVED_NORM_TENSORS = 2  # a fused norm keeps its input and its output (b bytes each) + fp32 rstd
FUSED_SAVED_MLP_TENSORS = 3  # gate, up, silu(gate) * up
EAGER_SAVED_MLP_TENSORS = 4  # gate, silu(gate), up, silu(gate) * up
PER_SEQUENCE_EXTRA_HEADS = 3  # per-sequence SDPA: k and v repeated to H heads, per-sequence outputs
PER_SEQUENCE_NONE_HEADS = 5  # q, repeated k and v, per-sequence outputs, their concatenation
LOSS_FP32_COPIES = 2  # one chunk's fp32 logits and their softmax gradient
PER_SEQUENCE_ATTENTION = ("cudnn", "reference")  # backends that run SDPA sequence by sequence
GIB = 2 ** 30
# Layer compile by default only where it was measured: single GPU / DDP. Under ZeRO-3 DeepSpeed hooks
# every Linear inside a compiled layer (graph breaks), and no run has timed it yet.
COMPILE_UNDER_ZERO3 = False


@dataclass(frozen=True)
class Kernels:
    """How a layer computes (module docstring): fused norms/SwiGLU (compiled layers or Liger), and
    the attention backend (fused varlen kernel, or per-sequence SDPA)."""
    fused: bool = False
    attention: str = "flash_attn_cute"

    @property
    def per_sequence(self) -> bool:
        return self.attention in PER_SEQUENCE_ATTENTION


def _attention_bytes(shape: ModelShape, b: int, kernels: Kernels) -> tuple[int, int]:
    """(A kept under selective, A kept under none) per token (module docstring)."""
    H, G, d = shape.heads, shape.kv_heads, shape.head_dim
    kv = G + (H + 2 * G) if shape.family == "chatglm" else 2 * G  # ChatGLM: k and the fused qkv output
    fused = b * (2 * H + kv) * d + FP32_BYTES * H
    if not kernels.per_sequence:
        return fused, fused
    return fused + PER_SEQUENCE_EXTRA_HEADS * b * H * d, PER_SEQUENCE_NONE_HEADS * b * H * d + FP32_BYTES * H


def _final_norm_bytes(shape: ModelShape, b: int) -> int:
    """Per token, one eager norm (the model's final one; module docstring N / 2)."""
    return (8 + b) * shape.hidden + NORM_STAT_BYTES if shape.family == "chatglm" else \
        (4 + 2 * b) * shape.hidden + NORM_STAT_BYTES


def layer_activation_bytes(shape: ModelShape, tokens: int, act_bytes: int, kernels: Kernels = Kernels()) -> dict:
    """Bytes one layer keeps on the GPU for backward under each policy (module docstring)."""
    b, h, f = act_bytes, shape.hidden, shape.intermediate
    kept, unshared = _attention_bytes(shape, b, kernels)
    if kernels.fused:
        rest = FUSED_SAVED_NORM_TENSORS * 2 * b * h + 2 * NORM_STAT_BYTES + FUSED_SAVED_MLP_TENSORS * b * f
    else:
        rest = 2 * _final_norm_bytes(shape, b) + EAGER_SAVED_MLP_TENSORS * b * f
    return {"none": tokens * (unshared + rest), "selective": tokens * (b * h + kept), "full": tokens * b * h,
            "offload": 0}


def recompute_bytes(shape: ModelShape, tokens: int, act_bytes: int, kernels: Kernels = Kernels()) -> dict:
    """R_l by policy: a checkpointed layer's activations rebuilt for its backward, less what it
    already keeps (module docstring)."""
    b, h = act_bytes, shape.hidden
    none = layer_activation_bytes(shape, tokens, b, kernels)["none"]
    input_shared = tokens * b * h if kernels.fused else 0
    kernel_kept = tokens * _attention_bytes(shape, b, kernels)[1]
    return {"none": 0, "full": none - input_shared, "selective": none - input_shared - kernel_kept,
            "offload": none - input_shared - kernel_kept}


def backward_workspace_bytes(shape: ModelShape, tokens: int, act_bytes: int) -> int:
    return tokens * act_bytes * (MLP_NET_GRADIENTS * shape.intermediate + shape.hidden)


def loss_bytes(shape: ModelShape, tokens: int, act_bytes: int, chunk_tokens: int) -> int:
    """The final norm, hidden states and their gradient, and the chunked loss (module docstring)."""
    chunk = min(chunk_tokens, tokens)
    return (chunk * shape.vocab * (LOSS_FP32_COPIES * FP32_BYTES + act_bytes)
            + FP32_BYTES * shape.vocab * shape.hidden
            + tokens * (2 * act_bytes * shape.hidden + _final_norm_bytes(shape, act_bytes)))


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

    def resident_bytes(self, optimizer_state: bool = True) -> int:
        """R_w + R_o: weights (+ ZeRO-3's gathered layers) and optimizer state (if created yet)."""
        weights = 0 if self.offload_params else self.params * self.weight_bytes // self._share(3)
        if self.zero_stage >= 3:
            weights += ZERO3_GATHERED_LAYERS * self.layer_params * self.weight_bytes
        state_bytes = FP32_BYTES if self.master_weights else self.weight_bytes
        per_param = 2 * FP32_BYTES * int(self.master_weights) + 2 * state_bytes
        optimizer = 0 if self.offload_optimizer or not optimizer_state else self.params * per_param // self._share(1)
        return weights + optimizer

    def gradient_bytes(self, layers: int) -> tuple[int, int]:
        """(G_k of one layer, G_0 of the parameters outside the layers)."""
        layer = self.layer_params * self.weight_bytes // self._share(2)
        rest = max(self.params - layers * self.layer_params, 0) * self.weight_bytes // self._share(2)
        return layer, rest


def predicted_peak_bytes(shape: ModelShape, policy: str, tokens: int, setup: MemorySetup, act_bytes: int,
                         chunk_tokens: int, kernels: Kernels = Kernels(), optimizer_state: bool = True) -> int:
    """The module docstring's peak: end of forward, or the worst layer of the backward
    (optimizer_state False: a first step, before AdamW has created its states)."""
    per_layer = layer_activation_bytes(shape, tokens, act_bytes, kernels)
    rebuilt = recompute_bytes(shape, tokens, act_bytes, kernels)
    modes = parse_policy(policy, shape.layers)
    saved = [per_layer[m] for m in modes]
    # an offload layer's own tensors back on the GPU and the previous layer's prefetched; copies pending
    returned = [2 * per_layer["selective"] if m == "offload" else 0 for m in modes]
    in_flight = OFFLOAD_LAYERS_IN_FLIGHT * per_layer["selective"] if "offload" in modes else 0
    layer_grad, other_grad = setup.gradient_bytes(shape.layers)
    workspace = backward_workspace_bytes(shape, tokens, act_bytes)
    after_forward = sum(saved) + in_flight + loss_bytes(shape, tokens, act_bytes, chunk_tokens) + other_grad
    in_backward = max(other_grad + (shape.layers - l) * layer_grad + sum(saved[:l + 1]) + rebuilt[modes[l]]
                      + returned[l] + workspace for l in range(shape.layers))
    return setup.resident_bytes(optimizer_state) + max(after_forward, in_backward)


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
                     packed: bool = True, chunk_tokens: int = 4096, kernels: Kernels = Kernels()) -> RecomputeChoice:
    """The first policy of `recompute_ladder` whose predicted peak fits MEMORY_HEADROOM x gpu_bytes
    (`offload` is not on the ladder: its speed depends on the host link and has not been measured)."""
    budget = int(MEMORY_HEADROOM * gpu_bytes)

    def peak(policy: str) -> int:
        return predicted_peak_bytes(shape, policy, tokens, setup, act_bytes, chunk_tokens, kernels)

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
    compile_layers = request.compile_layers
    if compile_layers is None:
        compile_layers = not request.liger and (setup.zero_stage < 3 or COMPILE_UNDER_ZERO3)
        why = ("CUDA default" if compile_layers else
               "off: liger kernels are used uncompiled" if request.liger else "off: compile not measured under ZeRO-3")
        reasons.append(f"compile {why}")
    recompute = request.recompute
    if recompute is None:  # the activations kept depend on compile / liger (module docstring: F)
        if gpu_bytes is None:
            gpu_bytes = torch.cuda.get_device_properties(torch.device(device)).total_memory
        kernels = Kernels(fused=compile_layers or request.liger, attention=attention)
        choice = choose_recompute(shape, tokens, setup, gpu_bytes, act_bytes, packed, chunk_tokens, kernels)
        recompute = choice.policy
        reasons.insert(0, f"recompute by memory model for {tokens} tokens: {choice.describe()}")
    else:
        reasons.insert(0, "recompute given")
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
