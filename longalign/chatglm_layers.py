"""Building blocks of the ChatGLM3-6B architecture (used by the root `modeling_chatglm.py`).

One GLMBlock (pre-norm, as in ChatGLM2/3):
    a = x + SelfAttention(RMSNorm(x))        (residual from RMSNorm(x) if
    y = a + MLP(RMSNorm(a))                   apply_residual_connection_post_layernorm)
with
- multi-query attention: `query_key_value` packs [q (H*D) | k (G*D) | v (G*D)], G KV groups,
  query head h reads group h // (H/G);
- rotary embedding on the first D/2 dims of each head, GLM-style interleaved pairs
  (x[2i], x[2i+1]) rotated by angle p * theta_i, theta_i = (10000 * rope_ratio)^(-2i / (D/2));
- SwiGLU MLP: dense_h_to_4h -> [a | b] (2 * ffn), out = dense_4h_to_h(silu(a) * b).

Attention runs either on a flat pack (`cu_seqlens`, block-diagonal causal, through
`longalign.attention.varlen_attention`) or on a (B, L) batch through `scaled_dot_product_attention`
with an optional boolean mask and KV cache (padded training batches and generation).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers.modeling_layers import GradientCheckpointingLayer

from longalign.attention import padded_sdpa_context, varlen_attention
from longalign.recompute import saved_attention

ROPE_BASE = 10000.0  # ChatGLM's RoPE base before `rope_ratio` scaling


class RMSNorm(nn.Module):
    """y = w * x / sqrt(mean(x^2) + eps), statistics and product in fp32, result in x's dtype."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (self.weight * xf).to(x.dtype)


def make_norm(config) -> nn.Module:
    """RMSNorm (all ChatGLM3 checkpoints) or LayerNorm when `config.rmsnorm` is False."""
    if config.rmsnorm:
        return RMSNorm(config.hidden_size, eps=config.layernorm_epsilon)
    return nn.LayerNorm(config.hidden_size, eps=config.layernorm_epsilon)


def rope_cos_sin(position_ids: torch.Tensor, rot_dim: int, base: float, dtype: torch.dtype):
    """cos, sin of angles p * theta_i, theta_i = base^(-2i / rot_dim), i < rot_dim/2: (B, L, rot_dim/2).

    Angles are computed in fp32 and the tables cast to the activations' dtype, as the release does.
    """
    exponent = torch.arange(0, rot_dim, 2, dtype=torch.float32, device=position_ids.device) / rot_dim
    theta = 1.0 / (base**exponent)
    angles = position_ids.float()[..., None] * theta
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs (x[2i], x[2i+1]) of the first 2*cos.shape[-1] dims of x (B, L, H, D).

    (x0, x1) -> (x0 cos - x1 sin, x1 cos + x0 sin); the remaining dims pass through unchanged.
    """
    rot = 2 * cos.shape[-1]
    x_rot, x_pass = x[..., :rot], x[..., rot:]
    x0, x1 = x_rot[..., 0::2], x_rot[..., 1::2]
    c, s = cos[:, :, None, :], sin[:, :, None, :]
    rotated = torch.stack((x0 * c - x1 * s, x1 * c + x0 * s), dim=-1).flatten(-2)
    return torch.cat((rotated, x_pass), dim=-1)


class SelfAttention(nn.Module):
    """Multi-query (or multi-head) causal self-attention with ChatGLM's packed `query_key_value`."""

    def __init__(self, config, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.head_dim = config.kv_channels
        self.multi_query = config.multi_query_attention
        self.num_groups = config.multi_query_group_num if self.multi_query else self.num_heads
        qkv_size = (self.num_heads + 2 * self.num_groups) * self.head_dim
        self.query_key_value = nn.Linear(
            config.hidden_size, qkv_size, bias=config.add_bias_linear or config.add_qkv_bias
        )
        self.dense = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=config.add_bias_linear)

    def split_qkv(self, mixed: torch.Tensor):
        """(B, L, qkv) -> q (B, L, H, D), k and v (B, L, G, D).

        MQA packs [q | k | v] along the features; plain MHA (multi_query_attention False) packs
        [q_h | k_h | v_h] per head, as the original layout does.
        """
        B, L, _ = mixed.shape
        D = self.head_dim
        if self.multi_query:
            q, k, v = mixed.split([self.num_heads * D, self.num_groups * D, self.num_groups * D], dim=-1)
            return q.view(B, L, -1, D), k.view(B, L, -1, D), v.view(B, L, -1, D)
        return mixed.view(B, L, self.num_heads, 3 * D).chunk(3, dim=-1)

    def forward(self, x, cos, sin, cu_seqlens=None, max_seqlen=None, mask=None, past_key_values=None):
        q, k, v = self.split_qkv(self.query_key_value(x))
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if cu_seqlens is not None:  # flat pack (1, T): block-diagonal causal attention
            ctx = saved_attention(varlen_attention, q[0], k[0], v[0], cu_seqlens, max_seqlen=max_seqlen)[None]
        else:
            ctx = self._sdpa(q, k, v, mask, past_key_values)
        return self.dense(ctx.flatten(-2))

    def _sdpa(self, q, k, v, mask, past_key_values):
        """Batched attention; `mask` (B|1, 1, Lq, Lk) bool (True = attend) or None (plain causal)."""
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, heads, L, D)
        if past_key_values is not None:
            k, v = past_key_values.update(k, v, self.layer_idx)
        rep = self.num_heads // self.num_groups
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        is_causal = mask is None and q.shape[2] > 1  # the model passes a mask whenever Lq != Lk > 1
        with padded_sdpa_context():
            ctx = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal)
        return ctx.transpose(1, 2)


