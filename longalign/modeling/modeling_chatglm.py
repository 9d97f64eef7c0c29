"""ChatGLM2/3 (the ChatGLM3-6B architecture) for transformers: self-contained remote code.

Saved with `configuration_chatglm.py` in every ChatGLM checkpoint this project writes; it imports
torch and transformers only, so a checkpoint loads anywhere with

    AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)

The state-dict keys are those of the official THUDM checkpoints:

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
computed from `rope_ratio`).

One GLMBlock (pre-norm): a = x + SelfAttention(RMSNorm(x)); y = a + MLP(RMSNorm(a)), with
- multi-query attention: `query_key_value` packs [q (H*D) | k (G*D) | v (G*D)] (plain MHA packs
  [q_h | k_h | v_h] per head), query head h reads group h // (H/G);
- rotary on the first D/2 dims of each head, GLM-style interleaved pairs (x[2i], x[2i+1]) turned
  by p * theta_i, theta_i = (10000 * rope_ratio)^(-2i / (D/2)), angles in fp32;
- SwiGLU MLP: dense_h_to_4h -> [a | b], out = dense_4h_to_h(silu(a) * b).

Attention goes through transformers' registry (`ALL_ATTENTION_FUNCTIONS`, chosen by
`attn_implementation`) and masks through `create_causal_mask`, as transformers' own models do, so
every implementation works: sdpa and eager (padded batches, generation, and packed sequences
given by restarting `position_ids`), flash_attention_2 / flex_attention, and any function
registered by name (LongAlign registers its packed varlen attention, which reads the
`cu_seq_lens_q/k` and `max_length_q/k` keyword arguments of a flat (1, T) pack).

With `labels` the loss is transformers' causal-LM loss (`self.loss_function`) on the logits;
LongAlign's training computes its weighted, chunked loss in a subclass that never builds them.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import DynamicCache
from transformers.masking_utils import create_causal_mask
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from .configuration_chatglm import ChatGLMConfig

ROPE_BASE = 10000.0  # ChatGLM's RoPE base before `rope_ratio` scaling
# transformers renamed the outputs' `past_key_values` field to `cache` (5.24); write whichever exists
CACHE_FIELD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"
ROUND_TEMPLATE = "[Round {index}]\n\n问：{query}\n\n答："  # ChatGLM3 base / LongAlign-6B chat format
ROUND_SEPARATOR = "\n\n"


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
    if config.rmsnorm:
        return RMSNorm(config.hidden_size, eps=config.layernorm_epsilon)
    return nn.LayerNorm(config.hidden_size, eps=config.layernorm_epsilon)


def rope_cos_sin(position_ids: torch.Tensor, rot_dim: int, base: float, dtype: torch.dtype):
    """cos, sin of p * theta_i, theta_i = base^(-2i / rot_dim), i < rot_dim/2: (B, L, rot_dim/2)."""
    exponent = torch.arange(0, rot_dim, 2, dtype=torch.float32, device=position_ids.device) / rot_dim
    angles = position_ids.float()[..., None] * (1.0 / (base**exponent))
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Turn the interleaved pairs of the first 2*cos.shape[-1] dims of x (B, L, H, D)."""
    rot = 2 * cos.shape[-1]
    x_rot, x_pass = x[..., :rot], x[..., rot:]
    x0, x1 = x_rot[..., 0::2], x_rot[..., 1::2]
    c, s = cos[:, :, None, :], sin[:, :, None, :]
    rotated = torch.stack((x0 * c - x1 * s, x1 * c + x0 * s), dim=-1).flatten(-2)
    return torch.cat((rotated, x_pass), dim=-1)


def eager_attention_forward(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    """Plain attention on (B, H, L, D) inputs; `attention_mask` additive float or bool (True = attend)."""
    rep = module.num_key_value_groups
    key, value = key.repeat_interleave(rep, dim=1), value.repeat_interleave(rep, dim=1)
    scores = torch.matmul(query, key.transpose(2, 3)) * scaling
    if attention_mask is not None:
        if attention_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attention_mask, torch.finfo(scores.dtype).min)
        else:
            scores = scores + attention_mask
    probs = F.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    probs = F.dropout(probs, p=dropout, training=module.training)
    return torch.matmul(probs, value).transpose(1, 2).contiguous(), probs


