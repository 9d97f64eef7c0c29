"""The one reader of a model's shape (layers, widths, heads, KV heads) from a llama or chatglm config,
for the trainer's FLOP count, the memory model and sequence parallelism."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ModelShape:
    """The config fields the memory model, the FLOP count and Ulysses SP read, under one name each."""
    family: str  # "llama" | "chatglm": the norm and qkv layout
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int

    @classmethod
    def from_config(cls, config) -> "ModelShape":
        config = config.get_text_config() if hasattr(config, "get_text_config") else config
        try:
            if getattr(config, "model_type", None) == "chatglm":
                heads = config.num_attention_heads
                groups = config.multi_query_group_num if config.multi_query_attention else heads
                return cls("chatglm", config.num_layers, config.hidden_size, heads, groups,
                           config.kv_channels, config.ffn_hidden_size, config.padded_vocab_size)
            heads = config.num_attention_heads
            head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
            return cls("llama", config.num_hidden_layers, config.hidden_size, heads,
                       getattr(config, "num_key_value_heads", None) or heads, head_dim, config.intermediate_size,
                       config.vocab_size)
        except (AttributeError, TypeError) as error:
            raise ValueError(f"cannot read layers / heads from {type(config).__name__}: {error}") from error

    @property
    def attention_width(self) -> int:
        """Query heads x head dim (the FLOP count's d)."""
        return self.heads * self.head_dim
