"""longalign.generation: family detection, exact middle truncation, prompts, seeded sampling."""
import pytest

from longalign.generation import (GenerationSettings, build_input_ids, detect_family, encode_text,
                                  generate_response, load_model_and_tokenizer, middle_truncate)
from tiny_llama import save_tiny_llama

SIMPLE_TEMPLATE = "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{% endfor %}<|assistant|>"


@pytest.fixture(scope="module")
def tiny_llama_dir(tiny_tokenizer_dir, tmp_path_factory):
    return save_tiny_llama(tiny_tokenizer_dir, tmp_path_factory.mktemp("tiny_llama"))


def test_middle_truncate_exact():
    ids = list(range(100))
    assert middle_truncate(ids, 100) == ids
    assert middle_truncate(ids, None) == ids
    assert middle_truncate(ids, 10) == [0, 1, 2, 3, 4, 95, 96, 97, 98, 99]
    assert middle_truncate(ids, 7) == [0, 1, 2, 97, 98, 99]  # int(max_length / 2) from each end
    with pytest.raises(ValueError):
        middle_truncate(ids, 1)


def test_detect_family(tiny_tokenizer):
    assert detect_family("THUDM/LongAlign-6B-64k") == "chatglm"
    assert detect_family("/models/chatglm3-6b-32k") == "chatglm"
    assert detect_family("THUDM/LongAlign-13B-64k", tiny_tokenizer, "llama") == "llama"
    assert detect_family("/ckpt/my-run", tiny_tokenizer, "llama") == "llama"
    assert detect_family("/ckpt/my-run", None, "chatglm") == "chatglm"
    with pytest.raises(ValueError, match="--family"):
        detect_family("/ckpt/mistral", tiny_tokenizer, "mistral")


def test_llama_prompt_ids(tiny_tokenizer):
    query_ids = encode_text(tiny_tokenizer, "What is the key?")
    ids = build_input_ids("llama", tiny_tokenizer, query_ids)
    prefix, suffix = encode_text(tiny_tokenizer, "[INST]"), encode_text(tiny_tokenizer, "[/INST]")
    assert ids == [tiny_tokenizer.bos_token_id] + prefix + query_ids + suffix
    assert tiny_tokenizer.decode(ids, skip_special_tokens=True) == "[INST]What is the key?[/INST]"


def test_chat_template_prompt_ids(tiny_tokenizer_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    tokenizer.chat_template = SIMPLE_TEMPLATE
    assert detect_family("/ckpt/other", tokenizer, "mistral") == "chat_template"
    query_ids = encode_text(tokenizer, "hello there")
    ids = build_input_ids("chat_template", tokenizer, query_ids)
    text = tokenizer.decode(ids, skip_special_tokens=True)
    assert text == "<|user|>hello there<|assistant|>"


def test_generation_truncates_exactly_and_is_seeded(tiny_llama_dir):
    model, tokenizer, family = load_model_and_tokenizer(tiny_llama_dir)
    assert family == "llama"
    query = "The quick brown fox jumps over the lazy dog. " * 30
    n = len(encode_text(tokenizer, query))
    settings = GenerationSettings(max_new_tokens=6, temperature=1.0, seed=42, max_length=40)
    first = generate_response(model, tokenizer, family, query, settings)
    assert first["truncated"] and first["query_tokens"] == n and first["kept_query_tokens"] == 40
    expected = build_input_ids(family, tokenizer, middle_truncate(encode_text(tokenizer, query), 40))
    assert first["prompt_tokens"] == len(expected)
    assert generate_response(model, tokenizer, family, query, settings)["response"] == first["response"]
    short = generate_response(model, tokenizer, family, "short question", settings)
    assert not short["truncated"] and isinstance(short["response"], str)


class RecordingChatModel:
    """Stands in for a ChatGLM model: records what `.chat` receives."""

    def __init__(self):
        self.calls = []

    def chat(self, tokenizer, query, history, max_new_tokens, temperature):
        self.calls.append((query, history, max_new_tokens, temperature))
        return " answer ", history + [(query, "answer")]


def test_chatglm_family_gets_decoded_halves(tiny_tokenizer):
    model = RecordingChatModel()
    query = "0123456789 abcdefghijklmnopqrstuvwxyz " * 20
    ids = encode_text(tiny_tokenizer, query)
    out = generate_response(model, tiny_tokenizer, "chatglm", query, GenerationSettings(max_length=20))
    sent, history, max_new, temperature = model.calls[0]
    halves = tiny_tokenizer.decode(ids[:10]) + tiny_tokenizer.decode(ids[-10:])
    assert sent == halves and history == [] and (max_new, temperature) == (1024, 1.0)
    assert out["response"] == "answer" and out["truncated"]


def test_chatglm_checkpoint_loads_and_chats(tiny_tokenizer_dir, tiny_tokenizer, tmp_path):
    from longalign.tiny_model import TinyShape, save_tiny_model

    out = tmp_path / "my-run"  # a name without "chatglm": detected from config.model_type
    save_tiny_model("chatglm", tiny_tokenizer_dir, out, TinyShape(hidden=32, layers=2, heads=4, kv_heads=2,
                                                                  intermediate=64, max_positions=512))
    model, tokenizer, family = load_model_and_tokenizer(str(out))
    assert family == "chatglm" and type(model).__name__ == "ChatGLMForConditionalGeneration"
    settings = GenerationSettings(max_new_tokens=4, max_length=30)
    result = generate_response(model, tokenizer, family, "The quick brown fox jumps. " * 20, settings)
    assert result["truncated"] and result["kept_query_tokens"] == 30
    assert generate_response(model, tokenizer, family, "The quick brown fox jumps. " * 20, settings) == result
