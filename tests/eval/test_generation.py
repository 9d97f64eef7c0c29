"""longalign.eval.generation / chat_formats: truncation, chat formats, remote code, local generation."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from longalign.eval import generation
from longalign.eval.prompt_formats import ChatFormat, render_prompt, resolve_chat_format
from longalign.remote_code import RemoteCodeRequired
from longalign.eval.generation import (CHARACTERS, TOKENS, GenerationSettings, LocalModel,
                                  encode_prompt, encode_text, middle_truncate, prepare_prompt, truncate_query)
from longalign.data.training_format import build_prompt
from longalign.demo.tiny_model import TinyShape, save_tiny_model
from helpers.tiny_llama import save_tiny_llama

SIMPLE_TEMPLATE = "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{% endfor %}<|assistant|>"
# what this repo's Llama checkpoints carry: exactly templates.py's "[INST]{user}[/INST]"
LLAMA_TRAINING_TEMPLATE = ("{% for m in messages %}{% if m['role'] == 'user' %}[INST]{{ m['content'] }}[/INST]"
                           "{% else %}{{ m['content'] }}{% endif %}{% endfor %}")
QUERY = "The quick brown fox jumps over the lazy dog. " * 30
ROOT_MODEL_MODULES = ("modeling_chatglm", "modeling_llama", "llama_flash_attn_monkey_patch")


@pytest.fixture(scope="module")
def tiny_llama_dir(tiny_tokenizer_dir, tmp_path_factory):
    return save_tiny_llama(tiny_tokenizer_dir, tmp_path_factory.mktemp("tiny_llama"))


def fmt(name):
    return ChatFormat(name, "test")


def test_middle_truncate_exact():
    ids = list(range(100))
    assert middle_truncate(ids, 100) == ids
    assert middle_truncate(ids, None) == ids
    assert middle_truncate(ids, 10) == [0, 1, 2, 3, 4, 95, 96, 97, 98, 99]
    assert middle_truncate(ids, 7) == [0, 1, 2, 97, 98, 99]  # int(max_length / 2) from each end
    assert middle_truncate("abcdefghij", 4) == "abij"
    with pytest.raises(ValueError):
        middle_truncate(ids, 1)


def test_truncation_by_tokens_decodes_the_two_halves(tiny_tokenizer):
    ids = encode_text(tiny_tokenizer, QUERY)
    text, unit, length, kept = truncate_query(QUERY, tiny_tokenizer, 40)
    assert (unit, length, kept) == (TOKENS, len(ids), 40)
    assert text == tiny_tokenizer.decode(ids[:20]) + tiny_tokenizer.decode(ids[-20:])  # the paper's way
    text, _, length, kept = truncate_query("short", tiny_tokenizer, 40)
    assert text == "short" and length == kept == len(encode_text(tiny_tokenizer, "short"))


def test_truncation_by_characters_without_tokenizer():
    prompt = prepare_prompt("a" * 50 + "MIDDLE" + "b" * 50, fmt("llama"), None, 20)
    assert prompt.text == "[INST]" + "a" * 10 + "b" * 10 + "[/INST]"
    assert prompt.record() == {"truncation_unit": CHARACTERS, "query_length": 106, "kept_query_length": 20,
                               "truncated": True}


def test_chat_format_order(tiny_tokenizer_dir):
    from transformers import AutoTokenizer

    templated = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    templated.chat_template = SIMPLE_TEMPLATE
    plain = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    # released LongAlign models keep their training format even when the tokenizer has a template
    assert resolve_chat_format("auto", "THUDM/LongAlign-6B-64k", templated).name == "chatglm"
    assert resolve_chat_format("auto", "THUDM/LongAlign-13B-64k", templated, "llama").name == "llama"
    # any other model: its own chat template first
    chosen = resolve_chat_format("auto", "/ckpt/glm-4-9b-chat", templated, "chatglm")
    assert chosen.name == "chat_template" and len(chosen.template_sha256) == 64
    assert resolve_chat_format("auto", "/ckpt/my-run", plain, "llama").name == "llama"
    assert resolve_chat_format("auto", "/ckpt/my-run", plain, "chatglm").name == "chatglm"
    assert resolve_chat_format("auto", "/models/chatglm3-6b-32k").name == "chatglm"
    assert resolve_chat_format("llama", "/ckpt/x", templated).reason == "--chat_format"
    with pytest.raises(ValueError, match="--chat_format"):
        resolve_chat_format("auto", "/ckpt/mistral", plain, "mistral")
    with pytest.raises(ValueError, match="needs a tokenizer with a chat_template"):
        resolve_chat_format("chat_template", "/ckpt/x", plain)
    assert resolve_chat_format("auto", "served", None, served_chat_api=True).name == "server"
    with pytest.raises(ValueError, match="--model_api completions"):
        resolve_chat_format("llama", "served", None, served_chat_api=True)


def test_rendered_prompts(tiny_tokenizer_dir, tiny_tokenizer):
    from transformers import AutoTokenizer

    assert render_prompt(fmt("llama"), "Q?") == "[INST]Q?[/INST]"
    assert render_prompt(fmt("chatglm"), "Q?") == "[Round 1]\n\n问：Q?\n\n答："
    assert render_prompt(fmt("server"), "Q?") == "Q?"
    tokenizer = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    tokenizer.chat_template = "{{ bos_token }}" + SIMPLE_TEMPLATE  # a template that writes BOS itself
    text = render_prompt(resolve_chat_format("chat_template", "x", tokenizer), "hello", tokenizer)
    assert text == "<|user|>hello<|assistant|>"  # BOS left to the tokenizer, so not doubled
    assert encode_prompt(tokenizer, text).count(tokenizer.bos_token_id) == 1


def test_repo_chat_template_and_training_format_agree(tiny_tokenizer_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    tokenizer.chat_template = LLAMA_TRAINING_TEMPLATE
    via_template = resolve_chat_format("auto", "/ckpt/my-run", tokenizer, "llama")
    assert via_template.name == "chat_template"
    assert render_prompt(via_template, QUERY, tokenizer) == render_prompt(fmt("llama"), QUERY) == \
        build_prompt("llama", [], QUERY)


def test_local_generation_truncates_and_is_seeded(tiny_llama_dir):
    model = LocalModel(tiny_llama_dir)
    assert model.chat_format.name == "llama" and model.identity()["kind"] == "local"
    settings = GenerationSettings(max_new_tokens=6, temperature=1.0, seed=42, max_length=40)
    first = model.respond(QUERY, settings)
    assert first["truncated"] and first["kept_query_length"] == 40 and first["truncation_unit"] == TOKENS
    assert first["finish_reason"] in ("stop", "length")
    assert first["query_length"] == len(encode_text(model.tokenizer, QUERY))
    expected = prepare_prompt(QUERY, model.chat_format, model.tokenizer, 40)
    assert first["prompt_tokens"] == len(encode_prompt(model.tokenizer, expected.text))
    assert model.respond(QUERY, settings)["response"] == first["response"]
    short = model.respond("short question", settings)
    assert not short["truncated"] and isinstance(short["response"], str)
    greedy = GenerationSettings(max_new_tokens=6, temperature=0, seed=1, max_length=40)
    assert model.respond(QUERY, greedy) == model.respond(QUERY, GenerationSettings(6, 0, 2, 40))


def test_forced_chatglm_format_goes_through_generate(tiny_llama_dir, monkeypatch):
    """The chatglm family no longer uses model.chat: its prompt is built here and fed to generate."""
    model = LocalModel(tiny_llama_dir, chat_format="chatglm")
    seen = []
    real = generation.sample
    monkeypatch.setattr(generation, "sample", lambda m, t, ids, s: seen.append(list(ids)) or real(m, t, ids, s))
    model.respond("What is the key?", GenerationSettings(max_new_tokens=2, max_length=64))
    assert seen == [encode_prompt(model.tokenizer, "[Round 1]\n\n问：What is the key?\n\n答：")]


def test_settings_record_changes_with_every_setting(tiny_llama_dir, tiny_tokenizer_dir, tmp_path):
    model = LocalModel(tiny_llama_dir)
    base = model.settings_record(GenerationSettings(max_length=64))
    assert base["candidate"]["fingerprint"]["files"] >= 4 and base["tokenizer"]["path"] == tiny_llama_dir
    for changed in (GenerationSettings(max_length=65), GenerationSettings(max_length=64, temperature=0.5),
                    GenerationSettings(max_length=64, top_p=0.9), GenerationSettings(max_length=64, seed=1),
                    GenerationSettings(max_length=64, max_new_tokens=8)):
        assert model.settings_record(changed) != base
    other = save_tiny_llama(tiny_tokenizer_dir, tmp_path / "other", seed=1)  # same shapes, other weights
    assert LocalModel(other).settings_record(GenerationSettings(max_length=64))["candidate"]["fingerprint"] != \
        base["candidate"]["fingerprint"]


def write_remote_code_model(tiny_tokenizer_dir, tmp_path):
    """A tiny Llama whose config asks for its own code (auto_map), as ChatGLM checkpoints do."""
    out = Path(save_tiny_llama(tiny_tokenizer_dir, tmp_path / "remote"))
    (out / "configuration_tinyremote.py").write_text(
        "from transformers import LlamaConfig\n\nclass TinyRemoteConfig(LlamaConfig):\n    model_type = 'tinyremote'\n")
    (out / "modeling_tinyremote.py").write_text(
        "from transformers import LlamaForCausalLM\nfrom .configuration_tinyremote import TinyRemoteConfig\n\n"
        "class TinyRemoteForCausalLM(LlamaForCausalLM):\n    config_class = TinyRemoteConfig\n")
    config = json.loads((out / "config.json").read_text())
    config.update(model_type="tinyremote", architectures=["TinyRemoteForCausalLM"],
                  auto_map={"AutoConfig": "configuration_tinyremote.TinyRemoteConfig",
                            "AutoModelForCausalLM": "modeling_tinyremote.TinyRemoteForCausalLM"})
    (out / "config.json").write_text(json.dumps(config))
    return str(out)


def test_remote_code_needs_the_flag(tiny_tokenizer_dir, tmp_path):
    path = write_remote_code_model(tiny_tokenizer_dir, tmp_path)
    with pytest.raises(RemoteCodeRequired, match="pass --trust_remote_code"):
        LocalModel(path, chat_format="llama")
    model = LocalModel(path, chat_format="llama", trust_remote_code=True)
    out = model.respond("hello", GenerationSettings(max_new_tokens=2, max_length=32))
    assert type(model.model).__name__ == "TinyRemoteForCausalLM" and isinstance(out["response"], str)


def test_attention_implementation_choice(monkeypatch):
    import transformers.utils

    assert generation.attn_implementation_for("llama", "cpu") is None
    assert generation.attn_implementation_for("chatglm", "cuda") is None
    monkeypatch.setattr(transformers.utils, "is_flash_attn_2_available", lambda: True)
    assert generation.attn_implementation_for("llama", "cuda:0") == "flash_attention_2"
    monkeypatch.setattr(transformers.utils, "is_flash_attn_2_available", lambda: False)
    assert generation.attn_implementation_for("llama", "cuda") == "sdpa"


@pytest.mark.subprocess
def test_no_root_model_modules_are_imported():
    code = ("import sys, longalign.eval.generation, longalign.eval.candidates, longalign.eval.served_model; "
            f"print([m for m in {ROOT_MODEL_MODULES!r} if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=str(Path(__file__).resolve().parents[2]))
    assert out.stdout.strip() == "[]"


def test_chatglm_checkpoint_loads_through_auto_classes(tiny_tokenizer_dir, tmp_path):
    """A ChatGLM checkpoint of this repo: remote code through AutoModelForCausalLM."""
    shape = TinyShape(hidden=32, layers=1, heads=4, kv_heads=2, intermediate=64, max_positions=512)
    out = save_tiny_model("chatglm", tiny_tokenizer_dir, tmp_path / "my-run", shape)["out"]
    if "auto_map" not in json.loads((Path(out) / "config.json").read_text()):
        pytest.skip("ChatGLM checkpoints carry no remote code yet (the lead's change); runs after it lands")
    with pytest.raises(RemoteCodeRequired):
        LocalModel(out)
    model = LocalModel(out, trust_remote_code=True)
    assert model.chat_format.name in ("chatglm", "chat_template")
    settings = GenerationSettings(max_new_tokens=4, max_length=30)
    result = model.respond("The quick brown fox jumps. " * 20, settings)
    assert result["truncated"] and result["kept_query_length"] == 30
    assert model.respond("The quick brown fox jumps. " * 20, settings) == result
