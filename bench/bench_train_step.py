"""Single-GPU training-step benchmark: random-init ~1.4B Llama on 64k-token packs (issue 8).

    python bench/bench_train_step.py --out bench/train_step.json          # GPU, bf16
    python bench/bench_train_step.py --smoke                              # CPU, tiny, seconds

One step = forward + backward (gradient checkpointing) + AdamW step on one packed batch (DESIGN.md
§3, built by longalign.collators.PackCollator), bf16 weights, no offload. Reported as one JSON line
(also written to --out): tokens/s, step seconds (median over --steps after --warmup), peak memory,
and MFU = model FLOPs / (step seconds x measured peak), model FLOPs = 6 N T + 6 n_layers d sum L^2
(longalign.trainer.training_flops: attention included, recomputation not counted), the peak being
the best of a bf16 (fp32 with --smoke) square-matmul timing on this device.

Sequence lengths are synthetic, "LongAlign-like": a seeded mixture of short chat turns
(log-uniform in [SHORT_MIN, SHORT_MAX]) and long documents (uniform in [LONG_MIN, pack length]),
LONG_FRACTION of them long, packed greedily into packs of at most --pack_tokens tokens. They are
not the real LongAlign-10k lengths.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from longalign.collators import PackCollator  # noqa: E402
from longalign.constants import IGNORE_INDEX  # noqa: E402
from longalign.trainer import matmul_parameters, training_flops  # noqa: E402

SHORT_MIN, SHORT_MAX, LONG_MIN, LONG_FRACTION = 64, 4096, 8192, 0.5
PROMPT_FRACTION = 0.9  # long-context SFT: most tokens are the (unlabelled) document


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--layers", type=int, default=24)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--intermediate", type=int, default=5632)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--pack_tokens", type=int, default=65536)
    p.add_argument("--steps", type=int, default=5, help="timed steps")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    p.add_argument("--matmul_size", type=int, default=8192)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="also write the JSON line here")
    p.add_argument("--smoke", action="store_true", help="tiny CPU run (tests)")
    args = p.parse_args(argv)
    if args.smoke:
        args.hidden, args.layers, args.heads, args.intermediate, args.vocab = 64, 2, 4, 128, 256
        args.pack_tokens, args.steps, args.warmup, args.matmul_size = 512, 2, 1, 256
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


def measured_peak_flops(size: int, dtype: torch.dtype, device: torch.device, repeats: int = 10) -> float:
    """Best FLOP/s of a (size x size) @ (size x size) matmul."""
    a = torch.randn(size, size, dtype=dtype, device=device)
    b = torch.randn(size, size, dtype=dtype, device=device)
    best = float("inf")
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        a @ b
        synchronize(device)
        best = min(best, time.perf_counter() - start)
    return 2.0 * size ** 3 / best


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build_model(args, device, dtype):
    from modeling_llama import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=args.hidden, num_hidden_layers=args.layers, num_attention_heads=args.heads,
                         num_key_value_heads=args.heads, intermediate_size=args.intermediate,
                         vocab_size=args.vocab, max_position_embeddings=args.pack_tokens)
    torch.manual_seed(args.seed)
    model = LlamaForCausalLM(config).to(device=device, dtype=dtype)
    model.gradient_checkpointing_enable()
    model.train()
    return model


def run(args) -> dict:
    device = torch.device("cpu" if args.smoke or not torch.cuda.is_available() else "cuda")
    dtype = torch.float32 if args.smoke else torch.bfloat16
    model = build_model(args, device, dtype)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, betas=(0.9, 0.95), weight_decay=0.0)
    collate = PackCollator("sequence")
    batches = [collate([row]) for row in synthetic_packs(args.warmup + args.steps, args.pack_tokens,
                                                          args.vocab, args.seed)]
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times, losses = [], []
    for i, batch in enumerate(batches):
        batch = {k: v.to(device) for k, v in batch.items() if k != "batch_counts"}
        synchronize(device)
        start = time.perf_counter()
        loss = model(**batch, loss_reduction="mean").loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        synchronize(device)
        if i >= args.warmup:
            times.append(time.perf_counter() - start)
            losses.append(loss.item())
    timed = batches[args.warmup:]
    tokens = statistics.mean(int(b["input_ids"].numel()) for b in timed)
    sum_sq = statistics.mean(int(b["batch_counts"][4]) for b in timed)
    seconds = statistics.median(times)
    layers, width = args.layers, args.hidden
    flops = training_flops(matmul_parameters(model), layers, width, tokens, sum_sq)
    peak = measured_peak_flops(args.matmul_size, dtype, device)
    return {"benchmark": "train_step", "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "dtype": str(dtype).replace("torch.", ""), "params": sum(p.numel() for p in model.parameters()),
            "pack_tokens": args.pack_tokens, "tokens_per_step": tokens, "step_seconds": seconds,
            "tokens_per_s": tokens / seconds, "model_tflops_per_step": flops / 1e12,
            "measured_peak_tflops": peak / 1e12, "mfu": flops / seconds / peak,
            "peak_memory_gib": torch.cuda.max_memory_allocated(device) / 2 ** 30 if device.type == "cuda" else None,
            "loss_finite": all(map(lambda v: v == v and abs(v) != float("inf"), losses)),
            "steps": args.steps, "warmup": args.warmup, "gradient_checkpointing": True, "smoke": args.smoke}


def main(argv=None) -> dict:
    args = parse_args(argv)
    result = run(args)
    line = json.dumps(result)
    print(line, flush=True)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(line + "\n")
    return result


if __name__ == "__main__":
    main()
