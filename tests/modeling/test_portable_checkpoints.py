"""Checkpoints train.py saves load anywhere: 2 packed steps per family, then a process that cannot
import this repository loads them with transformers' Auto classes and gets the same logits and
the training prompt from the tokenizer's chat template; the README's loading snippet, run there,
gives exactly the training ids (BOS once)."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from longalign.modeling.loading import load_training_model
from longalign.data.training_format import build_prompt
from longalign.demo.tiny_model import TinyShape, save_tiny_model
from longalign.constants import IGNORE_INDEX
from longalign.data.tokenization import ConversationTokenizer, special_token_frame

REPO = Path(__file__).resolve().parents[2]
SHAPE = TinyShape(hidden=32, layers=2, heads=4, kv_heads=2, intermediate=64, max_positions=256)
PROBE_IDS = [[5, 17, 42, 99, 7, 300, 12, 64, 3, 201, 33]]
HISTORY = [("What is the key?", "The key is 42.")]
QUERY = "And the lock?"
ANSWER = "The lock is open."
README_SECTION = "## Checkpoints that load anywhere"
SYSTEM = "You answer in one sentence."

# Run with `python -I` (no cwd, no PYTHONPATH) in an empty folder; the finder below makes any
# import of this repository's package fail, even through its editable install.
ISOLATED_LOADER = r'''
import importlib.abc, json, sys
class Refuse(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "longalign" or name.startswith("longalign."):
            raise ModuleNotFoundError(f"{name} must not be importable here")
        return None
sys.meta_path.insert(0, Refuse())
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
folder, out = sys.argv[1], sys.argv[2]
model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, dtype=torch.float32).eval()
tokenizer = AutoTokenizer.from_pretrained(folder)
with torch.no_grad():
    logits = model(torch.tensor(json.loads(sys.argv[3]))).logits
messages = json.loads(sys.argv[4])
prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
repo = sys.argv[5]
snippet = {}
exec(sys.argv[6], snippet)  # the README's snippet, on this folder and these messages
once = snippet["inputs"]["input_ids"][0].tolist()
twice = tokenizer(prompt)["input_ids"]  # what the README warns against
text_once = tokenizer(prompt, add_special_tokens=False)["input_ids"]

def from_repo(module):  # a file of the repository, not of the environment's site-packages
    path = str(getattr(module, "__file__", "") or "")
    return path.startswith(repo) and not path.startswith(sys.prefix)

leaked = sorted(n for n, m in sys.modules.items() if n.startswith("longalign") or from_repo(m))
torch.save({"logits": logits, "prompt": prompt, "class": type(model).__name__,
            "module": type(model).__module__, "leaked": leaked, "snippet_ids": once, "twice": twice,
            "text_once": text_once, "answer": snippet["answer"]}, out)
'''


def readme_snippet(folder: Path, messages: list[dict]) -> str:
    """The README's loading snippet, its `folder = ` and `messages = ` lines set to these."""
    text = (REPO / "README.md").read_text(encoding="utf-8")
    block = text[text.index(README_SECTION):].split("```python\n", 1)[1].split("```", 1)[0]
    lines = block.splitlines()
    assigned = {"folder": repr(str(folder)), "messages": repr(messages)}
    for i, line in enumerate(lines):
        name = line.split(" = ", 1)[0]
        if name in assigned:
            lines[i] = f"{name} = {assigned.pop(name)}"
    assert not assigned, f"the README snippet no longer assigns {sorted(assigned)}"
    return "\n".join(lines)


def training_prompt_ids(tokenizer, family: str, system: str | None) -> list[int]:
    """The ids training reads before the last answer of system + HISTORY + (QUERY, ANSWER)."""
    [encoded] = ConversationTokenizer(tokenizer, family).encode_batch([HISTORY + [(QUERY, ANSWER)]], [system])
    labels = encoded.labels
    last_reply = max(i for i in range(1, len(labels)) if labels[i] != IGNORE_INDEX and labels[i - 1] == IGNORE_INDEX)
    return encoded.ids[:last_reply]


