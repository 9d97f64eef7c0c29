"""Pretrain the demo's tiny base: a small Llama, plain LM loss on every token, short context.

    python -m longalign.demo.pretrain --out models/tiny-base [--steps 3000 --context 512 ...]

LongAlign aligns a pretrained base; it never trains from scratch. This makes the miniature's base:
generated text rich in repetition (`longalign.demo.corpus`) -> a byte-level BPE trained on it (and
on both chat templates' literal pieces, so they are tokens, as in a real tokenizer) -> a tiny
Llama trained with the ordinary next-token loss over `--context`-token windows of the document
stream -> the held-out measures of `longalign.demo.base_eval` at that context -> `--out`:
safetensors weights, config, tokenizer, stats.json and a model card (README.md). Same seed and
device, same weights. On CUDA it runs in bf16 autocast; on CPU in fp32 (slow: see the card).
"""
from __future__ import annotations

import argparse
import json
import math
import platform
import time
from dataclasses import asdict, dataclass
from datetime import date
from pathlib import Path

from longalign.demo.base_eval import copy_probes, copy_token_accuracy, evaluate_base
from longalign.demo.card import write_card
from longalign.demo.corpus import DOCUMENT_MIX, documents, parse_mix, soup_documents, vocabulary_pieces
from longalign.modeling.checkpoints import make_self_describing
from longalign.storage import atomic_dir, write_json_atomic
from longalign.data.training_format import conversation_text
from longalign.demo.tiny_model import TinyShape, build_model, special_ids
from longalign.demo.tiny_tokenizer import train_tiny_tokenizer

HELD_OUT_SEED_OFFSET = 1_000_003  # the card's held-out documents: the seed + this
TOKENIZER_DOCS = 20_000  # documents the BPE is trained on
TEMPLATE_PIECES = [("Hello.", "Hi."), ("Next?", "Done.")]  # rendered in both chat templates for the BPE


@dataclass
class PretrainConfig:
    seed: int = 0
    context: int = 512  # tokens per training window: the base's context length
    steps: int = 3000
    batch: int = 32  # windows per step
    lr: float = 2e-3
    warmup: int = 100
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    vocab: int = 1024
    hidden: int = 128
    layers: int = 4
    heads: int = 4
    kv_heads: int = 4
    intermediate: int = 384
    max_words: int = 300  # filler words per document at most (documents vary 10..this)
    documents: int = 0  # documents generated (0: about one pass of the training steps; fewer: windows recur)
    eval_examples: int = 100
    probe_every: int = 0  # steps between copy-token-accuracy probes in the loss log (0: none)
    probe_examples: int = 20  # held-out copy examples per probe
    time_limit: float = 0.0  # seconds of training after which it stops early (0: none); the card says so
    soup: float = 0.0  # share of token-soup documents (corpus.soup_documents) added after the tokenizer is made
    soup_alphabet: int = 0  # > 0: each soup span from its own alphabet of at least this many pieces (0: all)
    short_context: int = 0  # the first short_steps steps read windows of this many tokens (0: none) ...
    short_steps: int = 0  # ... as many tokens a step (random-token copying formed sooner at 64 than at 256;
    # on the demo's corpus it did not: BENCHMARKS §12c)
    mix: str = ",".join(f"{kind}:{share}" for kind, share in DOCUMENT_MIX.items())  # document kinds (corpus)

    def shape(self) -> TinyShape:
        return TinyShape(hidden=self.hidden, layers=self.layers, heads=self.heads, kv_heads=self.kv_heads,
                         intermediate=self.intermediate, max_positions=self.context, tie_embeddings=True)


def token_windows(tokenizer, texts: list[str], context: int):
    """The documents as one stream (each BOS ... EOS) cut into `context`-token rows (a LongTensor)."""
    import numpy as np
    import torch

    eos = np.array([tokenizer.eos_token_id])
    encodings = tokenizer.backend_tokenizer.encode_batch(texts)  # each starts with BOS (the post-processor)
    stream = np.concatenate([part for e in encodings for part in (np.array(e.ids), eos)])
    rows = len(stream) // context
    return torch.from_numpy(stream[: rows * context].astype(np.int64)).view(rows, context)


