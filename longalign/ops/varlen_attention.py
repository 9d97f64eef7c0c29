"""Block-diagonal causal attention over a flat pack of sequences (DESIGN.md §5).

A pack holds n sequences laid end to end, T tokens in all; ``cu_seqlens = [0, e_1, ..., e_n = T]``
(int32) marks where each ends. Query token i of sequence k (s_k <= i < e_k) attends to

    out_i = sum_{j = s_k}^{i} softmax_j(scale * q_i . k_j) v_j,      scale = 1/sqrt(D) by default,

so no token ever sees another sequence: the result equals each sequence run alone. GQA/MQA:
query head h reads key/value head h // (Hq / Hkv) (transformers' ``repeat_kv`` convention).

Backends in the order the automatic choice tries them (the first that can run here):
- ``flash_attn_cute``: FlashAttention-4's ``flash_attn.cute.flash_attn_varlen_func`` (package
  ``flash-attn-4``, CuTe DSL kernels compiled on first use; fp16/bf16; auto on Hopper+ only);
- ``flash_attn``: FlashAttention-2's ``flash_attn_varlen_func`` (the paper's; CUDA, fp16/bf16);
- ``torch_varlen``: PyTorch's ``torch.nn.attention.varlen.varlen_attn`` (CUDA, fp16/bf16);
- ``flex``: FlexAttention with a document mask (compiled on CUDA; eager, unfused and
  forward-only on CPU: torch has no CPU backward for it);
- ``reference``: ``scaled_dot_product_attention(is_causal=True)`` per sequence, runs anywhere.
Only on request: ``cudnn``, the per-sequence loop of ``reference`` with every call on SDPA's cuDNN
kernel (CUDA, fp16/bf16). Measured on one H200 (BENCHMARKS.md §2, §4, §5): 64k pack fwd+bwd
flash_attn_cute 590 TFLOP/s, cudnn 397, flex 375, torch_varlen 322; cudnn also gave the faster
single-GPU 64k step (2.05 s against 2.43), but costs ~3 ms of host time per call, which made
4-GPU ZeRO-3 packed training of many-sequence packs slower than torch_varlen (23.8 s against
19.2 s an epoch) — hence not automatic. On CPU the automatic choice is ``reference`` (eager flex
materialises the whole T x T scores). ``backend=`` or ``LONGALIGN_ATTN_BACKEND`` override it.
"""
from __future__ import annotations

import contextlib
import functools
import importlib.util
import inspect
import logging
import math
import os
import warnings

import torch
import torch.nn.functional as F

from longalign.pack_geometry import longest_sequence, sequence_lengths

logger = logging.getLogger(__name__)

BACKENDS = ("flash_attn_cute", "flash_attn", "torch_varlen", "flex", "reference", "cudnn")
ON_REQUEST_ONLY = ("cudnn",)
HOPPER_ONLY_AUTO = ("flash_attn_cute",)  # measured on sm90 only; on older GPUs FA2 et al. first
ENV_VAR = "LONGALIGN_ATTN_BACKEND"
_HALF_DTYPES = (torch.float16, torch.bfloat16)
_logged: set = set()


SDPA_ENV_VAR = "LONGALIGN_SDPA_BACKENDS"  # e.g. "flash,efficient": kernels padded batches may use


def padded_sdpa_context():
    """Restrict torch's kernel choice for padded (B, L) batches (SDPA with a mask or is_causal) to
    the comma-separated names in $LONGALIGN_SDPA_BACKENDS (flash, efficient, cudnn, math); unset:
    torch's own choice (cuDNN first on Hopper, whose ~3 ms of host time per call shows in
    short-sequence micro-steps: BENCHMARKS.md §5)."""
    names = [n.strip() for n in os.environ.get(SDPA_ENV_VAR, "").split(",") if n.strip()]
    if not names:
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    table = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
             "cudnn": SDPBackend.CUDNN_ATTENTION, "math": SDPBackend.MATH}
    unknown = sorted(set(names) - set(table))
    if unknown:
        raise ValueError(f"${SDPA_ENV_VAR}: unknown SDPA backend(s) {unknown}; choose from {sorted(table)}")
    return sdpa_kernel([table[n] for n in names])


