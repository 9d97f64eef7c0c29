"""The training models: transformers' Llama and the ChatGLM remote code, plus LongAlign's loss.

    model = LongAlignLlamaForCausalLM.from_pretrained(path, attn_implementation=ATTN_IMPLEMENTATION)
    out = model(input_ids, position_ids=pos, cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=m,
                max_length_k=m, labels=labels, loss_weights=w, loss_aggregation="sum")

Each class is the family's public model class with one change: its top-level `forward` (the
public keyword contract) also takes `loss_weights` and `loss_aggregation` ("mean" | "sum": over
the weighted token losses; not the paper's `--loss_reduction`, which chooses the weights), and with `labels` it
returns the weighted, chunked loss of `longalign.ops.weighted_loss.causal_lm_loss` computed from the hidden
states, so the (T, V) logits of a 64k pack are never built:

    loss = sum_i w_i l_i / sum_i w_i   ("mean")   or   sum_i w_i l_i   ("sum")

with targets shifted *within* each sequence of a pack (DESIGN.md §3-4). The LM head is
`longalign.ops.weighted_loss.LMHeadWithLoss` (an nn.Linear with the same `weight` key), and the loss is
computed inside its forward, so DeepSpeed ZeRO-3 gathers the head there. Without `labels` the
forward is the family's own (logits, generation, any `attn_implementation`). In a padded batch
(B, L) with `attention_mask`, padding is never a target (`longalign.ops.weighted_loss.mask_padding_labels`).

A packed batch (DESIGN.md §3) is flat, (1, T), and carries transformers' packed-attention keyword
arguments; the forward completes and checks them once (`complete_pack_kwargs`): position ids
restart at every sequence start (derived from `cu_seq_lens_q` when omitted), `cu_seq_lens_k`
equals `cu_seq_lens_q`, `max_length_q/k` is the longest sequence. The attention layers see them
through transformers' kwargs (`longalign.modeling.packed_attention`).

Saved checkpoints are plain family checkpoints (architectures and, for ChatGLM, the remote code
and `auto_map` are written by `longalign.modeling.checkpoints`), so they load without this package.
"""
from __future__ import annotations

import torch
from transformers import LlamaForCausalLM
from transformers.modeling_outputs import CausalLMOutputWithPast

from longalign.ops.varlen_attention import check_pack
from longalign.pack_geometry import positions_from_cu_seqlens
from longalign.ops.weighted_loss import DEFAULT_CHUNK_TOKENS, LMHeadWithLoss, mask_padding_labels
from longalign.modeling.modeling_chatglm import ChatGLMForConditionalGeneration



def complete_pack_kwargs(input_ids, inputs_embeds, position_ids, kwargs: dict):
    """(position_ids, kwargs) of a packed call with every pack key filled in and checked.

    cu_seq_lens_q = [0 3 5] (T = 5) -> cu_seq_lens_k = the same tensor, max_length_q/k = 3,
    position_ids [[0 1 2 0 1]] when None. No-op for a call without `cu_seq_lens_q`.
    """
    cu = kwargs.get("cu_seq_lens_q")
    if cu is None:
        if kwargs.get("cu_seq_lens_k") is not None:
            raise ValueError("cu_seq_lens_k without cu_seq_lens_q")
        return position_ids, kwargs
    ref = input_ids if input_ids is not None else inputs_embeds
    if ref.shape[0] != 1:
        raise ValueError(f"a packed batch is flat, shape (1, T); got batch size {ref.shape[0]}")
    if kwargs.get("attention_mask") is not None:
        raise ValueError("a packed batch (cu_seq_lens_q) takes no attention_mask (DESIGN.md §3)")
    total = ref.shape[1]
    cu = cu.to(device=ref.device, dtype=torch.int32)
    cu_k = kwargs.get("cu_seq_lens_k")
    if cu_k is not None and not torch.equal(cu_k.to(cu), cu):
        raise ValueError("cu_seq_lens_k must equal cu_seq_lens_q: a pack attends within itself")
    longest = check_pack(cu, total)
    if position_ids is None:
        position_ids = positions_from_cu_seqlens(cu, total)
    kwargs = {**kwargs, "cu_seq_lens_q": cu, "cu_seq_lens_k": cu,
              "max_length_q": kwargs.get("max_length_q") or longest,
              "max_length_k": kwargs.get("max_length_k") or longest, "use_cache": False}
    return position_ids, kwargs