class SelfAttention(nn.Module):
    """Multi-query (or multi-head) causal self-attention with ChatGLM's packed `query_key_value`."""

    def __init__(self, config: ChatGLMConfig, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.head_dim = config.kv_channels
        self.multi_query = config.multi_query_attention
        self.num_groups = config.multi_query_group_num if self.multi_query else self.num_heads
        self.num_key_value_groups = self.num_heads // self.num_groups
        self.scaling = self.head_dim**-0.5
        self.is_causal = True
        qkv_size = (self.num_heads + 2 * self.num_groups) * self.head_dim
        self.query_key_value = nn.Linear(config.hidden_size, qkv_size,
                                         bias=config.add_bias_linear or config.add_qkv_bias)
        self.dense = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=config.add_bias_linear)

    def split_qkv(self, mixed: torch.Tensor):
        """(B, L, qkv) -> q (B, L, H, D), k and v (B, L, G, D)."""
        B, L, _ = mixed.shape
        D = self.head_dim
        if self.multi_query:
            q, k, v = mixed.split([self.num_heads * D, self.num_groups * D, self.num_groups * D], dim=-1)
            return q.view(B, L, -1, D), k.view(B, L, -1, D), v.view(B, L, -1, D)
        return mixed.view(B, L, self.num_heads, 3 * D).chunk(3, dim=-1)

    def forward(self, hidden_states, position_embeddings, attention_mask=None, kv_cache=None, **kwargs):
        B, L, _ = hidden_states.shape
        q, k, v = self.split_qkv(self.query_key_value(hidden_states))
        cos, sin = position_embeddings
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, heads, L, D), transformers' layout
        if kv_cache is not None:
            k, v = kv_cache.update(k, v, self.layer_idx)
        attention = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, eager_attention_forward)
        out, _ = attention(self, q, k, v, attention_mask, scaling=self.scaling,
                           dropout=self.config.attention_dropout if self.training else 0.0, **kwargs)
        return self.dense(out.reshape(B, L, -1))


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.dense_h_to_4h = nn.Linear(config.hidden_size, 2 * config.ffn_hidden_size, bias=config.add_bias_linear)
        self.dense_4h_to_h = nn.Linear(config.ffn_hidden_size, config.hidden_size, bias=config.add_bias_linear)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.dense_h_to_4h(x).chunk(2, dim=-1)
        return self.dense_4h_to_h(F.silu(a) * b)


class GLMBlock(GradientCheckpointingLayer):
    """One pre-norm transformer layer (residual from the norm output if
    `apply_residual_connection_post_layernorm`)."""

    def __init__(self, config: ChatGLMConfig, layer_idx: int):
        super().__init__()
        self.residual_post_norm = config.apply_residual_connection_post_layernorm
        self.dropout = config.hidden_dropout
        self.input_layernorm = make_norm(config)
        self.self_attention = SelfAttention(config, layer_idx)
        self.post_attention_layernorm = make_norm(config)
        self.mlp = MLP(config)

    def forward(self, hidden_states, position_embeddings, attention_mask=None, kv_cache=None, **kwargs):
        h = self.input_layernorm(hidden_states)
        attn = self.self_attention(h, position_embeddings, attention_mask, kv_cache, **kwargs)
        x = (h if self.residual_post_norm else hidden_states) + F.dropout(attn, self.dropout, self.training)
        h = self.post_attention_layernorm(x)
        out = self.mlp(h)
        return (h if self.residual_post_norm else x) + F.dropout(out, self.dropout, self.training)


class ChatGLMPreTrainedModel(PreTrainedModel):
    config_class = ChatGLMConfig
    base_model_prefix = "transformer"
    supports_gradient_checkpointing = True
    _no_split_modules = ["GLMBlock"]
    _keys_to_ignore_on_load_unexpected = [r"rotary_pos_emb\.inv_freq"]
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _supports_attention_backend = True


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


def _cache_argument(past_key_values, kwargs):
    """The KV cache under either of transformers' names (`past_key_values`, `cache` from 5.24)."""
    cache = kwargs.pop("cache", None)
    return past_key_values if cache is None else cache