def _torch_varlen_fn():
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn


@functools.lru_cache(maxsize=None)
def _module_available(name: str) -> bool:
    """Whether `name` imports. A plain find_spec is not enough: FlashAttention-4 installs
    ``flash_attn/cute`` alone, so ``flash_attn`` is then an empty namespace package. Cached: the
    automatic choice runs at every attention call, and a find_spec that misses scans sys.path."""
    try:
        return importlib.util.find_spec(name) is not None
    except ImportError:  # a parent package that is missing or fails to import
        return False


def _has_cudnn_sdpa() -> bool:
    try:
        from torch.nn.attention import SDPBackend
    except ImportError:
        return False
    return hasattr(SDPBackend, "CUDNN_ATTENTION")


def _has_flex() -> bool:
    try:
        from torch.nn.attention.flex_attention import flex_attention  # noqa: F401
    except ImportError:
        return False
    return True


def available_backends(device, dtype: torch.dtype | None = None) -> list[str]:
    """Backends that can run on `device` (and `dtype`, when given), in preference order."""
    device = torch.device(device)
    cuda = device.type == "cuda"
    half_ok = dtype is None or dtype in _HALF_DTYPES
    names = []
    if cuda and half_ok and _module_available("flash_attn.cute"):
        names.append("flash_attn_cute")
    if cuda and half_ok and _module_available("flash_attn.flash_attn_interface"):
        names.append("flash_attn")
    if cuda and half_ok and _torch_varlen_fn() is not None:
        names.append("torch_varlen")
    if _has_flex():
        names.append("flex")
    names.append("reference")
    if cuda and half_ok and _has_cudnn_sdpa():
        names.append("cudnn")
    return names


def choose_backend(device, dtype: torch.dtype | None = None, backend: str | None = None) -> str:
    """The argument, else $LONGALIGN_ATTN_BACKEND, else the fastest available (reference on CPU)."""
    name = backend or os.environ.get(ENV_VAR) or None
    if name is not None:
        if name not in BACKENDS:
            raise ValueError(f"unknown attention backend {name!r}; choose from {BACKENDS}")
        if name not in available_backends(device, dtype):
            raise RuntimeError(f"attention backend {name!r} cannot run on {device} / {dtype}")
        return name
    device = torch.device(device)
    if device.type != "cuda":
        return "reference"
    usable = [b for b in available_backends(device, dtype) if b not in ON_REQUEST_ONLY]
    if _capability_major(device) < 9:
        usable = [b for b in usable if b not in HOPPER_ONLY_AUTO]
    return usable[0]


def _capability_major(device) -> int:
    try:
        return torch.cuda.get_device_capability(device)[0]
    except (AssertionError, RuntimeError):  # no CUDA runtime here (tests on CPU): assume current GPUs
        return 9


def _log_once(name: str, device) -> None:
    key = (name, torch.device(device).type)
    if key not in _logged:
        _logged.add(key)
        logger.info("varlen attention backend: %s (%s)", name, key[1])


def check_pack(cu_seqlens: torch.Tensor, total: int) -> int:
    """Validate cu_seqlens = [0, e_1, ..., T] of a flat pack; return the longest length (one sync)."""
    lengths = sequence_lengths(cu_seqlens)
    first, last, longest = (int(x) for x in torch.stack([cu_seqlens[0], cu_seqlens[-1], lengths.max()]))
    if first != 0 or last != total:
        raise ValueError(f"cu_seqlens must run from 0 to T={total}, got {first}..{last}")
    return longest


def _seqlens(cu_seqlens: torch.Tensor) -> list[int]:
    return sequence_lengths(cu_seqlens).tolist()