def learning_rate(step: int, config: PretrainConfig) -> float:
    """Linear warmup, then cosine decay to min_lr_ratio of the peak."""
    if step < config.warmup:
        return config.lr * (step + 1) / config.warmup
    progress = (step - config.warmup) / max(1, config.steps - config.warmup)
    return config.lr * (config.min_lr_ratio + (1 - config.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def phase_batches(config: PretrainConfig) -> list[tuple[int, int, int]]:
    """(context, windows per step, last step) of each phase: the short-context phase first, if any,
    at as many tokens a step as the main one (context 256, batch 4, short 64 for 100 of 300 steps:
    [(64, 16, 100), (256, 4, 300)])."""
    phases = []
    if config.short_context and config.short_steps:
        phases.append((config.short_context, max(1, config.batch * config.context // config.short_context),
                       config.short_steps))
    return phases + [(config.context, config.batch, config.steps)]


def train(model, windows: dict, config: PretrainConfig, device, log_every: int = 100, probe=None) -> list[dict]:
    """The plain LM loop over random batches of `windows` ({context: rows}, phases by `phase_batches`);
    returns the logged losses (and, every `config.probe_every` steps, `probe(model)` as
    copy_token_accuracy)."""
    import torch

    generator = torch.Generator().manual_seed(config.seed)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    rest = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": config.weight_decay},
                                   {"params": rest, "weight_decay": 0.0}], lr=config.lr, betas=(0.9, 0.95))
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    log, started, tokens = [], time.perf_counter(), 0
    phases = phase_batches(config)
    model.train()
    for step in range(config.steps):
        context, batch_size, _ = next(phase for phase in phases if step < phase[2])
        if config.time_limit and time.perf_counter() - started > config.time_limit:
            print(f"[pretrain] --time_limit {config.time_limit:g} s reached: stopped after {step} steps", flush=True)
            break
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, config)
        rows = windows[context]
        batch = rows[torch.randint(len(rows), (batch_size,), generator=generator)].to(device)
        tokens += batch.numel()
        with autocast:
            loss = model(input_ids=batch, labels=batch).loss
        if not torch.isfinite(loss):
            raise FloatingPointError(f"non-finite loss {loss.item()} at step {step + 1}")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        if probe is not None and config.probe_every and (step + 1) % config.probe_every == 0:
            model.eval()
            accuracy = probe(model)
            model.train()
            log.append({"step": step + 1, "copy_token_accuracy": round(accuracy, 4)})
            print(f"[pretrain] step {step + 1} copy token accuracy {accuracy:.3f}", flush=True)
        if (step + 1) % log_every == 0 or step + 1 == config.steps or (
                config.time_limit and time.perf_counter() - started > config.time_limit):
            log.append({"step": step + 1, "loss": round(loss.item(), 4), "context": context, "tokens": tokens,
                        "seconds": round(time.perf_counter() - started, 1)})
            print(f"[pretrain] step {step + 1}/{config.steps} loss {loss.item():.3f} "
                  f"({time.perf_counter() - started:.0f} s)", flush=True)
    model.eval()
    return log


def documents_for_one_pass(config: PretrainConfig) -> int:
    """About as many documents as the training steps read once (mean document ~0.7 max_words words,
    ~1.3 tokens a word)."""
    words_per_doc = config.max_words / 2 * 1.4
    return int(config.steps * config.batch * config.context / words_per_doc / 1.3) + 1


def tokenizer_texts(docs: list[str]) -> list[str]:
    templates = [conversation_text(family, TEMPLATE_PIECES) for family in ("llama", "chatglm")]
    return docs[:TOKENIZER_DOCS] + templates


