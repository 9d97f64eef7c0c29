"""longalign.modeling.loading: the family and the ChatGLM RoPE ratio come from the checkpoint,
never from a silent default; remote-code tokenizers need an explicit flag."""
import json

import pytest
import torch

from longalign.modeling.loading import (checkpoint_rope_ratio, load_training_model, load_training_tokenizer,
                                        model_family, resolve_rope_ratio)
from longalign.demo.tiny_model import TinyShape, save_tiny_model

SHAPE = TinyShape(hidden=32, layers=1, heads=4, kv_heads=2, intermediate=64, max_positions=128)


@pytest.fixture
def chatglm_dir(tiny_tokenizer_dir, tmp_path):
    return save_tiny_model("chatglm", tiny_tokenizer_dir, tmp_path / "glm", SHAPE)["out"]


def _drop_rope_ratio(folder):
    config_file = folder / "config.json"
    config = json.loads(config_file.read_text())
    config.pop("rope_ratio")
    config_file.write_text(json.dumps(config))


def test_ratio_from_config_or_shipped_code_or_an_error(chatglm_dir, tmp_path):
    folder = tmp_path / "glm"
    assert model_family(folder) == "chatglm"
    assert checkpoint_rope_ratio(folder) == (1.0, "config.json rope_ratio")
    _drop_rope_ratio(folder)
    (folder / "modeling_chatglm.py").write_text("class RotaryEmbedding:\n    def __init__(self):\n"
                                                "        self.ratio = 200\n")  # LongAlign's training code
    assert resolve_rope_ratio(folder, None) == 200.0
    (folder / "modeling_chatglm.py").write_text("# base 10000, no ratio anywhere\n")
    with pytest.raises(ValueError, match="--rope_ratio"):
        resolve_rope_ratio(folder, None)
    with pytest.raises(ValueError, match="--rope_ratio"):
        load_training_model(folder, dtype=torch.float32)
    assert resolve_rope_ratio(folder, 50.0) == 50.0


def test_loaded_ratio_changes_the_model(chatglm_dir, tmp_path):
    """The ratio reaches the rotary tables: ratio 1 and 200 give different logits (not silently equal)."""
    ids = torch.tensor([[5, 9, 13, 21, 34, 55, 89, 144]])
    with torch.no_grad():
        one = load_training_model(chatglm_dir, dtype=torch.float32).eval()(ids).logits
        two_hundred = load_training_model(chatglm_dir, dtype=torch.float32, rope_ratio=200.0).eval()(ids).logits
    assert not torch.allclose(one, two_hundred)


def test_rope_ratio_is_refused_for_llama(tiny_tokenizer_dir, tmp_path):
    folder = save_tiny_model("llama", tiny_tokenizer_dir, tmp_path / "llama", SHAPE)["out"]
    with pytest.raises(ValueError, match="ChatGLM"):
        load_training_model(folder, dtype=torch.float32, rope_ratio=2.0)


def test_remote_code_tokenizer_needs_the_flag(tiny_tokenizer_dir, tmp_path):
    import shutil

    folder = tmp_path / "tok"
    shutil.copytree(tiny_tokenizer_dir, folder)
    config_file = folder / "tokenizer_config.json"
    config = json.loads(config_file.read_text())
    config["auto_map"] = {"AutoTokenizer": ["tokenization_chatglm.ChatGLMTokenizer", None]}
    config_file.write_text(json.dumps(config))
    with pytest.raises(ValueError, match="--trust_remote_code"):
        load_training_tokenizer(folder)