def _pack_dataset(path: Path, vocab: int) -> None:
    """A pre_tokenize-like folder with pack/ (4 packs of 2-3 sequences, group size 1)."""
    import datasets

    g = torch.Generator().manual_seed(0)
    rows = {"input_ids": [], "labels": [], "cu_seqlens": []}
    for n_seqs in (2, 3, 2, 3):
        lengths = torch.randint(6, 14, (n_seqs,), generator=g).tolist()
        ids = torch.randint(3, vocab, (sum(lengths),), generator=g).tolist()
        labels = list(ids)
        start = 0
        for n in lengths:  # a 3-token prompt per sequence
            labels[start:start + 3] = [-100] * 3
            start += n
        rows["input_ids"].append(ids)
        rows["labels"].append(labels)
        rows["cu_seqlens"].append([0] + torch.tensor(lengths).cumsum(0).tolist())
    datasets.Dataset.from_dict(rows).save_to_disk(str(path / "pack"))
    (path / "pack" / "stats.json").write_text(json.dumps({"group_size": 1}))


@pytest.mark.subprocess
@pytest.mark.parametrize("family", ["llama", "chatglm"])
def test_trained_checkpoint_loads_without_this_repository(family, tiny_tokenizer_dir, tiny_tokenizer, tmp_path):
    import train

    init = save_tiny_model(family, tiny_tokenizer_dir, tmp_path / "init", SHAPE)["out"]
    _pack_dataset(tmp_path / "data", len(tiny_tokenizer))
    out = tmp_path / "trained"
    train.main(["--model_name_or_path", init, "--train_file", str(tmp_path / "data"), "--output_dir", str(out),
                "--batch_method", "pack", "--pack_loss", "--max_steps", "2", "--per_device_train_batch_size", "1",
                "--learning_rate", "1e-2", "--save_strategy", "no", "--use_cpu", "--report_to", "none",
                "--disable_tqdm", "true"])  # train.py's own main, here: the loading below is the other process

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    # a system turn where the tiny tokenizer can encode it as training does (ChatGLM3's needs its
    # <|system|> token, which the tiny tokenizer lacks; test_chat_template covers its rendering)
    system = SYSTEM if family == "llama" else None
    messages = [{"role": "system", "content": system}] if system else []
    messages += [{"role": r, "content": c} for q, a in HISTORY for r, c in (("user", q), ("assistant", a))]
    messages.append({"role": "user", "content": QUERY})
    env = {"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "hf_modules"),
           "HOME": str(tmp_path)}
    loaded = subprocess.run([sys.executable, "-I", "-c", ISOLATED_LOADER, str(out), str(tmp_path / "isolated.pt"),
                             json.dumps(PROBE_IDS), json.dumps(messages), str(REPO), readme_snippet(out, messages)],
                            cwd=elsewhere, env=env, capture_output=True, text=True, timeout=300)
    assert loaded.returncode == 0, loaded.stderr[-4000:]
    isolated = torch.load(tmp_path / "isolated.pt")
    assert isolated["leaked"] == []
    public = {"llama": "LlamaForCausalLM", "chatglm": "ChatGLMForConditionalGeneration"}[family]
    assert isolated["class"] == public
    assert isolated["module"].startswith("transformers.models.llama" if family == "llama" else "transformers_modules.")

    ours = load_training_model(out, dtype=torch.float32).eval()
    with torch.no_grad():
        in_repo = ours(torch.tensor(PROBE_IDS)).logits
    assert (isolated["logits"] - in_repo).abs().max().item() <= 1e-5

    prefix_ids, _ = special_token_frame(tiny_tokenizer)
    prefix = "".join(tiny_tokenizer.convert_ids_to_tokens(prefix_ids))
    assert isolated["prompt"] == prefix + build_prompt(family, HISTORY, QUERY, system)
    # the README's snippet tokenizes once: the training ids, the special prefix (BOS) once
    assert isolated["snippet_ids"] == isolated["text_once"] == training_prompt_ids(tiny_tokenizer, family, system)
    assert prefix_ids and isolated["snippet_ids"][:len(prefix_ids)] == prefix_ids
    assert isolated["snippet_ids"].count(prefix_ids[0]) == 1 and isolated["twice"].count(prefix_ids[0]) == 2
    assert isinstance(isolated["answer"], str)
