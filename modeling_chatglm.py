"""ChatGLM3-6B for LongAlign: packed (varlen) training with weighted loss, KV-cache generation, chat().

`ChatGLMConfig` / `ChatGLMForConditionalGeneration` read ChatGLM3 checkpoints (THUDM/chatglm3-6b,
THUDM/LongAlign-6B-64k-base) with their own config.json and state-dict keys:

    transformer.embedding.word_embeddings.weight                       (V, hidden)
    transformer.encoder.layers.{i}.input_layernorm.weight              (hidden,)
    transformer.encoder.layers.{i}.self_attention.query_key_value.*    ((H + 2G) * D, hidden), bias
    transformer.encoder.layers.{i}.self_attention.dense.weight         (hidden, H * D)
    transformer.encoder.layers.{i}.post_attention_layernorm.weight     (hidden,)
    transformer.encoder.layers.{i}.mlp.dense_h_to_4h.weight            (2 * ffn, hidden)
    transformer.encoder.layers.{i}.mlp.dense_4h_to_h.weight            (hidden, ffn)
    transformer.encoder.final_layernorm.weight                         (hidden,)
    transformer.output_layer.weight                                    (V, hidden)

(the release's `transformer.rotary_pos_emb.inv_freq` buffer is ignored: the rotary tables are
recomputed from `rope_ratio`). The layers are in `longalign/chatglm_layers.py`.

Batches follow DESIGN.md §3: a flat pack (1, T) with `cu_seqlens` (attention never crosses a
sequence boundary, positions restart at 0), or a padded (B, L) batch with `attention_mask`.
With `labels` the loss is `longalign.loss.causal_lm_loss` (chunked, no full logits are built),
computed inside `transformer.output_layer`'s forward (ZeRO-3 gathers the head there).

RoPE base: 10000 * rope_ratio, as in ChatGLM3-6B-32k's code. LongAlign's training code for
ChatGLM hard-codes a ratio of 200 (base 2,000,000): a checkpoint trained that way whose config
lacks `rope_ratio` must be loaded with `rope_ratio=200`.
"""
from __future__ import annotations

import torch
from torch import nn
from transformers import DynamicCache, GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

from longalign.chatglm_layers import (
    ROPE_BASE,
    GLMBlock,
    build_attention_mask,
    default_positions,
    make_norm,
    rope_cos_sin,
)
from longalign.attention import check_pack, positions_from_cu_seqlens
from longalign.constants import IGNORE_INDEX
from longalign.loss import DEFAULT_CHUNK_TOKENS, LMHeadWithLoss


class ChatGLMConfig(PretrainedConfig):
    """ChatGLM2/3 configuration; field names and meanings are those of the released config.json.

    Defaults describe ChatGLM3-6B. Unknown fields of the release (apply_query_key_layer_scaling,
    attention_softmax_in_fp32, bias_dropout_fusion, ...) are kept as attributes; they do not change
    the math here (attention is scaled by 1/sqrt(kv_channels) with an fp32-accurate softmax).
    """

    model_type = "chatglm"
    attribute_map = {"num_hidden_layers": "num_layers", "vocab_size": "padded_vocab_size"}

    num_layers: int = 28
    padded_vocab_size: int = 65024
    hidden_size: int = 4096
    ffn_hidden_size: int = 13696
    kv_channels: int = 128
    num_attention_heads: int = 32
    multi_query_attention: bool = True
    multi_query_group_num: int = 2
    seq_length: int = 8192
    hidden_dropout: float = 0.0
    attention_dropout: float = 0.0
    layernorm_epsilon: float = 1e-5
    rmsnorm: bool = True
    apply_residual_connection_post_layernorm: bool = False
    post_layer_norm: bool = True
    add_bias_linear: bool = False
    add_qkv_bias: bool = True
    rope_ratio: float = 1.0
    original_rope: bool = True
    initializer_range: float = 0.02
    use_cache: bool = True
    tie_word_embeddings: bool = False
    eos_token_id: int | list[int] | None = 2
    pad_token_id: int | None = 0

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        if not self.original_rope:
            raise NotImplementedError("only ChatGLM's original (interleaved, half-dim) rotary is implemented")
        if getattr(self, "pre_seq_len", None) or getattr(self, "quantization_bit", 0):
            raise NotImplementedError("P-tuning prefixes and quantized checkpoints are not supported")
        if self.multi_query_attention and self.num_attention_heads % self.multi_query_group_num:
            raise ValueError("num_attention_heads must be a multiple of multi_query_group_num")


