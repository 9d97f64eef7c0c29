"""Varlen attention fwd+bwd per backend on one 64k pack of LongAlign-like sequence lengths.

    python bench/bench_attention.py --out bench/attention.json          # GPU (H100/H200)
    python bench/bench_attention.py --smoke --out /tmp/attn_smoke.json  # CPU, seconds

The pack: a seeded mixture of long documents (log-uniform 8k-32k tokens, the LongAlign-10k
range) and short chats (log-uniform 256-4k, ShareGPT-like), drawn until they fill `--tokens`;
the last sequence takes the remainder. Llama-7B-like heads (32 x 128), bf16.

FLOPs of block-causal attention, counting only unmasked (query, key) pairs l(l+1)/2 per sequence:
    fwd  = 4 * H * D * sum_k l_k (l_k + 1) / 2     (Q K^T and P V: 2 flops per multiply-add each)
    bwd  = 2.5 * fwd                               (5 matmuls of the same size instead of 2)
    fwd+bwd = 3.5 * fwd;  TFLOP/s = FLOPs / time.
Accuracy: each backend's output and q/k/v gradients vs the reference backend run in fp32,
as relative Frobenius error ||x - x_ref|| / ||x_ref||.
Also reported: a measured bf16 matmul peak (8192^3), to put TFLOP/s in context.
"""
from __future__ import annotations

import argparse
import json
import math
import random
import time
import traceback
from pathlib import Path

import torch

from longalign.ops.varlen_attention import BACKENDS, available_backends, varlen_attention

LONG_RANGE, SHORT_RANGE, LONG_FRACTION = (8192, 32768), (256, 4096), 0.5
FULL_PACK = 65536  # the ranges above are for a 64k pack; smaller packs scale them down


def longalign_like_lengths(total: int, seed: int = 0):
    """Seeded sequence lengths summing exactly to `total` (see the module docstring)."""
    rng = random.Random(seed)
    scale = total / FULL_PACK
    lengths = []
    while sum(lengths) < total:
        lo, hi = LONG_RANGE if rng.random() < LONG_FRACTION else SHORT_RANGE
        n = max(1, int(scale * math.exp(rng.uniform(math.log(lo), math.log(hi)))))
        lengths.append(min(n, total - sum(lengths)))
    return lengths


def causal_flops_fwd(lengths, heads: int, head_dim: int) -> float:
    return 4.0 * heads * head_dim * sum(n * (n + 1) / 2 for n in lengths)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_ms(fn, device, warmup: int, iters: int) -> float:
    for _ in range(warmup):
        fn()
    _sync(device)
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    _sync(device)
    return (time.perf_counter() - start) * 1e3 / iters


def matmul_peak_tflops(device, dtype, size: int, warmup: int, iters: int) -> float:
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    ms = time_ms(lambda: a @ b, device, warmup, iters)
    return 2.0 * size**3 / (ms * 1e-3) / 1e12


def _fwd_bwd(backend, q, k, v, cu, max_len, grad_out):
    leaves = [x.detach().requires_grad_(True) for x in (q, k, v)]
    out = varlen_attention(*leaves, cu, max_seqlen=max_len, backend=backend)
    out.backward(grad_out)
    return out.detach(), [x.grad for x in leaves]


def _rel(x, ref):
    return ((x.float() - ref).norm() / ref.norm()).item()


def _head_slice(tensors, group):
    """Query heads [0, group) and key/value head 0: one GQA group, which attention computes
    independently of the others. The fp32 reference runs on it alone: on all 32 heads of a 23k
    sequence its unfused fallback would need ~65 GiB (measured OOM on an H200)."""
    q, k, v, grad_out = tensors
    return q[:, :group], k[:, :1], v[:, :1], grad_out[:, :group]


