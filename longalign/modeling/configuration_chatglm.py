"""ChatGLM2/3 configuration (self-contained remote code: transformers only).

Saved beside `modeling_chatglm.py` in every ChatGLM checkpoint this project writes, so that

    AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)

loads it anywhere (vLLM, lm-eval-harness, LongBench scripts) without this repository.
Field names and meanings are those of the released ChatGLM3-6B config.json; defaults describe
ChatGLM3-6B. Release-only fields (apply_query_key_layer_scaling, attention_softmax_in_fp32,
bias_dropout_fusion, ...) are kept as attributes; they do not change the math.

RoPE base = 10000 * `rope_ratio`. There is no default: ChatGLM3-6B's own config has no
`rope_ratio` (its code uses base 10000, ratio 1), ChatGLM3-6B-32k's has 50, and LongAlign's
training code hard-codes 200 in its modeling file. A config without the field would silently
run with the wrong base, so the model refuses to build until `rope_ratio` is set.
"""
from transformers import PretrainedConfig


class ChatGLMConfig(PretrainedConfig):
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
    rope_ratio: float | None = None
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
        if self.rope_ratio is not None and not self.rope_ratio > 0:
            raise ValueError(f"rope_ratio must be positive, got {self.rope_ratio}")
