"""longalign.ops.weighted_loss: shift within sequences, weights, reductions, chunking (value and gradient)."""
import pytest
import torch
import torch.nn.functional as F

from longalign.constants import IGNORE_INDEX
from longalign.ops.weighted_loss import causal_lm_loss, shift_targets

HIDDEN, VOCAB = 32, 128
LENGTHS = [7, 1, 12, 5, 9]  # includes a one-token sequence (no target at all)


def _pack(seed=0):
    g = torch.Generator().manual_seed(seed)
    total = sum(LENGTHS)
    hidden = torch.randn(1, total, HIDDEN, generator=g, dtype=torch.float64).float()
    weight = torch.randn(VOCAB, HIDDEN, generator=g) / HIDDEN**0.5
    labels = torch.randint(0, VOCAB, (1, total), generator=g)
    labels[0, 0] = IGNORE_INDEX  # a prompt token of sequence 0
    labels[0, 8:11] = IGNORE_INDEX  # prompt tokens of sequence 2
    cu = torch.tensor([0] + torch.tensor(LENGTHS).cumsum(0).tolist(), dtype=torch.int32)
    return hidden, weight, labels, cu


def _per_sequence_losses(hidden, weight, labels, cu):
    """Mean token loss of each sequence run alone (plain F.cross_entropy, full logits)."""
    out = []
    for s, e in zip(cu[:-1].tolist(), cu[1:].tolist()):
        logits = hidden[0, s:e] @ weight.t()
        tgt = labels[0, s + 1:e]
        if (tgt != IGNORE_INDEX).any():
            out.append(F.cross_entropy(logits[:-1], tgt, ignore_index=IGNORE_INDEX))
    return out


def _pack_weights(labels, cu):
    """DESIGN §2 weights: 1/N_k on each target token (labels position) of sequence k."""
    w = torch.zeros(labels.shape, dtype=torch.float32)
    for s, e in zip(cu[:-1].tolist(), cu[1:].tolist()):
        targets = labels[0, s + 1:e] != IGNORE_INDEX
        if targets.any():
            w[0, s + 1:e] = targets.float() / targets.sum()
    return w


def test_targets_never_cross_boundaries():
    _, _, labels, cu = _pack()
    targets, weights = shift_targets(labels, None, cu)
    for e in cu[1:].tolist():
        assert targets[e - 1] == IGNORE_INDEX and weights[e - 1] == 0
    assert torch.equal(weights, (targets != IGNORE_INDEX).float())


def test_weighted_mean_is_mean_of_sequence_means():
    hidden, weight, labels, cu = _pack()
    hidden.requires_grad_(True)
    weight.requires_grad_(True)
    loss = causal_lm_loss(hidden, weight, labels, _pack_weights(labels, cu), cu, chunk_size=5)
    hidden2 = hidden.detach().clone().requires_grad_(True)
    weight2 = weight.detach().clone().requires_grad_(True)
    ref = torch.stack(_per_sequence_losses(hidden2, weight2, labels, cu)).mean()
    torch.testing.assert_close(loss, ref, rtol=1e-6, atol=1e-6)
    loss.backward()
    ref.backward()
    torch.testing.assert_close(hidden.grad, hidden2.grad, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(weight.grad, weight2.grad, rtol=1e-5, atol=1e-7)


def test_unweighted_mean_and_sum_are_token_reductions():
    hidden, weight, labels, cu = _pack(1)
    targets, _ = shift_targets(labels, None, cu)
    per_token = F.cross_entropy(hidden[0] @ weight.t(), targets, ignore_index=IGNORE_INDEX, reduction="none")
    mean = causal_lm_loss(hidden, weight, labels, cu_seqlens=cu, chunk_size=4)
    total = causal_lm_loss(hidden, weight, labels, cu_seqlens=cu, reduction="sum", chunk_size=4)
    torch.testing.assert_close(total, per_token.sum(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(mean, per_token.sum() / (targets != IGNORE_INDEX).sum(), rtol=1e-6, atol=1e-6)


def test_padded_batch_matches_hf_shift():
    g = torch.Generator().manual_seed(2)
    hidden = torch.randn(3, 10, HIDDEN, generator=g)
    weight = torch.randn(VOCAB, HIDDEN, generator=g)
    labels = torch.randint(0, VOCAB, (3, 10), generator=g)
    labels[1, 6:] = IGNORE_INDEX  # right padding
    logits = hidden @ weight.t()
    ref = F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), labels[:, 1:].reshape(-1), ignore_index=IGNORE_INDEX)
    torch.testing.assert_close(causal_lm_loss(hidden, weight, labels, chunk_size=7), ref, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_chunked_equals_unchunked(reduction):
    hidden, weight, labels, cu = _pack(3)
    w = _pack_weights(labels, cu)
    results = []
    for chunk in (1, 3, 8, 33, 10_000):
        h = hidden.detach().clone().requires_grad_(True)
        W = weight.detach().clone().requires_grad_(True)
        loss = causal_lm_loss(h, W, labels, w, cu, reduction=reduction, chunk_size=chunk)
        loss.backward()
        results.append((loss.detach(), h.grad, W.grad))
    for loss, gh, gw in results[:-1]:
        torch.testing.assert_close(loss, results[-1][0], rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(gh, results[-1][1], rtol=1e-5, atol=1e-8)
        torch.testing.assert_close(gw, results[-1][2], rtol=1e-5, atol=1e-8)


def test_all_ignored_gives_zero_without_nan():
    hidden, weight, labels, cu = _pack()
    labels = torch.full_like(labels, IGNORE_INDEX)
    h = hidden.clone().requires_grad_(True)
    for reduction in ("mean", "sum"):
        loss = causal_lm_loss(h, weight, labels, cu_seqlens=cu, reduction=reduction)
        assert loss.item() == 0.0
        (grad,) = torch.autograd.grad(loss, h)
        assert torch.equal(grad, torch.zeros_like(grad))


def test_gradcheck_float64():
    g = torch.Generator().manual_seed(4)
    hidden = torch.randn(1, 9, 6, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(11, 6, generator=g, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 11, (1, 9), generator=g)
    labels[0, 2] = IGNORE_INDEX
    cu = torch.tensor([0, 4, 9], dtype=torch.int32)
    w = torch.rand(1, 9, generator=g)
    fn = lambda h, W: causal_lm_loss(h, W, labels, w, cu, chunk_size=2)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (hidden, weight))


def test_bf16_weights_get_bf16_grads():
    hidden, weight, labels, cu = _pack()
    h = hidden.bfloat16().requires_grad_(True)
    W = weight.bfloat16().requires_grad_(True)
    loss = causal_lm_loss(h, W, labels, cu_seqlens=cu, chunk_size=8)
    loss.backward()
    assert loss.dtype == torch.float32 and h.grad.dtype == W.grad.dtype == torch.bfloat16
    ref = causal_lm_loss(hidden, weight, labels, cu_seqlens=cu)
    torch.testing.assert_close(loss, ref, rtol=2e-2, atol=2e-2)


@pytest.mark.slow
def test_bench_loss_memory_smoke(tmp_path):
    import json

    import bench_loss_memory

    out = tmp_path / "loss.json"
    bench_loss_memory.main(["--smoke", "--out", str(out)])
    result = json.loads(out.read_text())
    for per_vocab in result["vocabs"].values():
        losses = [m["loss"] for k, m in per_vocab.items() if k != "full_fp32_logits_gib"]
        assert len(losses) == 3 and max(losses) - min(losses) < 1e-5