def _reference(q, k, v, cu_seqlens, scale):
    """Per-sequence SDPA; k/v heads repeated for GQA so every kernel sees equal head counts.

    Inputs go in as (1, H, n, D): SDPA's fused CUDA kernels need a batch dimension, and with 3-D
    inputs it falls back to the unfused path (measured: a 65 GiB fp32 score matrix, OOM on an
    H200, for one 23k-token sequence of 32 heads).
    """
    rep = q.shape[1] // k.shape[1]
    outs = []
    start = 0
    for n in _seqlens(cu_seqlens):
        sl = slice(start, start + n)
        start += n
        if n == 1:  # softmax over one key is 1: out = v exactly (cuDNN has no kernel for n = 1)
            outs.append(v[sl].repeat_interleave(rep, dim=1))
            continue
        qs = q[sl].transpose(0, 1).unsqueeze(0)  # (1, Hq, n, D)
        ks = k[sl].repeat_interleave(rep, dim=1).transpose(0, 1).unsqueeze(0)
        vs = v[sl].repeat_interleave(rep, dim=1).transpose(0, 1).unsqueeze(0)
        out = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=scale)
        outs.append(out[0].transpose(0, 1))
    out = torch.cat(outs, dim=0)
    if start != q.shape[0]:
        raise ValueError(f"cu_seqlens ends at {start} but the pack has {q.shape[0]} tokens")
    return out