class ChatGLMPreTrainedModel(PreTrainedModel):
    config_class = ChatGLMConfig
    base_model_prefix = "transformer"
    supports_gradient_checkpointing = True
    _no_split_modules = ["GLMBlock"]
    _keys_to_ignore_on_load_unexpected = [r"rotary_pos_emb\.inv_freq"]
    _supports_sdpa = True


class Embedding(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.word_embeddings = nn.Embedding(config.padded_vocab_size, config.hidden_size)

    def forward(self, input_ids):
        return self.word_embeddings(input_ids)


class GLMTransformer(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.layers = nn.ModuleList(GLMBlock(config, i) for i in range(config.num_layers))
        self.final_layernorm = make_norm(config) if config.post_layer_norm else None

    def forward(self, x, cos, sin, **layer_kwargs):
        for layer in self.layers:
            x = layer(x, cos, sin, **layer_kwargs)  # positional x, cos, sin: checkpointed inputs
        return self.final_layernorm(x) if self.final_layernorm is not None else x


class ChatGLMModel(ChatGLMPreTrainedModel):
    """Embedding -> GLM blocks -> final RMSNorm; also owns `output_layer` (the release's layout)."""

    def __init__(self, config: ChatGLMConfig):
        super().__init__(config)
        self.embedding = Embedding(config)
        self.encoder = GLMTransformer(config)
        self.output_layer = LMHeadWithLoss(config.hidden_size, config.padded_vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.embedding.word_embeddings

    def set_input_embeddings(self, value):
        self.embedding.word_embeddings = value

    def forward(self, input_ids=None, position_ids=None, attention_mask=None, cu_seqlens=None,
                past_key_values=None, inputs_embeds=None, **kwargs) -> BaseModelOutputWithPast:
        """Hidden states (B, L, hidden) after the final norm (inputs: see `attention_inputs`)."""
        x = self.embedding(input_ids) if inputs_embeds is None else inputs_embeds
        position_ids, layer_kwargs = self.attention_inputs(x, position_ids, attention_mask, cu_seqlens,
                                                           past_key_values)
        rot_dim = self.config.kv_channels // 2  # rotary on the first half of each head
        cos, sin = rope_cos_sin(position_ids, rot_dim, ROPE_BASE * self.config.rope_ratio, x.dtype)
        x = self.encoder(x, cos, sin, past_key_values=past_key_values, **layer_kwargs)
        return BaseModelOutputWithPast(last_hidden_state=x, past_key_values=past_key_values)

    @staticmethod
    def attention_inputs(x, position_ids, attention_mask, cu_seqlens, past_key_values):
        """(position_ids, layer kwargs) for a flat pack or a (B, L) batch.

        Pack: x (1, T), cu_seqlens (n+1,) = [0, e_1, ..., T], no attention_mask, no cache; positions
        restart at every sequence start unless given. Batch: optional 0/1 attention_mask (B, past+L)
        (all ones is dropped: plain causal SDPA), positions = count of real tokens before each token.
        """
        B, L = x.shape[:2]
        if cu_seqlens is not None:
            if B != 1 or past_key_values is not None or attention_mask is not None:
                raise ValueError("a packed batch is flat, (1, T) with cu_seqlens, no attention_mask, no cache")
            cu_seqlens = cu_seqlens.to(device=x.device, dtype=torch.int32)
            max_seqlen = check_pack(cu_seqlens, L)
            if position_ids is None:
                position_ids = positions_from_cu_seqlens(cu_seqlens, L)
            return position_ids, {"cu_seqlens": cu_seqlens, "max_seqlen": max_seqlen}
        past = past_key_values.get_seq_length() if past_key_values is not None else 0
        if attention_mask is not None and bool(attention_mask.all()):
            attention_mask = None
        if position_ids is None:
            position_ids = default_positions(B, L, past, attention_mask, x.device)
        return position_ids, {"mask": build_attention_mask(attention_mask, L, past, x.device)}


class ChatGLMForConditionalGeneration(ChatGLMPreTrainedModel, GenerationMixin):
    """ChatGLM3 language model: packed/padded training forward, `generate()` and `chat()`."""

    def __init__(self, config: ChatGLMConfig):
        super().__init__(config)
        self.transformer = ChatGLMModel(config)
        self.loss_chunk_size = DEFAULT_CHUNK_TOKENS  # tokens per chunk of fp32 logits in the loss
        self.post_init()

    def get_input_embeddings(self):
        return self.transformer.embedding.word_embeddings

    def set_input_embeddings(self, value):
        self.transformer.embedding.word_embeddings = value

    def get_output_embeddings(self):
        return self.transformer.output_layer

    def set_output_embeddings(self, value):
        self.transformer.output_layer = value

    def forward(self, input_ids=None, labels=None, loss_weights=None, cu_seqlens=None, position_ids=None,
                attention_mask=None, loss_reduction="mean", past_key_values=None, use_cache=None,
                logits_to_keep=0, inputs_embeds=None, **kwargs) -> CausalLMOutputWithPast:
        """DESIGN.md §3/§4 forward.

        Packed: input_ids/labels/position_ids/loss_weights (1, T) + cu_seqlens (n+1,).
        Padded: (B, L) tensors + attention_mask (1 = token, 0 = padding; labels on padding are ignored).
        With `labels`: loss = causal_lm_loss(...) (targets shifted within each sequence) and
        logits = None; without: logits of the last `logits_to_keep` positions (0 = all).
        `use_cache=True` (or a `past_key_values` Cache) enables the KV cache for generation.
        """
        if use_cache and past_key_values is None and not self.training:
            past_key_values = DynamicCache()
        out = self.transformer(input_ids, position_ids=position_ids, attention_mask=attention_mask,
                               cu_seqlens=cu_seqlens, past_key_values=past_key_values, inputs_embeds=inputs_embeds)
        hidden = out.last_hidden_state
        loss = logits = None
        if labels is not None:
            if attention_mask is not None and cu_seqlens is None:
                labels = mask_padding_labels(labels, attention_mask[:, -labels.shape[1]:])
            loss = self.transformer.output_layer(hidden, labels, loss_weights, cu_seqlens,
                                                 reduction=loss_reduction, chunk_size=self.loss_chunk_size)
        else:
            logits = self.transformer.output_layer(hidden[:, -logits_to_keep:] if logits_to_keep else hidden)
        return CausalLMOutputWithPast(loss=loss, logits=logits, past_key_values=out.past_key_values)

    @torch.inference_mode()
    def chat(self, tokenizer, query: str, history=None, max_new_tokens: int = 1024, temperature: float = 0.8,
             top_p: float = 0.8, do_sample: bool = True, **generate_kwargs):
        """One chat round: returns (response, history + [(query, response)]).

        The prompt is `longalign.templates.build_prompt("chatglm", history, query)`, tokenized with
        the tokenizer's own special tokens (`[gMASK]sop` for ChatGLM3); `temperature <= 0` or
        `do_sample=False` decodes greedily. Generation stops at the tokenizer's / config's EOS.
        """
        from longalign.templates import build_prompt

        history = [tuple(turn) for turn in (history or [])]
        inputs = tokenizer([build_prompt("chatglm", history, query)], return_tensors="pt").to(self.device)
        sample = do_sample and temperature > 0
        kwargs = {"do_sample": sample, "max_new_tokens": max_new_tokens, **generate_kwargs}
        if sample:
            kwargs.update(temperature=temperature, top_p=top_p)
        eos = {i for i in _as_list(self.config.eos_token_id) + _as_list(tokenizer.eos_token_id)}
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.config.pad_token_id
        output = self.generate(**inputs, eos_token_id=sorted(eos), pad_token_id=pad, **kwargs)
        response = tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip()
        return response, history + [(query, response)]


def mask_padding_labels(labels: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """IGNORE_INDEX on padding and on a token right after padding (left padding: the first real
    token would otherwise be the target of the padding position before it)."""
    real = attention_mask != 0
    prev_real = torch.cat([torch.ones_like(real[:, :1]), real[:, :-1]], dim=1)
    return labels.masked_fill(~(real & prev_real), IGNORE_INDEX)


def _as_list(value) -> list[int]:
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]


def _register_auto_classes() -> None:
    """Let AutoConfig / AutoModelForCausalLM resolve model_type "chatglm" to these classes."""
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    for register in (lambda: AutoConfig.register("chatglm", ChatGLMConfig),
                     lambda: AutoModel.register(ChatGLMConfig, ChatGLMForConditionalGeneration),
                     lambda: AutoModelForCausalLM.register(ChatGLMConfig, ChatGLMForConditionalGeneration)):
        try:
            register()
        except ValueError:  # already registered (module imported twice under different names)
            pass


_register_auto_classes()