class WeightedLossMixin:
    """Top-level forward with the weighted chunked loss (module docstring); mixed into a
    transformers model class whose output embedding is an nn.Linear."""

    loss_chunk_size = DEFAULT_CHUNK_TOKENS  # tokens per chunk of fp32 logits in the loss

    def _use_loss_head(self) -> None:
        """Replace the output embedding by an LMHeadWithLoss of the same shape, then re-run
        post_init (initialisation, weight tying) so the new head is set up like the old one."""
        head = self.get_output_embeddings()
        self.set_output_embeddings(LMHeadWithLoss(head.in_features, head.out_features, bias=head.bias is not None))
        self.post_init()

    def forward(self, input_ids=None, labels=None, loss_weights=None, loss_aggregation="mean",
                position_ids=None, inputs_embeds=None, shift_labels=None, shift_loss_weights=None, **kwargs):
        """`shift_labels` / `shift_loss_weights`: targets and weights already shifted over the
        whole pack (a sequence-parallel shard: `longalign.train.sequence_parallel`), instead of labels."""
        if "loss_reduction" in kwargs:
            raise TypeError("the forward's mean|sum is `loss_aggregation`; `loss_reduction` is train.py's choice "
                            "of weights (sequence|pack_mean|token)")
        position_ids, kwargs = complete_pack_kwargs(input_ids, inputs_embeds, position_ids, kwargs)
        if labels is None and shift_labels is None:
            return super().forward(input_ids=input_ids, position_ids=position_ids, inputs_embeds=inputs_embeds,
                                   **kwargs)
        kwargs.setdefault("use_cache", False)
        kwargs.pop("logits_to_keep", None)  # the loss reads every position
        attention_mask = kwargs.get("attention_mask")
        if labels is not None and attention_mask is not None and attention_mask.dim() == 2:  # padding: no target
            labels = mask_padding_labels(labels, attention_mask[:, -labels.shape[1]:])
        hidden = self.base_model(input_ids=input_ids, position_ids=position_ids, inputs_embeds=inputs_embeds,
                                 **kwargs).last_hidden_state
        loss = self.get_output_embeddings()(hidden, labels=labels, loss_weights=loss_weights,
                                            cu_seqlens=kwargs.get("cu_seq_lens_q"), reduction=loss_aggregation,
                                            chunk_size=self.loss_chunk_size, shift_labels=shift_labels,
                                            shift_weights=shift_loss_weights)
        return CausalLMOutputWithPast(loss=loss)


class LongAlignLlamaForCausalLM(WeightedLossMixin, LlamaForCausalLM):
    """transformers' LlamaForCausalLM (Llama-2, GQA Llama) with the weighted chunked loss."""

    def __init__(self, config):
        super().__init__(config)
        self._use_loss_head()


class LongAlignChatGLMForConditionalGeneration(WeightedLossMixin, ChatGLMForConditionalGeneration):
    """The ChatGLM3 remote-code model with the weighted chunked loss."""

    def __init__(self, config):
        super().__init__(config)
        self._use_loss_head()


TRAINING_CLASSES = {"llama": LongAlignLlamaForCausalLM, "chatglm": LongAlignChatGLMForConditionalGeneration}
# what a saved checkpoint names as its architecture: the family's public class
PUBLIC_ARCHITECTURES = {"llama": "LlamaForCausalLM", "chatglm": "ChatGLMForConditionalGeneration"}
