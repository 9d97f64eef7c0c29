"""A stand-in for a fused varlen attention kernel (what it keeps for backward is known), for the
memory-model and recompute tests."""
import torch

from longalign.ops.varlen_attention import varlen_attention


class FlashLike(torch.autograd.Function):
    """Stand-in for a fused varlen kernel: keeps exactly q, k, v, out and an fp32 (H, T) lse."""

    kept: list = []

    @staticmethod
    def forward(ctx, q, k, v, cu_seqlens):
        with torch.no_grad():
            out = varlen_attention(q, k, v, cu_seqlens, backend="reference")
        lse = torch.zeros(q.shape[1], q.shape[0], dtype=torch.float32)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.cu_seqlens = cu_seqlens
        FlashLike.kept.extend(t.untyped_storage().data_ptr() for t in (q, k, v, out, lse))
        return out

    @staticmethod
    def backward(ctx, grad):
        q, k, v, _, _ = ctx.saved_tensors
        inputs = [t.detach().requires_grad_(True) for t in (q, k, v)]
        with torch.enable_grad():
            out = varlen_attention(*inputs, ctx.cu_seqlens, backend="reference")
        return (*torch.autograd.grad(out, inputs, grad), None)


def flash_like(q, k, v, cu_seqlens, max_seqlen=None, softmax_scale=None):
    return FlashLike.apply(q, k, v, cu_seqlens)