class ChatGLMModel(ChatGLMPreTrainedModel):
    """Embedding -> GLM blocks -> final norm; also owns `output_layer` (the release's layout)."""

    def __init__(self, config: ChatGLMConfig):
        super().__init__(config)
        if config.rope_ratio is None:
            raise ValueError("this ChatGLM config has no rope_ratio: set it (RoPE base = 10000 * rope_ratio; "
                             "ChatGLM3-6B uses 1, ChatGLM3-6B-32k 50, LongAlign's ChatGLM training 200)")
        self.embedding = Embedding(config)
        self.encoder = GLMTransformer(config)
        self.output_layer = nn.Linear(config.hidden_size, config.padded_vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.embedding.word_embeddings

    def set_input_embeddings(self, value):
        self.embedding.word_embeddings = value

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                inputs_embeds=None, use_cache=None, **kwargs) -> BaseModelOutputWithPast:
        """Hidden states (B, L, hidden) after the final norm. A flat pack is (1, T) with
        `position_ids` restarting at 0 per sequence (and, for varlen attention, `cu_seq_lens_q/k`)."""
        cache = _cache_argument(past_key_values, kwargs)
        x = self.embedding(input_ids) if inputs_embeds is None else inputs_embeds
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)
        if kwargs.get("cu_seq_lens_q") is not None and position_ids is None:
            raise ValueError("a packed batch (cu_seq_lens_q) needs position_ids that restart at every sequence")
        if position_ids is None:
            position_ids = _default_positions(x, attention_mask, cache)
        mask = create_causal_mask(self.config, x, attention_mask, cache, position_ids)
        rot_dim = self.config.kv_channels // 2  # rotary on the first half of each head
        cos_sin = rope_cos_sin(position_ids, rot_dim, ROPE_BASE * self.config.rope_ratio, x.dtype)
        for layer in self.encoder.layers:
            x = layer(x, cos_sin, attention_mask=mask, kv_cache=cache, position_ids=position_ids, **kwargs)
        if self.encoder.final_layernorm is not None:
            x = self.encoder.final_layernorm(x)
        return BaseModelOutputWithPast(last_hidden_state=x, **{CACHE_FIELD: cache})


def _default_positions(x, attention_mask, cache) -> torch.Tensor:
    """Positions of the new tokens: the count of real tokens before each one (left or right
    padding) when a 0/1 mask covers past + new tokens, else past, ..., past + L - 1."""
    B, L = x.shape[:2]
    past = cache.get_seq_length() if cache is not None else 0
    if attention_mask is not None and attention_mask.dim() == 2:
        return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -L:]
    return torch.arange(past, past + L, device=x.device)[None].expand(B, -1)


class ChatGLMForConditionalGeneration(ChatGLMPreTrainedModel, GenerationMixin):
    """ChatGLM3 language model: transformers' forward contract, `generate()` and `chat()`."""

    def __init__(self, config: ChatGLMConfig):
        super().__init__(config)
        self.transformer = ChatGLMModel(config)
        self.post_init()

    def get_input_embeddings(self):
        return self.transformer.embedding.word_embeddings

    def set_input_embeddings(self, value):
        self.transformer.embedding.word_embeddings = value

    def get_output_embeddings(self):
        return self.transformer.output_layer

    def set_output_embeddings(self, value):
        self.transformer.output_layer = value

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                inputs_embeds=None, labels=None, use_cache=None, logits_to_keep=0, **kwargs):
        """Logits of the last `logits_to_keep` positions (0: all); with `labels` (aligned with the
        input, shifted inside the loss) also transformers' causal-LM loss."""
        if use_cache is None:
            use_cache = self.config.use_cache and not self.training
        out = self.transformer(input_ids, attention_mask=attention_mask, position_ids=position_ids,
                               past_key_values=_cache_argument(past_key_values, kwargs),
                               inputs_embeds=inputs_embeds, use_cache=use_cache, **kwargs)
        hidden = out.last_hidden_state
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.transformer.output_layer(hidden[:, keep])
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.padded_vocab_size,
                                      **kwargs)
        return CausalLMOutputWithPast(loss=loss, logits=logits, **{CACHE_FIELD: getattr(out, CACHE_FIELD)})

    @torch.inference_mode()
    def chat(self, tokenizer, query: str, history=None, max_new_tokens: int = 1024, temperature: float = 0.8,
             top_p: float = 0.8, do_sample: bool = True, **generate_kwargs):
        """One chat round in the `[Round i]\\n\\n问：…\\n\\n答：` format (rounds joined by "\\n\\n"):
        returns (response, history + [(query, response)]). `temperature <= 0` or `do_sample=False`
        decodes greedily; generation stops at the tokenizer's / config's EOS."""
        history = [tuple(turn) for turn in (history or [])]
        rounds = [ROUND_TEMPLATE.format(index=i, query=q) + a.strip()  # replies are trained stripped
                  for i, (q, a) in enumerate(history, start=1)]
        prompt = ROUND_SEPARATOR.join(rounds + [ROUND_TEMPLATE.format(index=len(history) + 1, query=query)])
        inputs = tokenizer([prompt], return_tensors="pt").to(self.device)
        sample = do_sample and temperature > 0
        kwargs = {"do_sample": sample, "max_new_tokens": max_new_tokens, **generate_kwargs}
        if sample:
            kwargs.update(temperature=temperature, top_p=top_p)
        eos = set(_as_list(self.config.eos_token_id) + _as_list(tokenizer.eos_token_id))
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.config.pad_token_id
        output = self.generate(**inputs, eos_token_id=sorted(eos), pad_token_id=pad, **kwargs)
        response = tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip()
        return response, history + [(query, response)]


def _as_list(value) -> list:
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]
