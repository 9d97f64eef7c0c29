"""longalign.attention: every backend that runs here equals the reference, which equals a dense
masked softmax written out below; GQA/MQA; no token sees another sequence."""
import math

import pytest
import torch

from longalign import attention
from longalign.attention import available_backends, choose_backend, varlen_attention

LENGTHS = [5, 1, 17, 9, 32]
HEAD_DIM = 16


def _dense_block_causal(q, k, v, cu, scale):
    """softmax over {j : same sequence, j <= i} of scale * q_i.k_j, written with a full T x T mask."""
    total, hq, _ = q.shape
    rep = hq // k.shape[1]
    doc = torch.zeros(total, dtype=torch.long)
    for e in cu[1:-1].tolist():
        doc[e:] += 1
    idx = torch.arange(total)
    allowed = (doc[:, None] == doc[None, :]) & (idx[None, :] <= idx[:, None])
    kk = k.repeat_interleave(rep, dim=1)
    vv = v.repeat_interleave(rep, dim=1)
    scores = torch.einsum("ihd,jhd->hij", q, kk) * scale
    scores = scores.masked_fill(~allowed, float("-inf"))
    return torch.einsum("hij,jhd->ihd", scores.softmax(-1), vv)


def _qkv(hq, hkv, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    total = sum(LENGTHS)
    q, k, v = (torch.randn(total, h, HEAD_DIM, generator=g).to(dtype) for h in (hq, hkv, hkv))
    cu = torch.tensor([0] + torch.tensor(LENGTHS).cumsum(0).tolist(), dtype=torch.int32)
    return q, k, v, cu


CPU_BACKENDS = available_backends("cpu", torch.float32)
FORWARD_ONLY_ON_CPU = {"flex"}  # torch: "FlexAttention does not support backward on CPU"


@pytest.mark.parametrize("hq,hkv", [(4, 4), (4, 2), (4, 1)])
def test_reference_matches_dense(hq, hkv):
    q, k, v, cu = _qkv(hq, hkv)
    scale = 1 / math.sqrt(HEAD_DIM)
    out = varlen_attention(q, k, v, cu, backend="reference")
    torch.testing.assert_close(out, _dense_block_causal(q, k, v, cu, scale), rtol=1e-5, atol=1e-6)
    out2 = varlen_attention(q, k, v, cu, softmax_scale=0.3, backend="reference")
    torch.testing.assert_close(out2, _dense_block_causal(q, k, v, cu, 0.3), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", [b for b in CPU_BACKENDS if b != "reference"])
@pytest.mark.parametrize("hq,hkv", [(4, 4), (4, 2)])
def test_backend_matches_reference_fwd_bwd(backend, hq, hkv):
    """Forward, and backward where the backend has one on CPU (FlexAttention has none)."""
    q, k, v, cu = _qkv(hq, hkv, seed=1)
    backward = backend not in FORWARD_ONLY_ON_CPU
    grads = {}
    for name in (backend, "reference"):
        leaves = [x.clone().requires_grad_(backward) for x in (q, k, v)]
        out = varlen_attention(*leaves, cu, softmax_scale=0.2, backend=name)
        if backward:
            (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        grads[name] = (out.detach(), *[x.grad for x in leaves if backward])
    for a, b in zip(grads[backend], grads["reference"]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_sequences_are_isolated(backend):
    q, k, v, cu = _qkv(4, 2, seed=2)
    base = varlen_attention(q, k, v, cu, backend=backend)
    s, e = cu[2].item(), cu[3].item()  # perturb every token of sequence 2
    q2, k2, v2 = (x.clone() for x in (q, k, v))
    for x in (q2, k2, v2):
        x[s:e] += 3.0
    out = varlen_attention(q2, k2, v2, cu, backend=backend)
    assert torch.equal(out[:s], base[:s]) and torch.equal(out[e:], base[e:])
    assert not torch.equal(out[s:e], base[s:e])


def test_choice_and_override(monkeypatch):
    assert choose_backend("cpu", torch.float32) == "reference"
    assert "flash_attn" not in available_backends("cpu") and "torch_varlen" not in available_backends("cpu")
    monkeypatch.setenv(attention.ENV_VAR, "flex")
    if "flex" in CPU_BACKENDS:
        assert choose_backend("cpu", torch.float32) == "flex"
    monkeypatch.setenv(attention.ENV_VAR, "flash_attn")
    with pytest.raises(RuntimeError):
        choose_backend("cpu", torch.float32)
    with pytest.raises(ValueError):
        choose_backend("cpu", torch.float32, backend="nope")


def test_bad_cu_seqlens_rejected():
    q, k, v, cu = _qkv(2, 2)
    with pytest.raises(ValueError):
        varlen_attention(q, k, v, cu[:-1], backend="reference")


def test_bench_attention_smoke(tmp_path):
    import json
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    import bench_attention

    assert sum(bench_attention.longalign_like_lengths(65536)) == 65536
    out = tmp_path / "attn.json"
    bench_attention.main(["--smoke", "--out", str(out)])
    result = json.loads(out.read_text())
    assert sum(result["lengths"]) == result["tokens"] and len(result["lengths"]) > 1
    ref = result["backends"]["reference"]
    assert ref["fwd_bwd_ms"] > 0 and max(ref["rel_error_vs_fp32_reference"].values()) == 0.0
    assert "flash_attn" in result["skipped"]