def bench_backend(name, inputs, reference, args, device):
    q, k, v, cu, max_len, grad_out = inputs
    group = args.heads // args.kv_heads
    out, (dq, dk, dv) = _fwd_bwd(name, q, k, v, cu, max_len, grad_out)
    dq, dk, dv, out = _head_slice((dq, dk, dv, out), group)  # same layout as (q, k, v, grad_out)
    grads = (dq, dk, dv)
    errors = {"out": _rel(out, reference[0])}
    errors.update({f"d{n}": _rel(g, r) for n, g, r in zip("qkv", grads, reference[1])})
    fwd_ms = time_ms(lambda: varlen_attention(q, k, v, cu, max_seqlen=max_len, backend=name),
                     device, args.warmup, args.iters)
    both_ms = time_ms(lambda: _fwd_bwd(name, q, k, v, cu, max_len, grad_out), device, args.warmup, args.iters)
    return {"fwd_ms": fwd_ms, "fwd_bwd_ms": both_ms, "rel_error_vs_fp32_reference": errors}


def run(args) -> dict:
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    lengths = longalign_like_lengths(args.tokens, args.seed)
    g = torch.Generator(device="cpu").manual_seed(args.seed)
    shape_q, shape_kv = (args.tokens, args.heads, args.head_dim), (args.tokens, args.kv_heads, args.head_dim)
    q, k, v, grad_out = (torch.randn(s, generator=g).to(device, dtype) for s in (shape_q, shape_kv, shape_kv, shape_q))
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32, device=device)
    inputs = (q, k, v, cu, max(lengths), grad_out)
    group = args.heads // args.kv_heads
    q1, k1, v1, g1 = (x.float().contiguous() for x in _head_slice((q, k, v, grad_out), group))
    reference = _fwd_bwd("reference", q1, k1, v1, cu, max(lengths), g1)
    fwd_flops = causal_flops_fwd(lengths, args.heads, args.head_dim)
    result = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "torch": torch.__version__, "dtype": args.dtype, "tokens": args.tokens,
              "lengths": lengths, "heads": args.heads, "kv_heads": args.kv_heads, "head_dim": args.head_dim,
              "fwd_flops": fwd_flops, "fwd_bwd_flops": 3.5 * fwd_flops, "backends": {}, "skipped": {}}
    usable = available_backends(device, dtype)
    for name in args.backends:
        if name not in usable:
            result["skipped"][name] = f"not available on {device.type} / {args.dtype}"
            continue
        if name == "flex" and device.type != "cuda":
            result["skipped"][name] = "FlexAttention has no CPU backward"
            continue
        try:
            r = bench_backend(name, inputs, reference, args, device)
        except Exception as exc:  # a backend failing must not hide the others
            result["skipped"][name] = f"{type(exc).__name__}: {exc}"
            traceback.print_exc()
            continue
        r["fwd_tflops"] = fwd_flops / (r["fwd_ms"] * 1e-3) / 1e12
        r["fwd_bwd_tflops"] = 3.5 * fwd_flops / (r["fwd_bwd_ms"] * 1e-3) / 1e12
        result["backends"][name] = r
        print(f"{name:13s} fwd {r['fwd_ms']:9.2f} ms  fwd+bwd {r['fwd_bwd_ms']:9.2f} ms  "
              f"{r['fwd_bwd_tflops']:7.2f} TFLOP/s  err {r['rel_error_vs_fp32_reference']}", flush=True)
    result["matmul_peak_tflops"] = matmul_peak_tflops(device, dtype, args.matmul_size, args.warmup, args.iters)
    return result


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="JSON file to write")
    p.add_argument("--smoke", action="store_true", help="tiny CPU fp32 run (a test runs it)")
    p.add_argument("--tokens", type=int, default=65536)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=32)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--device", default="cuda")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--matmul-size", type=int, default=8192)
    p.add_argument("--backends", nargs="+", choices=BACKENDS, default=list(BACKENDS),
                   help="which to time (default: all; those not available here are listed as skipped)")
    args = p.parse_args(argv)
    if args.smoke:
        args.tokens, args.heads, args.kv_heads, args.head_dim = 1024, 4, 2, 16
        args.dtype, args.device, args.warmup, args.iters, args.matmul_size = "float32", "cpu", 1, 1, 256
    return args


def main(argv=None):
    args = parse_args(argv)
    result = run(args)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
