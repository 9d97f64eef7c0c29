"""Llama for LongAlign's packed, weighted training, built on transformers' own Llama.

    from modeling_llama import LlamaForCausalLM
    model = LlamaForCausalLM.from_pretrained("THUDM/LongAlign-7B-64k-base")

The modules are transformers' (`LlamaForCausalLM` subclassed, two submodule classes swapped for
subclasses that add no parameters), so the state-dict keys, `from_pretrained`, `save_pretrained`,
gradient checkpointing and `generate` are stock. What is added (DESIGN.md §3, §4):

- packed forward: `input_ids`, `labels`, `position_ids`, `loss_weights` of shape (1, T) and
  `cu_seqlens` (n+1,) int32. Every attention layer then runs `longalign.attention.varlen_attention`
  (block-diagonal causal) on its rotated q, k, v; `position_ids` restart at 0 per sequence (derived
  from `cu_seqlens` when omitted). Each sequence sees exactly what it would see alone.
- weighted loss: with `labels`, the loss is `longalign.loss.causal_lm_loss` (shift within each
  sequence, weights w, `loss_reduction` "mean" = sum w l / sum w or "sum" = sum w l), computed in
  chunks inside the `lm_head` module, so fp32 logits of the pack never exist. `logits` is then
  None: call without `labels` to get logits (the usual (B, L, V) tensor in the model's dtype).
- without `cu_seqlens` and `labels` the forward is transformers' own (any `attn_implementation`,
  KV cache, `logits_to_keep`).
"""
from __future__ import annotations

import torch
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.models.llama import modeling_llama as hf_llama

from longalign.attention import check_pack, padded_sdpa_context, positions_from_cu_seqlens, varlen_attention
from longalign.loss import DEFAULT_CHUNK_TOKENS, LMHeadWithLoss
from longalign.recompute import saved_attention

LlamaConfig = hf_llama.LlamaConfig


class PackedLlamaAttention(hf_llama.LlamaAttention):
    """LlamaAttention that runs varlen attention when given `cu_seqlens`, and is stock otherwise."""

    def forward(self, hidden_states, position_embeddings=None, attention_mask=None,
                past_key_values=None, cu_seqlens=None, max_seqlen=None, **kwargs):
        if cu_seqlens is None:
            with padded_sdpa_context():
                return super().forward(hidden_states, position_embeddings, attention_mask,
                                       past_key_values, **kwargs)
        if hidden_states.shape[0] != 1:
            raise ValueError("a packed batch (cu_seqlens) must have shape (1, T, hidden)")
        total = hidden_states.shape[1]
        shape = (1, total, -1, self.head_dim)  # kept token-major: (1, T, H, D), no transposes
        q = self.q_proj(hidden_states).view(shape)
        k = self.k_proj(hidden_states).view(shape)
        v = self.v_proj(hidden_states).view(shape)
        cos, sin = position_embeddings  # (1, T, D): broadcast over heads at dim 2
        q, k = hf_llama.apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=2)
        # saved_attention: plain call, or run-once under the "selective" recompute policy
        out = saved_attention(varlen_attention, q[0], k[0], v[0], cu_seqlens, max_seqlen=max_seqlen,
                              softmax_scale=self.scaling)
        return self.o_proj(out.reshape(1, total, -1)), None


def _packed_kwargs(input_ids, inputs_embeds, cu_seqlens, position_ids, attention_mask):
    """Check a packed batch and return the extra model kwargs for it (one device sync)."""
    ref = input_ids if input_ids is not None else inputs_embeds
    if ref.shape[0] != 1:
        raise ValueError(f"a packed batch is flat, shape (1, T); got batch size {ref.shape[0]}")
    if attention_mask is not None:
        raise ValueError("a packed batch (cu_seqlens) takes no attention_mask (DESIGN.md §3)")
    total = ref.shape[1]
    cu_seqlens = cu_seqlens.to(device=ref.device, dtype=torch.int32)
    max_len = check_pack(cu_seqlens, total)
    if position_ids is None:
        position_ids = positions_from_cu_seqlens(cu_seqlens, total)
    # A 4D mask is passed through by transformers' create_causal_mask unchanged, which keeps it
    # from building a (T, T) packed-sequence mask that the varlen attention would never read.
    placeholder = torch.ones(1, 1, 1, 1, dtype=torch.bool, device=ref.device)
    return dict(cu_seqlens=cu_seqlens, max_seqlen=max_len, position_ids=position_ids,
                attention_mask=placeholder, use_cache=False)


class LlamaForCausalLM(hf_llama.LlamaForCausalLM):
    """transformers' LlamaForCausalLM plus packed attention and the chunked weighted loss."""

    def __init__(self, config):
        super().__init__(config)
        for layer in self.model.layers:
            layer.self_attn.__class__ = PackedLlamaAttention
        self.lm_head.__class__ = LMHeadWithLoss
        self.loss_chunk_size = DEFAULT_CHUNK_TOKENS

    def forward(self, input_ids=None, labels=None, loss_weights=None, cu_seqlens=None,
                position_ids=None, attention_mask=None, loss_reduction="mean",
                inputs_embeds=None, logits_to_keep=0, **kwargs):
        """DESIGN.md §3 batch in, CausalLMOutputWithPast out (see the module docstring)."""
        if cu_seqlens is None and labels is None:
            return super().forward(input_ids=input_ids, position_ids=position_ids,
                                   attention_mask=attention_mask, inputs_embeds=inputs_embeds,
                                   logits_to_keep=logits_to_keep, **kwargs)
        model_kwargs = dict(position_ids=position_ids, attention_mask=attention_mask)
        if cu_seqlens is not None:
            model_kwargs = _packed_kwargs(input_ids, inputs_embeds, cu_seqlens, position_ids, attention_mask)
        outputs = self.model(input_ids=input_ids, inputs_embeds=inputs_embeds, **model_kwargs, **kwargs)
        hidden = outputs.last_hidden_state
        loss, logits = None, None
        if labels is None:
            keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
            logits = self.lm_head(hidden[:, keep, :])  # logits_to_keep = 0 keeps every position
        else:
            loss = self.lm_head(hidden, labels=labels, loss_weights=loss_weights,
                                cu_seqlens=model_kwargs.get("cu_seqlens"),
                                reduction=loss_reduction, chunk_size=self.loss_chunk_size)
        return CausalLMOutputWithPast(loss=loss, logits=logits, past_key_values=outputs.past_key_values,
                                      hidden_states=outputs.hidden_states, attentions=outputs.attentions)