def _cudnn(q, k, v, cu_seqlens, scale):
    """The per-sequence loop of `_reference`, every SDPA call on cuDNN's fused kernel (an error,
    not a silent fallback, where cuDNN cannot take the inputs)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
        return _reference(q, k, v, cu_seqlens, scale)


def _flash_attn_cute(q, k, v, cu_seqlens, max_seqlen, scale):
    from flash_attn.cute import flash_attn_varlen_func

    cu = cu_seqlens.to(torch.int32)
    out = flash_attn_varlen_func(q, k, v, cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=max_seqlen,
                                 max_seqlen_k=max_seqlen, softmax_scale=scale, causal=True)
    return out[0] if isinstance(out, tuple) else out  # (out, lse) in 4.0 betas


def _flash_attn(q, k, v, cu_seqlens, max_seqlen, scale):
    from flash_attn import flash_attn_varlen_func

    cu = cu_seqlens.to(torch.int32)
    return flash_attn_varlen_func(q, k, v, cu, cu, max_seqlen, max_seqlen, dropout_p=0.0,
                                  softmax_scale=scale, causal=True)


def _torch_varlen(q, k, v, cu_seqlens, max_seqlen, scale):
    """torch.nn.attention.varlen.varlen_attn across its signature changes.

    torch 2.9: ``is_causal=``; 2.10+: ``window_size=(-1, 0)`` means causal, ``scale=``;
    2.12+: ``enable_gqa=``. Missing pieces are emulated: k/v repeated for GQA, and q pre-scaled
    by scale * sqrt(D) when the kernel only knows its default 1/sqrt(D).
    """
    fn = _torch_varlen_fn()
    params = inspect.signature(fn).parameters
    kwargs = {}
    if "is_causal" in params:
        kwargs["is_causal"] = True
    else:
        kwargs["window_size"] = (-1, 0)
    if q.shape[1] != k.shape[1]:
        if "enable_gqa" in params:
            kwargs["enable_gqa"] = True
        else:
            rep = q.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    if "scale" in params:
        kwargs["scale"] = scale
    else:
        q = q * (scale * math.sqrt(q.shape[-1]))
    cu = cu_seqlens.to(torch.int32)
    return fn(q, k, v, cu, cu, max_seqlen, max_seqlen, **kwargs)


_flex_cache: dict = {}


def _flex_fns(cuda: bool):
    """(flex_attention, create_block_mask), compiled once on CUDA, eager elsewhere."""
    if cuda not in _flex_cache:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        fn = torch.compile(flex_attention, dynamic=None) if cuda else flex_attention
        _flex_cache[cuda] = (fn, create_block_mask)
    return _flex_cache[cuda]


_block_mask_cache: dict = {}


def _document_block_mask(cu_seqlens: torch.Tensor, total: int, device):
    """BlockMask of `allowed(i, j) = doc(i) == doc(j) and j <= i`; the last one is cached."""
    key = (tuple(cu_seqlens.tolist()), str(device))
    if key in _block_mask_cache:
        return _block_mask_cache[key]
    cuda = torch.device(device).type == "cuda"
    _, create_block_mask = _flex_fns(cuda)
    cu = cu_seqlens.to(device=device, dtype=torch.long)
    doc = torch.searchsorted(cu[1:], torch.arange(total, device=device), right=True)

    def mask_mod(b, h, q_idx, kv_idx):
        return (doc[q_idx] == doc[kv_idx]) & (kv_idx <= q_idx)

    kwargs = {}
    if cuda and "_compile" in inspect.signature(create_block_mask).parameters:
        kwargs["_compile"] = True  # never materialise the T x T mask (64k^2 bools = 4 GiB)
    block_mask = create_block_mask(mask_mod, None, None, total, total, device=device, **kwargs)
    _block_mask_cache.clear()
    _block_mask_cache[key] = block_mask
    return block_mask


def _flex(q, k, v, cu_seqlens, scale):
    total = q.shape[0]
    if int(cu_seqlens[-1]) != total:
        raise ValueError(f"cu_seqlens ends at {int(cu_seqlens[-1])} but the pack has {total} tokens")
    cuda = q.device.type == "cuda"
    flex_attention, _ = _flex_fns(cuda)
    block_mask = _document_block_mask(cu_seqlens, total, q.device)
    # (1, H, T, D) over contiguous (T, H, D) storage: the compiled kernel's backward assumes the strides
    # its forward saw, and a recomputed forward may hand in a view of a fused projection instead
    qb, kb, vb = (x.contiguous().transpose(0, 1).unsqueeze(0) for x in (q, k, v))
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*flex_attention called without torch.compile.*")
        out = flex_attention(qb, kb, vb, block_mask=block_mask, scale=scale,
                             enable_gqa=q.shape[1] != k.shape[1])
    return out.squeeze(0).transpose(0, 1)


def varlen_attention(q, k, v, cu_seqlens, max_seqlen=None, softmax_scale=None, backend=None):
    """Block-diagonal causal attention. q (T, Hq, D), k/v (T, Hkv, D), Hq % Hkv == 0 -> (T, Hq, D).

    `cu_seqlens` (n+1,) int32 = [0, e_1, ..., T]; `max_seqlen` = max_k (e_k - e_{k-1}), computed
    when None (one device sync); `softmax_scale` defaults to 1/sqrt(D).
    """
    if q.dim() != 3 or k.dim() != 3 or v.dim() != 3:
        raise ValueError("varlen_attention expects q, k, v of shape (T, heads, head_dim)")
    if q.shape[1] % k.shape[1]:
        raise ValueError(f"query heads {q.shape[1]} not a multiple of key/value heads {k.shape[1]}")
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    name = choose_backend(q.device, q.dtype, backend)
    _log_once(name, q.device)
    if name == "reference":
        return _reference(q, k, v, cu_seqlens, scale)
    if name == "cudnn":
        return _cudnn(q, k, v, cu_seqlens, scale)
    if name == "flex":
        return _flex(q, k, v, cu_seqlens, scale)
    if max_seqlen is None:
        max_seqlen = longest_sequence(cu_seqlens)
    fused = {"flash_attn": _flash_attn, "flash_attn_cute": _flash_attn_cute, "torch_varlen": _torch_varlen}
    return fused[name](q, k, v, cu_seqlens, int(max_seqlen), scale)
