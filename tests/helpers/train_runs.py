"""train.py runs on tiny random models (CPU): checkpoints of both families, learnable sequences and
train files in pre_tokenize / sort_and_group's layout, the argv, one optimizer step with its
gradients and the same step written out from per-sequence runs; and the two module fixtures
(one torch thread, a frozen garbage collector) a test module imports to have them."""
from __future__ import annotations

import gc
import json
import os
import socket
from pathlib import Path

import pytest
import torch

import train
from longalign.constants import IGNORE_INDEX as X
from longalign.modeling.checkpoints import make_self_describing
from longalign.modeling.configuration_chatglm import ChatGLMConfig
from longalign.modeling.loading import load_training_model
from longalign.modeling.modeling_chatglm import ChatGLMForConditionalGeneration
from transformers import LlamaConfig, LlamaForCausalLM

VOCAB = 64
PATTERN = [5, 6, 7, 8]
FAMILIES = ["chatglm", "llama"]


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """One intra-op thread while the module importing it runs (the launched workers get
    OMP_NUM_THREADS=1): on models this small two threads only wait for each other, many times
    slower on a shared CPU. The setting is restored for the modules that follow."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module", autouse=True)
def frozen_gc():
    """The objects alive when the module importing it starts (the imported libraries, mostly) kept
    out of the garbage collector's scans while it runs: every Trainer run calls gc.collect()
    (accelerate's free_memory), each a scan of the whole heap, seconds per run in a test process.
    Objects the tests create are collected as usual; unfrozen again for the modules that follow
    (left alone if something else froze objects first)."""
    if gc.get_freeze_count():
        yield
        return
    gc.freeze()
    yield
    gc.unfreeze()


def free_port() -> int:
    """A port free now, for a launcher's --master_port (no fixed port: the suite may run in parallel)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# ---------- tiny models and datasets ----------
def make_model_dir(path: Path, family: str) -> str:
    """A random-init checkpoint of `family` (public class: stock Llama / the ChatGLM remote code)."""
    torch.manual_seed(0)
    if family == "chatglm":
        config = ChatGLMConfig(num_layers=2, hidden_size=32, ffn_hidden_size=64, kv_channels=8, num_attention_heads=4,
                               multi_query_group_num=2, padded_vocab_size=VOCAB, seq_length=512, pad_token_id=0,
                               rope_ratio=1.0)
        model = ChatGLMForConditionalGeneration(config)
    else:
        config = LlamaConfig(num_hidden_layers=2, hidden_size=32, intermediate_size=64, num_attention_heads=4,
                             num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=512, pad_token_id=0)
        model = LlamaForCausalLM(config)
    model.save_pretrained(path)
    make_self_describing(path, family)
    return str(path)


def make_sequences(n: int, seed: int = 0) -> list[tuple[list[int], list[int]]]:
    """Learnable: a prompt of random tokens, then an answer cycling through PATTERN."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        prompt = torch.randint(3, VOCAB, (int(torch.randint(2, 8, (1,), generator=g)),), generator=g).tolist()
        phase = prompt[-1] % len(PATTERN)
        answer = [PATTERN[(phase + j) % len(PATTERN)] for j in range(int(torch.randint(6, 16, (1,), generator=g)))]
        out.append((prompt + answer, [X] * len(prompt) + answer))
    return out


def save_dataset(rows: dict, path: Path, stats: dict | None = None) -> None:
    import datasets
    datasets.Dataset.from_dict(rows).save_to_disk(str(path))
    if stats is not None:
        (path / "stats.json").write_text(json.dumps(stats))


def make_train_file(path: Path, sequences, group_size: int, per_pack: int = 3) -> str:
    """pre_tokenize-like dir with sort/ and pack/ subdirs (DESIGN.md §1-2), stored order = list order."""
    save_dataset({"input_ids": [s for s, _ in sequences], "labels": [l for _, l in sequences]}, path)
    save_dataset({"input_ids": [s for s, _ in sequences], "labels": [l for _, l in sequences]},
                 path / "sort", {"group_size": group_size})
    packs = {"input_ids": [], "labels": [], "cu_seqlens": []}
    for start in range(0, len(sequences), per_pack):
        members = sequences[start:start + per_pack][: 1 + (start // per_pack) % per_pack]  # 1, 2, 3 members
        packs["input_ids"].append(sum((s for s, _ in members), []))
        packs["labels"].append(sum((l for _, l in members), []))
        packs["cu_seqlens"].append([0] + torch.tensor([len(s) for s, _ in members]).cumsum(0).tolist())
    n_packs = len(packs["input_ids"]) - len(packs["input_ids"]) % group_size
    save_dataset({k: v[:n_packs] for k, v in packs.items()}, path / "pack", {"group_size": group_size})
    return str(path)


def argv_for(model, data, out, method, *extra):
    return ["--model_name_or_path", model, "--train_file", data, "--output_dir", out, "--batch_method", method,
            "--per_device_train_batch_size", "1", "--learning_rate", "2e-2", "--lr_scheduler_type", "cosine",
            "--warmup_steps", "0.03", "--adam_beta2", "0.95", "--weight_decay", "0", "--logging_steps", "1",
            "--save_strategy", "no", "--use_cpu", "--seed", "1", "--dataloader_num_workers", "0",
            "--disable_tqdm", "true", *extra]


# ---------- one optimizer step, and the same step written out ----------
class GradCapture:
    """TrainerCallback recording the summed-over-micro-steps gradients before the optimizer step."""

    def __new__(cls, model):
        from transformers import TrainerCallback

        class _Capture(TrainerCallback):
            grads = None

            def on_pre_optimizer_step(self, args, state, control, **kwargs):
                self.grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
        return _Capture()


def run_one_step(spec: dict, method: str, reduction: str, world: int, *extra: str) -> dict:
    """One optimizer step over the first 4 rows; returns grads, loss, rows seen by this rank."""
    ga = 4 // world
    argv = argv_for(spec["model"], spec["data"], os.path.join(spec["out"], f"{method}_{reduction}_{world}"),
                    method, "--max_steps", "1", "--gradient_accumulation_steps", str(ga),
                    "--loss_reduction", reduction, "--max_grad_norm", "0",
                    *(["--ddp_backend", "gloo"] if world > 1 else []), *extra)
    trainer = train.build_trainer(argv)
    capture = GradCapture(trainer.model)
    trainer.add_callback(capture)
    seen, collate = [], trainer.data_collator
    trainer.data_collator = lambda rows: (seen.extend(r["input_ids"] for r in rows), collate(rows))[1]
    trainer.train()
    loss = [e["loss"] for e in trainer.state.log_history if "loss" in e][0]
    return {"grads": capture.grads, "loss": loss, "seen": seen, "rank": trainer.args.process_index}


def reference_step(model_dir: str, data: str, method: str, reduction: str) -> tuple[float, dict]:
    """The step loss written out from per-sequence token means (model run on each sequence alone)."""
    import datasets
    model = load_training_model(model_dir, dtype=torch.float32)
    rows = datasets.load_from_disk(os.path.join(data, method)).select(range(4))
    packs = []
    for row in rows:
        cu = row.get("cu_seqlens") or [0, len(row["input_ids"])]
        packs.append([(row["input_ids"][a:b], row["labels"][a:b]) for a, b in zip(cu[:-1], cu[1:])])
    terms = []  # (pack index, N_k, mean token loss of sequence k)
    for p, pack in enumerate(packs):
        for ids, labels in pack:
            n = sum(1 for t in labels[1:] if t != X)
            if n:
                out = model(torch.tensor([ids]), labels=torch.tensor([labels]))
                terms.append((p, n, out.loss))
    if reduction == "sequence":
        loss = sum(m for _, _, m in terms) / len(terms)
    elif reduction == "token":
        loss = sum(n * m for _, n, m in terms) / sum(n for _, n, _ in terms)
    else:
        per_pack = [sum(n * m for q, n, m in terms if q == p) / sum(n for q, n, _ in terms if q == p)
                    for p in sorted({q for q, _, _ in terms})]
        loss = sum(per_pack) / len(per_pack)
    loss.backward()
    return loss.item(), {n: p.grad.detach().clone() for n, p in model.named_parameters()}


def relative_error(a: dict, b: dict) -> float:
    diff = torch.sqrt(sum(((a[n] - b[n]) ** 2).sum() for n in b))
    return float(diff / torch.sqrt(sum((b[n] ** 2).sum() for n in b)))