def pretrain(out_dir: str | Path, config: PretrainConfig, device_name: str | None = None) -> dict:
    """Make the base end to end into `out_dir` (replaced atomically); return its stats."""
    import torch

    device = torch.device(device_name or ("cuda" if torch.cuda.is_available() else "cpu"))
    started = time.perf_counter()
    torch.manual_seed(config.seed)
    count = config.documents or documents_for_one_pass(config)
    mix = parse_mix(config.mix)
    docs = documents(config.seed, count, config.max_words, mix)
    with atomic_dir(out_dir, stage="demo_pretrain", overwrite=True) as tmp:
        tokenizer = train_tiny_tokenizer(tokenizer_texts(docs), tmp, config.vocab)
        if config.soup:
            docs = docs + soup_documents(config.seed + 1, int(count * config.soup / (1 - config.soup)),
                                         vocabulary_pieces(tokenizer), config.soup_alphabet)
        windows = {context: token_windows(tokenizer, docs, context) for context, _, _ in phase_batches(config)}
        data_seconds = time.perf_counter() - started
        model = build_model("llama", len(tokenizer), special_ids(tokenizer), config.shape()).to(device)
        probe = None
        if config.probe_every:  # tokenized once, only when asked for
            probes = copy_probes(tokenizer, config.seed + HELD_OUT_SEED_OFFSET, config.context, config.probe_examples)
            probe = lambda m: copy_token_accuracy(m, probes)  # noqa: E731
        log = train(model, windows, config, device, probe=probe)
        train_seconds = time.perf_counter() - started - data_seconds
        measured = evaluate_base(model, tokenizer, config.seed + HELD_OUT_SEED_OFFSET, config.context,
                                 config.eval_examples)
        model.to("cpu").save_pretrained(str(tmp))
        make_self_describing(tmp, "llama")
        stats = {"config": asdict(config), "device": torch.cuda.get_device_name(device) if device.type == "cuda"
                 else f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
                 "date": date.today().isoformat(), "documents": len(docs), "document_mix": mix,
                 "soup_documents": len(docs) - count,
                 "windows": {str(context): len(rows) for context, rows in windows.items()},
                 "steps_trained": log[-1]["step"], "tokens_trained": log[-1]["tokens"],
                 "parameters": sum(p.numel() for p in model.parameters()), "vocab_size": len(tokenizer),
                 "data_seconds": round(data_seconds, 1), "train_seconds": round(train_seconds, 1),
                 "loss_log": log, "held_out": measured}
        write_json_atomic(tmp / "stats.json", stats)
        write_card(tmp / "README.md", stats)
    return stats


def parse_args(argv=None) -> tuple[str, PretrainConfig, str | None]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="output directory (replaced whole)")
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    for key, value in asdict(PretrainConfig()).items():
        parser.add_argument(f"--{key}", type=type(value), default=value)
    args = parser.parse_args(argv)
    config = PretrainConfig(**{k: getattr(args, k) for k in asdict(PretrainConfig())})
    try:
        parse_mix(config.mix)
    except ValueError as err:
        parser.error(f"--mix: {err}")
    if not 0 <= config.soup < 1:
        parser.error(f"--soup is a share in [0, 1), got {config.soup}")
    for key, value in asdict(config).items():
        if isinstance(value, str):
            continue
        if value < 0 or (value == 0 and key not in ("seed", "warmup", "weight_decay", "min_lr_ratio", "time_limit", "probe_every", "documents", "short_context", "short_steps", "soup", "soup_alphabet")):
            parser.error(f"--{key} must be {'>= 0' if key == 'seed' else '> 0'}, got {value}")
    if config.short_steps and not 0 < config.short_context < config.context:
        parser.error(f"--short_context must be in (0, --context {config.context}) with --short_steps, got {config.short_context}")
    if config.short_steps > config.steps:
        parser.error(f"--short_steps {config.short_steps} exceeds --steps {config.steps}")
    try:
        config.shape().check("llama")
    except ValueError as err:
        parser.error(str(err))
    return args.out, config, args.device


def main(argv=None) -> dict:
    out, config, device = parse_args(argv)
    stats = pretrain(out, config, device)
    print(json.dumps({"out": out, "held_out": stats["held_out"], "train_seconds": stats["train_seconds"]}))
    return stats


if __name__ == "__main__":
    main()
