"""Peak memory (and time) of the LM-head loss on one 64k pack, with and without chunking.

    python bench/bench_loss_memory.py --out bench/loss_memory.json          # GPU
    python bench/bench_loss_memory.py --smoke --out /tmp/loss_smoke.json    # CPU, seconds

For each vocabulary (65024: ChatGLM3, 32000: Llama-2) and method, forward + backward of the loss
of hidden states (T, 4096) bf16 under an LM head (V, 4096) bf16:
- `unchunked`: logits = h W^T, .float(), F.cross_entropy (what a stock HF forward does);
- `chunked_<c>`: longalign.ops.weighted_loss.causal_lm_loss with chunk_size c.
Peak = torch.cuda.max_memory_allocated during the step minus the memory held before it (inputs
and weights), in GiB. For reference, fp32 logits of the whole pack take T * V * 4 bytes
(64k x 65024 -> 15.9 GiB). A method that runs out of memory is recorded as "OOM".
On CPU (smoke) memory is not measured (null); only that every method runs and agrees.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from longalign.constants import IGNORE_INDEX
from longalign.ops.weighted_loss import causal_lm_loss

GIB = 2**30


def unchunked_loss(hidden, weight, labels):
    logits = (hidden @ weight.t()).float()
    return F.cross_entropy(logits[:-1], labels[1:], ignore_index=IGNORE_INDEX)


def chunked_loss(chunk):
    def fn(hidden, weight, labels):
        return causal_lm_loss(hidden[None], weight, labels[None], chunk_size=chunk)
    return fn


def measure(fn, hidden, weight, labels, device):
    """(loss, extra peak GiB or None on CPU, ms) of one forward + backward."""
    h = hidden.detach().requires_grad_(True)
    w = weight.detach().requires_grad_(True)
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    start = time.perf_counter()
    loss = fn(h, w, labels)
    loss.backward()
    if cuda:
        torch.cuda.synchronize()
    ms = (time.perf_counter() - start) * 1e3
    peak = (torch.cuda.max_memory_allocated() - base) / GIB if cuda else None
    return loss.item(), peak, ms


def run_vocab(vocab, args, device, dtype) -> dict:
    g = torch.Generator().manual_seed(args.seed)
    hidden = (torch.randn(args.tokens, args.hidden, generator=g) * 0.5).to(device, dtype)
    weight = (torch.randn(vocab, args.hidden, generator=g) / args.hidden**0.5).to(device, dtype)
    labels = torch.randint(0, vocab, (args.tokens,), generator=g).to(device)
    methods = {"unchunked": unchunked_loss}
    methods.update({f"chunked_{c}": chunked_loss(c) for c in args.chunks})
    out = {"full_fp32_logits_gib": args.tokens * vocab * 4 / GIB}
    for name, fn in methods.items():
        try:
            loss, peak, ms = measure(fn, hidden, weight, labels, device)
            out[name] = {"loss": loss, "peak_extra_gib": peak, "ms": ms}
        except torch.cuda.OutOfMemoryError as exc:
            out[name] = {"loss": None, "peak_extra_gib": "OOM", "ms": None, "error": str(exc)[:200]}
        finally:
            if device.type == "cuda":
                torch.cuda.empty_cache()
        print(vocab, name, out[name], flush=True)
    return out


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="JSON file to write")
    p.add_argument("--smoke", action="store_true", help="tiny CPU fp32 run (a test runs it)")
    p.add_argument("--tokens", type=int, default=65536)
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--vocabs", type=int, nargs="+", default=[65024, 32000])
    p.add_argument("--chunks", type=int, nargs="+", default=[1024, 4096, 8192])
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--device", default="cuda")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.smoke:
        args.tokens, args.hidden, args.vocabs, args.chunks = 512, 32, [130, 64], [64, 100]
        args.dtype, args.device = "float32", "cpu"
    return args


def main(argv=None):
    args = parse_args(argv)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    result = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "torch": torch.__version__, "tokens": args.tokens, "hidden": args.hidden, "dtype": args.dtype,
              "vocabs": {str(v): run_vocab(v, args, device, dtype) for v in args.vocabs}}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
