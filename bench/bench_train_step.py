"""Single-GPU training-step benchmark: random-init ~1.4B Llama on 64k-token packs.

    python bench/bench_train_step.py --out bench/train_step.json          # GPU, bf16
    python bench/bench_train_step.py --smoke                              # CPU, tiny, seconds
    python bench/bench_train_step.py --recompute selective --attn_backend flex --compile
    python bench/bench_train_step.py --sweep --out bench/train_sweep.jsonl  # DEFAULT_SWEEP, one process each

One step = forward + backward (recompute policy --recompute: longalign.ops.recompute) + AdamW step on
one packed batch (DESIGN.md §3, built by longalign.train.collators.PackCollator), bf16 weights, no
offload. Reported as one JSON line (also written to --out): tokens/s, step seconds (median over
--steps after --warmup), peak memory, and MFU = model FLOPs / (step seconds x measured peak), model FLOPs = 6 N T + 6 n_layers d sum L^2
(longalign.train.trainer.training_flops: attention included, recomputation not counted), the peak being
the best of a bf16 (fp32 with --smoke) square-matmul timing on this device.

Sequence lengths are synthetic, "LongAlign-like": a seeded mixture of short chat turns
(log-uniform in [SHORT_MIN, SHORT_MAX]) and long documents (uniform in [LONG_MIN, pack length]),
LONG_FRACTION of them long, packed greedily into packs of at most --pack_tokens tokens. They are
not the real LongAlign-10k lengths.

--sweep runs configurations (DEFAULT_SWEEP, or the quoted argument strings given) one after the
other, each in a fresh subprocess (bench/config_runs.py: no allocator fragmentation carried over,
an OOM fails only its own line; inductor's on-disk cache is shared, so a later compiled run
compiles faster), with the other flags of this command line in common and --warmup 2 --steps 3
unless given. It prints each result as one JSON line (and rewrites --out after each), then a
summary table; configurations that would start after --sweep_budget_s are skipped and listed.

--compile compiles each layer's forward with dynamic shapes (pack lengths vary). The attention call
is a graph break (the kernel runs eagerly; flex is compiled on its own), so a layer is two graphs.
The JSON reports dynamo's counters and `recompiled_during_timing`: true means a timed step paid
for compilation (the table marks it).

The paper's model widths: `--width llama2-7b` (hidden 4096, 32 heads, MLP 11008, vocab 32000,
32 layers) and `--width chatglm3-6b` (`--family chatglm`: this repo's ChatGLM3 code, hidden 4096,
32 heads in 2 key/value groups, MLP 13696, vocab 65024, 28 layers). `--layers auto` takes as many
of the width's layers as longalign.train.speed.memory_model predicts to fit this GPU with the optimizer under
the run's policy; `--recompute auto` is train.py's automatic choice (the same memory model). Every
run reports that model's `predicted_peak_gib` beside the measured peak, and with fewer layers than
the release `step_seconds_scaled_to_depth` (step time x depth / layers: scaled, not measured).
`--liger` applies liger-kernel's RMSNorm/SwiGLU/RoPE (longalign.train.speed.liger; Llama, CUDA);
`--speed_defaults` takes recompute policy and compile as train.py would choose them without flags.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from pathlib import Path

import torch
from transformers import LlamaConfig

from config_runs import run_budgeted, run_in_subprocess
from step_timing import measured_peak_flops, measurement, pack_counts, time_steps

from longalign.ops.varlen_attention import ENV_VAR as ATTN_ENV, choose_backend
from longalign.train.collators import PackCollator
from longalign.constants import IGNORE_INDEX
from longalign.train.speed.liger import apply_liger_kernels
from longalign.modeling.configuration_chatglm import ChatGLMConfig
from longalign.modeling.packed_attention import ATTN_IMPLEMENTATION, register_packed_attention
from longalign.modeling.weighted_lm import TRAINING_CLASSES
from longalign.ops.weighted_loss import DEFAULT_CHUNK_TOKENS
from longalign.modeling.shape import ModelShape
from longalign.train.speed.memory_model import (GIB, MEMORY_HEADROOM, Kernels, MemorySetup, SpeedRequest,
                                                choose_recompute, choose_speed_settings, parameter_counts,
                                                predicted_peak_bytes)
from longalign.ops.recompute import apply_recompute, decoder_layers

SHORT_MIN, SHORT_MAX, LONG_MIN, LONG_FRACTION = 64, 4096, 8192, 0.5
PROMPT_FRACTION = 0.9  # long-context SFT: most tokens are the (unlabelled) document
# Most promising first. Memory (1.4B, 64k, bf16): ~11 GiB weights + grads + AdamW states; per
# layer ~0.25 GiB checkpointed (full), ~1.5 GiB selective (q, k, v, out kept), ~6 GiB none.
DEFAULT_SWEEP = (
    "--recompute full --attn_backend torch_varlen",  # today's baseline (3.49 s, MFU 0.295)
    "--recompute selective --attn_backend torch_varlen",
    "--recompute selective --attn_backend flex",
    "--recompute selective:12 --attn_backend flex",  # 12 selective + 12 not checkpointed
    "--recompute partial:10 --attn_backend flex",
    "--recompute selective --attn_backend flex --compile",
    "--recompute selective:12 --attn_backend flex --compile",
)

# The paper's models, layer for layer (released configs); depth = the release's number of layers.
WIDTHS = {
    "llama2-7b": dict(family="llama", hidden=4096, heads=32, kv_heads=32, intermediate=11008, vocab=32000, depth=32),
    "chatglm3-6b": dict(family="chatglm", hidden=4096, heads=32, kv_heads=2, intermediate=13696, vocab=65024,
                        depth=28),
}
SMOKE_DEPTH = 4
CHATGLM_ROPE_RATIO = 200.0  # LongAlign's ChatGLM training (constants of the modeling code's docs)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--family", choices=sorted(TRAINING_CLASSES), default="llama")
    p.add_argument("--width", choices=sorted(WIDTHS), default=None, help="the paper's layer shapes (docstring)")
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--layers", default="24", help="a number, or auto (docstring)")
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--kv_heads", type=int, default=None, help="default: --heads")
    p.add_argument("--intermediate", type=int, default=5632)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--gpu_gib", type=float, default=None, help="GPU memory for the memory model (default: this GPU's)")
    p.add_argument("--liger", action="store_true", help="liger-kernel RMSNorm/SwiGLU/RoPE (Llama, CUDA)")
    p.add_argument("--speed_defaults", action="store_true",
                   help="recompute policy and compile as train.py chooses them without flags (longalign.train.speed.memory_model)")
    p.add_argument("--pack_tokens", type=int, default=65536)
    p.add_argument("--steps", type=int, default=5, help="timed steps")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    p.add_argument("--matmul_size", type=int, default=8192)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="also write the JSON line here")
    p.add_argument("--smoke", action="store_true", help="tiny CPU run (tests)")
    p.add_argument("--recompute", default="full",
                   help="full | selective | none | partial:K | selective:K (longalign.ops.recompute) | auto")
    p.add_argument("--compile", action="store_true", help="torch.compile each decoder layer (dynamic)")
    p.add_argument("--compile_backend", default="inductor")
    p.add_argument("--attn_backend", default=None, help="sets LONGALIGN_ATTN_BACKEND")
    p.add_argument("--profile", action="store_true",
                   help="after the timed steps, profile one more step: kernel time by category")
    p.add_argument("--sweep", nargs="*", default=None, metavar="CONFIG",
                   help="run each quoted flag string, e.g. \"--recompute full\" (a lone flag needs a "
                        "trailing space), in its own subprocess; none given: DEFAULT_SWEEP")
    p.add_argument("--sweep_budget_s", type=float, default=450.0,
                   help="start no configuration after this many seconds of the sweep")
    args = p.parse_args(argv)
    args.depth = None
    if args.width:
        for key, value in WIDTHS[args.width].items():
            setattr(args, key, value)
    if args.smoke:  # tiny shapes; a --width keeps its family and gets a depth of SMOKE_DEPTH
        args.hidden, args.heads, args.intermediate, args.vocab = 64, 4, 128, 256
        args.kv_heads = 2 if args.family == "chatglm" else None
        args.depth = SMOKE_DEPTH if args.width else None
        args.layers = args.layers if args.width else "2"
        args.pack_tokens, args.steps, args.warmup, args.matmul_size = 512, 2, 1, 256
    args.kv_heads = args.kv_heads or args.heads
    if args.layers != "auto":
        args.layers = int(args.layers)
    elif args.depth is None or args.speed_defaults:
        p.error("--layers auto needs --width (the depth to fill up to) and no --speed_defaults")
    return args


def synthetic_packs(n_packs: int, pack_tokens: int, vocab: int, seed: int) -> list[dict]:
    """Greedy packs of mixed short/long sequences (module docstring), rows as in DESIGN.md §2."""
    g = torch.Generator().manual_seed(seed)
    short_max = min(SHORT_MAX, pack_tokens)
    long_min = min(LONG_MIN, pack_tokens // 2)
    packs = []
    for _ in range(n_packs):
        ids, labels, cu = [], [], [0]
        while True:
            if torch.rand(1, generator=g).item() < LONG_FRACTION:
                length = int(torch.randint(long_min, pack_tokens + 1, (1,), generator=g))
            else:
                log_len = torch.empty(1).uniform_(torch.log(torch.tensor(float(SHORT_MIN))).item(),
                                                  torch.log(torch.tensor(float(short_max))).item(), generator=g)
                length = max(2, int(log_len.exp()))
            if cu[-1] + length > pack_tokens:
                break
            seq = torch.randint(0, vocab, (length,), generator=g)
            prompt = int(length * PROMPT_FRACTION)
            ids += seq.tolist()
            labels += [IGNORE_INDEX] * prompt + seq[prompt:].tolist()
            cu.append(cu[-1] + length)
        if len(cu) == 1:  # nothing fitted: one sequence of the whole pack
            seq = torch.randint(0, vocab, (pack_tokens,), generator=g).tolist()
            ids, labels, cu = seq, seq, [0, pack_tokens]
        packs.append({"input_ids": ids, "labels": labels, "cu_seqlens": cu})
    return packs


def model_config(args, layers: int, attn_implementation: str = ATTN_IMPLEMENTATION):
    """The run's LlamaConfig or ChatGLMConfig, with LongAlign's packed attention unless told otherwise."""
    register_packed_attention()
    if args.family == "chatglm":
        return ChatGLMConfig(num_layers=layers, padded_vocab_size=args.vocab, hidden_size=args.hidden,
                             ffn_hidden_size=args.intermediate, kv_channels=args.hidden // args.heads,
                             num_attention_heads=args.heads, multi_query_attention=args.kv_heads < args.heads,
                             multi_query_group_num=args.kv_heads, seq_length=args.pack_tokens,
                             rope_ratio=CHATGLM_ROPE_RATIO, attn_implementation=attn_implementation)
    return LlamaConfig(attn_implementation=attn_implementation, use_cache=False, hidden_size=args.hidden, num_hidden_layers=layers,
                       num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
                       intermediate_size=args.intermediate, vocab_size=args.vocab,
                       max_position_embeddings=args.pack_tokens)


def memory_plan(args, tokens: int, gpu_bytes: int | None, device, dtype) -> dict:
    """Layers, policy and compile (resolving `auto` and --speed_defaults) and the memory model's peak."""
    config = model_config(args, args.depth or args.layers)
    with torch.device("meta"):  # parameter counts without allocating
        meta = TRAINING_CLASSES[args.family](config)
    params, layer_params = parameter_counts(meta, decoder_layers(meta)[0])
    shape = ModelShape.from_config(config)

    def plan(layers: int) -> tuple[str, int]:
        sized = ModelShape(**{**shape.__dict__, "layers": layers})
        setup = MemorySetup(params - (shape.layers - layers) * layer_params, layer_params, 2)
        kernels = Kernels(fused=args.compile or args.liger, attention=choose_backend(device, dtype))
        if args.recompute == "auto":
            choice = choose_recompute(sized, tokens, setup, gpu_bytes or 0, kernels=kernels)
            return choice.policy, choice.predicted_bytes
        return args.recompute, predicted_peak_bytes(sized, args.recompute, tokens, setup, 2, DEFAULT_CHUNK_TOKENS,
                                                    kernels)

    if args.speed_defaults:  # train.py's own choice for this model, packs and GPU
        sized = ModelShape(**{**shape.__dict__, "layers": args.layers})
        settings = choose_speed_settings(SpeedRequest(), device, sized, MemorySetup(params, layer_params, 2), tokens,
                                         True, choose_backend(device, dtype), gpu_bytes=gpu_bytes)
        args.recompute, args.compile = settings.recompute or "none", settings.compile_layers
        plan_dict = {"speed_settings": settings.log_line()}
    else:
        plan_dict = {}

    layers = args.layers
    if layers == "auto":
        budget = MEMORY_HEADROOM * gpu_bytes if gpu_bytes else float("inf")
        layers = next((n for n in range(shape.layers, 0, -1) if plan(n)[1] <= budget), 1)
    policy, peak = plan(layers)
    return {"layers": layers, "recompute": policy, "predicted_peak_gib": peak / GIB, **plan_dict}