class MLP(nn.Module):
    """SwiGLU: dense_4h_to_h(silu(a) * b) with [a | b] = dense_h_to_4h(x)."""

    def __init__(self, config):
        super().__init__()
        self.dense_h_to_4h = nn.Linear(config.hidden_size, 2 * config.ffn_hidden_size, bias=config.add_bias_linear)
        self.dense_4h_to_h = nn.Linear(config.ffn_hidden_size, config.hidden_size, bias=config.add_bias_linear)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.dense_h_to_4h(x).chunk(2, dim=-1)
        return self.dense_4h_to_h(F.silu(a) * b)


class GLMBlock(GradientCheckpointingLayer):
    """One pre-norm transformer layer; see the module docstring for the residual options."""

    def __init__(self, config, layer_idx: int):
        super().__init__()
        self.residual_post_norm = config.apply_residual_connection_post_layernorm
        self.dropout = config.hidden_dropout
        self.input_layernorm = make_norm(config)
        self.self_attention = SelfAttention(config, layer_idx)
        self.post_attention_layernorm = make_norm(config)
        self.mlp = MLP(config)

    def forward(self, x, cos, sin, cu_seqlens=None, max_seqlen=None, mask=None, past_key_values=None):
        h = self.input_layernorm(x)
        attn = self.self_attention(h, cos, sin, cu_seqlens, max_seqlen, mask, past_key_values)
        x = (h if self.residual_post_norm else x) + F.dropout(attn, self.dropout, self.training)
        h = self.post_attention_layernorm(x)
        out = self.mlp(h)
        return (h if self.residual_post_norm else x) + F.dropout(out, self.dropout, self.training)


def default_positions(batch: int, length: int, past: int, attention_mask, device) -> torch.Tensor:
    """Position ids (B, L) of the new tokens: the count of real tokens before each one.

    With a (B, past + L) 0/1 mask (left or right padding) this is cumsum(mask) - 1, so a padded
    row gets the positions it would have alone; without a mask it is past, ..., past + L - 1.
    """
    if attention_mask is not None:
        return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -length:]
    return torch.arange(past, past + length, device=device)[None].expand(batch, -1)


def build_attention_mask(attention_mask, q_len: int, past: int, device):
    """Boolean (B|1, 1, Lq, past+Lq) mask, True = attend, or None where plain causal SDPA suffices.

    Query i (absolute position past+i) sees keys j <= past+i that are not padding; it always sees
    itself, so a padding query never has an empty row (its output is ignored anyway).
    """
    if attention_mask is None and (past == 0 or q_len == 1):
        return None
    total = past + q_len
    q_pos = torch.arange(past, total, device=device)[:, None]
    k_pos = torch.arange(total, device=device)[None, :]
    allowed = k_pos <= q_pos
    if attention_mask is None:
        return allowed[None, None]
    keep = attention_mask[:, None, :total].bool()
    return ((allowed[None] & keep) | (k_pos == q_pos)[None])[:, None]
