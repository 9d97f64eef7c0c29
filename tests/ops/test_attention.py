"""longalign.ops.varlen_attention: every backend that runs here equals the reference, which equals a dense
masked softmax written out below; GQA/MQA; no token sees another sequence."""
import math

import pytest
import torch

from longalign.ops import varlen_attention as attention
from longalign.ops.varlen_attention import available_backends, choose_backend, varlen_attention

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


@pytest.mark.slow
def test_bench_attention_smoke(tmp_path):
    import json

    import bench_attention

    assert sum(bench_attention.longalign_like_lengths(65536)) == 65536
    out = tmp_path / "attn.json"
    bench_attention.main(["--smoke", "--out", str(out)])
    result = json.loads(out.read_text())
    assert sum(result["lengths"]) == result["tokens"] and len(result["lengths"]) > 1
    ref = result["backends"]["reference"]
    assert ref["fwd_bwd_ms"] > 0 and max(ref["rel_error_vs_fp32_reference"].values()) == 0.0
    assert "flash_attn" in result["skipped"]


@pytest.fixture
def fake_fa4(tmp_path, monkeypatch):
    """Installs the fake package below for one test; removes its modules afterwards."""
    import sys

    _install_fake_fa4(tmp_path, monkeypatch)
    attention._module_available.cache_clear()
    yield
    for name in [m for m in sys.modules if m == "flash_attn" or m.startswith("flash_attn.")]:
        del sys.modules[name]
    attention._module_available.cache_clear()


def _install_fake_fa4(tmp_path, monkeypatch):
    """A FlashAttention-4-shaped package: flash_attn/cute only (flash_attn is then a namespace
    package), whose varlen function computes the dense reference from keyword arguments alone
    and returns (out, lse) like flash-attn-4 4.0 betas."""
    pkg = tmp_path / "flash_attn" / "cute"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text(
        "import math\n"
        "CALLS = []\n"
        "def flash_attn_varlen_func(q, k, v, qv=None, cu_seqlens_q=None, cu_seqlens_k=None,\n"
        "                           max_seqlen_q=None, max_seqlen_k=None, softmax_scale=None,\n"
        "                           causal=False, **kw):\n"
        "    assert qv is None and causal and cu_seqlens_q is cu_seqlens_k\n"
        "    CALLS.append((max_seqlen_q, max_seqlen_k, softmax_scale))\n"
        "    from longalign.ops.varlen_attention import _reference\n"
        "    return _reference(q, k, v, cu_seqlens_q, softmax_scale), None\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    for name in ("flash_attn", "flash_attn.cute"):
        monkeypatch.delitem(__import__("sys").modules, name, raising=False)


def test_flash_attn_4_alone_is_not_flash_attn_2(fake_fa4):
    usable = available_backends("cuda", torch.bfloat16)
    assert "flash_attn_cute" in usable and "flash_attn" not in usable
    assert choose_backend("cuda", torch.bfloat16) == "flash_attn_cute"


def test_automatic_order_follows_the_gpu_generation(monkeypatch):
    """Hopper+: FA4 first; older GPUs (the paper's A800s) never get it by default; cudnn only on request."""
    monkeypatch.setattr(attention, "available_backends",
                        lambda device, dtype=None: ["flash_attn_cute", "flash_attn", "torch_varlen", "flex",
                                                    "reference", "cudnn"])
    monkeypatch.setattr(attention, "_capability_major", lambda device: 9)
    assert choose_backend("cuda", torch.bfloat16) == "flash_attn_cute"
    monkeypatch.setattr(attention, "_capability_major", lambda device: 8)
    assert choose_backend("cuda", torch.bfloat16) == "flash_attn"
    monkeypatch.setattr(attention, "available_backends",
                        lambda device, dtype=None: ["torch_varlen", "flex", "reference", "cudnn"])
    for major in (8, 9):
        monkeypatch.setattr(attention, "_capability_major", lambda device, m=major: m)
        assert choose_backend("cuda", torch.bfloat16) == "torch_varlen"
    assert choose_backend("cuda", torch.bfloat16, backend="cudnn") == "cudnn"


def test_flash_attn_cute_adapter_passes_keywords(fake_fa4):
    """The adapter names every argument (qv is flash-attn-4's 4th positional) and unwraps (out, lse)."""
    q, k, v, cu = _qkv(4, 2)
    out = attention._flash_attn_cute(q, k, v, cu, max(LENGTHS), 0.3)
    torch.testing.assert_close(out, _dense_block_causal(q, k, v, cu, 0.3), rtol=1e-5, atol=1e-6)
    import flash_attn.cute as fake

    assert fake.CALLS == [(max(LENGTHS), max(LENGTHS), 0.3)]


CUDA_BACKENDS = [b for b in ("flash_attn", "flash_attn_cute", "torch_varlen", "flex", "cudnn")
                 if torch.cuda.is_available() and b in available_backends("cuda", torch.bfloat16)]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("backend", CUDA_BACKENDS)
@pytest.mark.parametrize("hq,hkv", [(4, 4), (4, 2)])
def test_cuda_backend_matches_fp32_reference(backend, hq, hkv):
    """bf16 output and gradients within 2% (relative norm) of the fp32 reference, head dim 128."""
    g = torch.Generator().manual_seed(0)
    lengths = [300, 1, 1200, 77, 512]
    total = sum(lengths)
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32, device="cuda")
    base = [torch.randn(total, h, 128, generator=g).cuda() for h in (hq, hkv, hkv)]
    grad_out = torch.randn(total, hq, 128, generator=g).cuda()

    def run(name, dtype):
        leaves = [x.to(dtype).requires_grad_(True) for x in base]
        out = varlen_attention(*leaves, cu, backend=name)
        out.backward(grad_out.to(dtype))
        return [out.float()] + [x.grad.float() for x in leaves]

    for got, ref in zip(run(backend, torch.bfloat16), run("reference", torch.float32)):
        assert ((got - ref).norm() / ref.norm()).item() < 2e-2


def test_padded_sdpa_backends_are_restricted_by_the_environment(monkeypatch):
    """$LONGALIGN_SDPA_BACKENDS limits the kernels of padded batches: math alone still computes the
    same attention; cuDNN alone has no CPU kernel, which proves the restriction is applied."""
    import torch.nn.functional as F

    q, k, v = (torch.randn(1, 2, 7, HEAD_DIM) for _ in range(3))
    want = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    monkeypatch.setenv(attention.SDPA_ENV_VAR, "math")
    with attention.padded_sdpa_context():
        torch.testing.assert_close(F.scaled_dot_product_attention(q, k, v, is_causal=True), want)
    monkeypatch.setenv(attention.SDPA_ENV_VAR, "cudnn")
    with attention.padded_sdpa_context(), pytest.raises(RuntimeError):
        F.scaled_dot_product_attention(q, k, v, is_causal=True)
    monkeypatch.setenv(attention.SDPA_ENV_VAR, "flash, fastest")
    with pytest.raises(ValueError, match="fastest"):
        attention.padded_sdpa_context()
    monkeypatch.delenv(attention.SDPA_ENV_VAR)
    with attention.padded_sdpa_context():
        torch.testing.assert_close(F.scaled_dot_product_attention(q, k, v, is_causal=True), want)