def build_model(args, device, dtype, layers: int, policy: str):
    torch.manual_seed(args.seed)
    with torch.device(device):  # random init on the GPU: seconds, not a minute of CPU init
        model = TRAINING_CLASSES[args.family](model_config(args, layers)).to(dtype=dtype)
    if args.liger:
        apply_liger_kernels(model)
    apply_recompute(model, policy, compile=args.compile, compile_backend=args.compile_backend)
    model.train()
    return model


def run(args) -> dict:
    device = torch.device("cpu" if args.smoke or not torch.cuda.is_available() else "cuda")
    dtype = torch.float32 if args.smoke else torch.bfloat16
    if args.attn_backend:
        os.environ[ATTN_ENV] = args.attn_backend  # read by varlen_attention at every call
    peak = measured_peak_flops(args.matmul_size, dtype, device)
    rows = synthetic_packs(args.warmup + args.steps + int(args.profile), args.pack_tokens, args.vocab, args.seed)
    counts = pack_counts(rows)
    requested = "speed_defaults" if args.speed_defaults else args.recompute
    gpu_bytes = (args.gpu_gib * GIB if args.gpu_gib else
                 torch.cuda.get_device_properties(device).total_memory if device.type == "cuda" else None)
    plan = memory_plan(args, max(t for t, _ in counts), gpu_bytes, device, dtype)
    model = build_model(args, device, dtype, plan["layers"], plan["recompute"])
    # fused: one kernel per parameter group instead of foreach's several (HF's adamw_torch_fused)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, betas=(0.9, 0.95), weight_decay=0.0,
                                  fused=device.type == "cuda")
    collate = PackCollator("sequence")

    def train_step(batch):
        loss = model(**batch, loss_aggregation="mean").loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    timing = time_steps(train_step, [collate([row]) for row in rows], device, args.warmup, args.steps, args.profile)
    result = measurement(model, plan["layers"], args.hidden, counts[args.warmup:args.warmup + args.steps], timing,
                         peak, device)
    depth = args.depth or plan["layers"]
    scaled = {"step_seconds_scaled_to_depth": result["step_seconds"] * depth / plan["layers"]} \
        if depth != plan["layers"] else {}
    return {"benchmark": "train_step", **result, "dtype": str(dtype).replace("torch.", ""),
            "family": args.family, "width": args.width, "hidden": args.hidden, "depth": depth, **plan, **scaled,
            "recompute_requested": requested, "pack_tokens": args.pack_tokens, "steps": args.steps,
            "warmup": args.warmup, "gradient_checkpointing": plan["recompute"] != "none",
            "attn_backend": choose_backend(device, dtype), "compile": args.compile, "liger": args.liger,
            "smoke": args.smoke, "optimizer": "AdamW(fused)" if device.type == "cuda" else "AdamW(foreach)"}


