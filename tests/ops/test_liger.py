"""longalign.train.speed.liger: what it asks of liger-kernel's API, and its weighted loss glue.

liger-kernel's kernels are Triton (GPU): here a stand-in package records the entry-point call and
computes the per-token cross-entropy in torch, so the tests check this package's side: the loss
replacements stay off, the model keeps LongAlign's loss, and `liger_weighted_loss` weights
Liger's per-token losses exactly as `causal_lm_loss` does. The kernels themselves are measured on
the GPU by bench/bench_peers.py.
"""
import importlib.machinery
import sys
import types

import pytest
import torch
import torch.nn.functional as F

import longalign.train.speed.liger as liger
from longalign.constants import IGNORE_INDEX
from longalign.ops.weighted_loss import causal_lm_loss
from helpers.training_models import tiny_chatglm, tiny_llama


class _TorchFusedLinearCE(torch.nn.Module):
    """Torch stand-in for LigerFusedLinearCrossEntropyLoss(reduction="none")."""

    def __init__(self, ignore_index=-100, reduction="mean"):
        super().__init__()
        assert reduction == "none"
        self.ignore_index = ignore_index

    def forward(self, lin_weight, _input, target):
        logits = (_input @ lin_weight.t()).float()
        return F.cross_entropy(logits, target, ignore_index=self.ignore_index, reduction="none")


@pytest.fixture
def fake_liger(monkeypatch):
    calls = []
    package = types.ModuleType("liger_kernel")
    package.__spec__ = importlib.machinery.ModuleSpec("liger_kernel", None, is_package=True)
    sub = types.ModuleType("liger_kernel.transformers")
    sub.apply_liger_kernel_to_llama = lambda **kwargs: calls.append(kwargs)
    sub.LigerFusedLinearCrossEntropyLoss = _TorchFusedLinearCE
    package.transformers = sub
    monkeypatch.setitem(sys.modules, "liger_kernel", package)
    monkeypatch.setitem(sys.modules, "liger_kernel.transformers", sub)
    return calls


def test_apply_keeps_the_weighted_loss(fake_liger):
    model = tiny_llama()
    description = liger.apply_liger_kernels(model)
    (call,) = fake_liger
    assert call["model"] is model
    assert call["fused_linear_cross_entropy"] is False and call["cross_entropy"] is False
    assert call["rope"] and call["rms_norm"] and call["swiglu"]
    assert "rope" in description and "loss stays" in description
    assert "forward" not in model.__dict__  # the model's own forward (and loss) is untouched


def test_chatglm_is_refused(fake_liger):
    with pytest.raises(ValueError, match="Llama models only"):
        liger.apply_liger_kernels(tiny_chatglm())


@pytest.mark.skipif(liger.liger_available(), reason="liger-kernel is installed here")
def test_missing_package_is_a_clear_error():
    with pytest.raises(ImportError, match="pip install liger-kernel"):
        liger.apply_liger_kernels(tiny_llama())


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_weighted_loss_equals_causal_lm_loss(fake_liger, reduction):
    g = torch.Generator().manual_seed(0)
    total, hidden_size, vocab = 23, 16, 40
    cu = torch.tensor([0, 7, 15, 23], dtype=torch.int32)
    labels = torch.randint(0, vocab, (1, total), generator=g)
    labels[0, 8:11] = IGNORE_INDEX
    weights = torch.rand(1, total, generator=g, dtype=torch.float64).float()
    results = []
    for fn in (causal_lm_loss, liger.liger_weighted_loss):
        torch.manual_seed(1)
        hidden = torch.randn(1, total, hidden_size, requires_grad=True)
        head = torch.randn(vocab, hidden_size, requires_grad=True)
        loss = fn(hidden, head, labels, weights, cu, reduction=reduction)
        loss.backward()
        results.append((loss.detach(), hidden.grad, head.grad))
    for ours, theirs in zip(*results):
        torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-6)
