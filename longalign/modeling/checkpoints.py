"""Self-describing checkpoints: what a saved folder needs to load without this repository.

`make_self_describing(folder, family)` rewrites the folder's config.json so that
- `architectures` names the family's public class (LlamaForCausalLM /
  ChatGLMForConditionalGeneration), not the training subclass;
- for ChatGLM, `configuration_chatglm.py` and `modeling_chatglm.py` (self-contained remote code,
  torch + transformers only) are copied in and `auto_map` points at them, so
  `AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)` loads it anywhere;
  Llama checkpoints are stock transformers and need no code.
The tokenizer's chat template is set before training (`longalign.data.jinja_template`) and saved with it.
`SelfDescribingCheckpoints` does the same for every `checkpoint-N` the Trainer writes.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from longalign.modeling import configuration_chatglm, modeling_chatglm
from longalign.modeling.weighted_lm import PUBLIC_ARCHITECTURES
from longalign.storage import write_json_atomic

CHATGLM_AUTO_MAP = {
    "AutoConfig": "configuration_chatglm.ChatGLMConfig",
    "AutoModel": "modeling_chatglm.ChatGLMForConditionalGeneration",
    "AutoModelForCausalLM": "modeling_chatglm.ChatGLMForConditionalGeneration",
}
CHATGLM_CODE = (Path(configuration_chatglm.__file__), Path(modeling_chatglm.__file__))


def make_self_describing(folder: str | Path, family: str) -> None:
    """Fix config.json's architectures (and, for ChatGLM, ship the code and auto_map) in place."""
    folder = Path(folder)
    config_file = folder / "config.json"
    config = json.loads(config_file.read_text(encoding="utf-8"))
    config["architectures"] = [PUBLIC_ARCHITECTURES[family]]
    if family == "chatglm":
        for source in CHATGLM_CODE:
            shutil.copyfile(source, folder / source.name)
        config["auto_map"] = dict(CHATGLM_AUTO_MAP)
    write_json_atomic(config_file, config)


class SelfDescribingCheckpoints(TrainerCallback):
    """make_self_describing on each checkpoint-N folder the Trainer saves (world process zero)."""

    def __init__(self, family: str):
        self.family = family

    def on_save(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            folder = Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
            if (folder / "config.json").is_file():
                make_self_describing(folder, self.family)
        return control