SWEEP_STEPS = ["--warmup", "2", "--steps", "3"]  # per configuration, overridable by the command line
CONFIG_TIMEOUT_S = 300


def _common_argv(argv: list[str]) -> list[str]:
    """The command line minus --sweep (and its configuration strings), --out, --sweep_budget_s."""
    out, i = [], 0
    while i < len(argv):
        tok = argv[i]
        if tok == "--sweep":
            i += 1
            while i < len(argv) and (" " in argv[i] or not argv[i].startswith("-")):
                i += 1
            continue
        if tok in ("--out", "--sweep_budget_s"):
            i += 2
            continue
        if not tok.startswith(("--out=", "--sweep_budget_s=", "--sweep=")):
            out.append(tok)
        i += 1
    return out


def summary_table(results: list[dict]) -> str:
    rows = [f"{'config':<58} {'step_s':>7} {'tok/s':>8} {'mfu':>6} {'peakGiB':>8} {'wall_s':>7}"]
    for r in results:
        if "error" in r or "skipped" in r:
            status = r.get("skipped") or "FAILED: " + r["error"].strip().splitlines()[-1][:60]
            rows.append(f"{r['config']:<58} {status}")
            continue
        mem = r["peak_memory_gib"]
        flag = " (recompiled while timed)" if r.get("recompiled_during_timing") else ""
        rows.append(f"{r['config']:<58} {r['step_seconds']:7.3f} {r['tokens_per_s']:8.0f} {r['mfu']:6.3f} "
                    f"{mem if mem is None else round(mem, 1)!s:>8} {r['wall_s']:7.1f}{flag}")
    return "\n".join(rows)


def sweep(args, argv: list[str]) -> list[dict]:
    """Run each configuration in its own process (module docstring); JSON lines, then the table."""
    common = _common_argv(argv)

    def one(config: str, timeout_s: float) -> dict:
        result = run_in_subprocess(Path(__file__).resolve(), [*SWEEP_STEPS, *common, *shlex.split(config)], timeout_s)
        print(json.dumps({"config": config, **result}), flush=True)
        return result

    def save(results: list[dict]) -> None:
        if args.out:
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text("".join(json.dumps(r) + "\n" for r in results))

    results = run_budgeted(args.sweep or list(DEFAULT_SWEEP), one, args.sweep_budget_s, CONFIG_TIMEOUT_S,
                           on_result=save)
    print(summary_table(results), flush=True)
    return results


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    if args.sweep is not None:
        return sweep(args, argv)
    result = run(args)
    line = json.dumps(result)
    print(line, flush=True)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(line + "\n")
    return result


if __name__ == "__main__":
    main()
