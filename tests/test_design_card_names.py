"""The original repository's top-level names: modeling_chatglm.py / modeling_llama.py re-export the
families' model code (one copy: the ChatGLM remote code a checkpoint ships), the flash-attention
call registers LongAlign's varlen attention through transformers' AttentionInterface, and
`pip install -r requirements.txt` installs this package at the lock's versions."""
import ast
import re
import tomllib
from pathlib import Path

import torch
import transformers

import llama_flash_attn_monkey_patch
import modeling_chatglm
import modeling_llama
from longalign.modeling import checkpoints, configuration_chatglm
from longalign.modeling import modeling_chatglm as remote_chatglm
from longalign.modeling import packed_attention, weighted_lm

REPO = Path(__file__).resolve().parents[1]
ROOT_NAMES = ("modeling_chatglm", "modeling_llama", "llama_flash_attn_monkey_patch")


def test_modeling_chatglm_is_the_remote_code_a_checkpoint_ships():
    assert modeling_chatglm.ChatGLMForConditionalGeneration is remote_chatglm.ChatGLMForConditionalGeneration
    assert modeling_chatglm.ChatGLMConfig is configuration_chatglm.ChatGLMConfig
    assert modeling_chatglm.LongAlignChatGLMForConditionalGeneration is weighted_lm.LongAlignChatGLMForConditionalGeneration
    assert [p.name for p in modeling_chatglm.REMOTE_CODE_FILES] == ["configuration_chatglm.py", "modeling_chatglm.py"]
    assert set(checkpoints.CHATGLM_AUTO_MAP.values()) >= {"modeling_chatglm.ChatGLMForConditionalGeneration"}
    for name in modeling_chatglm.__all__:
        assert getattr(modeling_chatglm, name) is not None


def test_modeling_llama_is_stock_transformers_plus_the_training_class():
    assert modeling_llama.LlamaForCausalLM is transformers.LlamaForCausalLM
    assert issubclass(modeling_llama.LongAlignLlamaForCausalLM, transformers.LlamaForCausalLM)
    assert modeling_llama.ATTN_IMPLEMENTATION == packed_attention.ATTN_IMPLEMENTATION


def test_library_never_imports_the_root_entry_points():
    for path in (REPO / "longalign").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module] if isinstance(node, ast.ImportFrom) and node.level == 0 else [])
            assert not {str(n).split(".")[0] for n in names} & set(ROOT_NAMES), path


def _stock_llama():
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return transformers.LlamaForCausalLM(config).eval()


def test_replace_llama_attn_runs_the_varlen_kernel_and_keeps_sequences_apart(monkeypatch):
    model = _stock_llama()
    name = llama_flash_attn_monkey_patch.replace_llama_attn_with_flash_attn(model)
    assert name == packed_attention.ATTN_IMPLEMENTATION
    assert model.config._attn_implementation == name
    assert name in transformers.AttentionInterface._global_mapping
    calls = []
    kernel = packed_attention.varlen_attention
    monkeypatch.setattr(packed_attention, "varlen_attention", lambda *a, **k: calls.append(1) or kernel(*a, **k))
    seqs = [torch.randint(0, 64, (n,), generator=torch.Generator().manual_seed(n)) for n in (7, 3, 5)]
    positions = torch.cat([torch.arange(len(s)) for s in seqs])[None]
    with torch.no_grad():
        packed = model(input_ids=torch.cat(seqs)[None], position_ids=positions).logits[0]
        alone = torch.cat([model(input_ids=s[None]).logits[0] for s in seqs])
    assert len(calls) == model.config.num_hidden_layers
    assert (packed - alone).abs().max().item() <= 1e-5


def test_requirements_txt_installs_this_package_at_the_lock_versions():
    lines = [ln.strip() for ln in (REPO / "requirements.txt").read_text().splitlines()
             if ln.strip() and not ln.startswith("#")]
    assert lines == ["-c requirements.lock", "-e ."]
    locked = {re.split(r"==", ln)[0].lower().replace("_", "-")
              for ln in (REPO / "requirements.lock").read_text().splitlines() if "==" in ln}
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    names = {re.split(r"[<>=!~ \[;]", d)[0].lower().replace("_", "-") for d in deps}
    assert names - {"torch"} <= locked, names - locked  # torch: installed first, for the machine
