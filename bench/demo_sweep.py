"""Design search for the offline demo: which data mix, tokenizer, model and schedule learn retrieval.

    python bench/demo_sweep.py --configs bench/measured/h200_session7/sweep4_configs.json --out sweep.jsonl --parallel 8

Each config (a JSON object; keys and defaults in `DEFAULTS`) generates its own demo data
(`longalign.demo.data`, the config's short-task mix and vocabulary), trains a tiny random Llama on
it with the demo's loss (packs of `max_tokens` tokens, 1/N_k weights, AdamW, cosine) for `tokens`
training tokens, and every `eval_every` steps scores, by teacher forcing (exact == greedy exact
match): the held-out retrieval examples of `longalign.demo.evaluation` at `context` tokens, and the
needle test's own needle and question (San Francisco, read from Needle_test/config-prompt.yaml)
in the demo's held-out haystack at Needle_test/demo.sh's 4 lengths x 5 depths.
One JSON line per evaluation goes to --out. This is the loop the demo's settings were chosen with;
the demo itself trains with train.py (scripts/demo.sh).
"""
from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import random
import statistics
import tempfile
import time
from pathlib import Path

DEFAULTS = {"name": "base", "seed": 0, "data_seed": 1234, "vocab": 1024, "alphabet": "bytes", "mix": "base",
            "num_long": 1200, "num_short": 1200, "long_words": [150, 1600],
            "hidden": 128, "layers": 2, "heads": 4, "kv_heads": 2, "intermediate": 256, "tie": True,
            "attn_bias": False, "rope_theta": 10000.0,
            "lr": 3e-3, "warmup": 20, "tokens": 1_600_000, "max_tokens": 2304, "eval_every": 200,
            "context": 2048, "eval_per_task": 16, "device": "cuda", "threads": 2}
NEEDLE_CONFIG = Path(__file__).resolve().parents[1] / "Needle_test" / "config-prompt.yaml"
NEEDLE_LENGTHS = (256, 853, 1450, 2048)
NEEDLE_DEPTHS = (0.0, 25.0, 50.0, 75.0, 100.0)
NEEDLE_BUFFER = 100
EVAL_SHORT_CHATS = 24
EVAL_PACK_TOKENS = 4096  # teacher-forced scoring packs (each held-out row is scored as if alone)
EXPECTED_PACK_FILL = 0.97  # steps = tokens / (this x max_tokens); shuffled greedy packs fill less, so
#                            each line reports the tokens actually trained
MAX_POSITIONS = 8192


def short_topics(mix: str):
    from longalign.demo import data as D
    return D.SHORT_MIXES[mix]


def make_data(cfg: dict, tmp: str):
    from longalign.demo import data as D
    from longalign.demo.tiny_tokenizer import train_tiny_tokenizer
    rng = random.Random(cfg["data_seed"])
    long_rows = D.generate_long(rng, cfg["num_long"], tuple(cfg["long_words"]))
    short_rows = D.generate_short(rng, cfg["num_short"], short_topics(cfg["mix"]))
    tok = train_tiny_tokenizer(D.tokenizer_corpus(long_rows + short_rows), tmp, cfg["vocab"], cfg["alphabet"])
    return tok, long_rows, short_rows


def needle_and_question() -> tuple[str, str]:
    """The needle test's own needle (with its surrounding newlines) and retrieval question."""
    from longalign.eval.needle_test.config import PROMPT_SCHEMA, load_config
    prompt = load_config(NEEDLE_CONFIG, PROMPT_SCHEMA)["prompt"]
    return prompt["needle"], prompt["retrieval_question"]


def eval_sets(cfg: dict, tok, enc, training_texts: list[str]) -> tuple[dict, dict]:
    """(rows per evaluation set, disjointness report). A held-out retrieval example or San
    Francisco prompt that overlaps the training messages is an error (`demo_eval.check_disjoint`);
    held-out short chats seen in training are counted (the formulaic ones can recur)."""
    from longalign.demo import data as D
    from longalign.demo.tasks import LONG_TASKS
    from longalign.demo.evaluation import RetrievalExample, check_disjoint, held_out_examples, held_out_seed
    from longalign.eval.needle_test.needle import haystack_ids, make_prompt, sentence_end_patterns
    examples = held_out_examples(tok, cfg["context"], cfg["eval_per_task"], held_out_seed(cfg["data_seed"]))
    needle, question = needle_and_question()
    hay = haystack_ids(tok, "\n\n".join(D.generate_haystack(cfg["data_seed"])), max(NEEDLE_LENGTHS))
    ends = sentence_end_patterns(tok)
    needles = [RetrievalExample("sf_needle", record["prompt"], needle.strip(), record["prompt_tokens"])
               for record in (make_prompt(tok, hay, needle, question, n, d, NEEDLE_BUFFER, ends)
                              for n in NEEDLE_LENGTHS for d in NEEDLE_DEPTHS)]
    disjoint = check_disjoint(examples + needles, training_texts)
    sets = {task: [e for e in examples + needles if e.task == task] for task in (*LONG_TASKS, "sf_needle")}
    sets = {task: [(c.ids, c.labels) for c in enc.encode_batch([[(e.query, e.answer)] for e in rows])]
            for task, rows in sets.items()}
    short = [D.rounds_of(r) for r in D.generate_short(random.Random(held_out_seed(cfg["data_seed"])),
                                                      EVAL_SHORT_CHATS, short_topics(cfg["mix"]))]
    seen = set(training_texts)
    disjoint["short_seen_in_training"] = sum(any(u in seen and a in seen for u, a in r) for r in short)
    sets["short"] = [(c.ids, c.labels) for c in enc.encode_batch(short)]
    return sets, disjoint


def evaluate(model, sets, max_tokens):
    from longalign.demo.evaluation import teacher_forced_scores
    model.eval()
    out = {}
    for key, rows in sets.items():
        scores = teacher_forced_scores(model, rows, max_tokens)
        out[key] = {"exact": statistics.fmean(s["exact"] for s in scores),
                    "loss": round(statistics.fmean(s["loss"] for s in scores), 3)}
    model.train()
    return out


def run(cfg: dict) -> list[dict]:
    """One config's training and evaluations (an error is printed with its config, not raised)."""
    import traceback
    try:
        return train_and_evaluate(cfg)
    except Exception:  # noqa: BLE001 -- a sweep records a failed config in --out and goes on
        failure = {"name": cfg.get("name"), "error": traceback.format_exc()}
        print(f"[demo_sweep] {failure['name']} failed:\n{failure['error']}", flush=True)
        write_line(cfg, failure)
        return [failure]


def write_line(cfg: dict, line: dict) -> None:
    if cfg.get("out"):
        with open(cfg["out"], "a") as out:  # one line per write: parallel runs share the file
            out.write(json.dumps(line) + "\n")


def prepare(cfg: dict):
    """(tokenizer, training rows as (ids, labels) cut to max_tokens, evaluation sets, disjointness)."""
    from longalign.demo.data import rounds_of
    from longalign.data.tokenization import ConversationTokenizer
    with tempfile.TemporaryDirectory() as tmp:
        tok, long_rows, short_rows = make_data(cfg, tmp)
        enc = ConversationTokenizer(tok, "llama")
        data = [(c.ids[:cfg["max_tokens"]], c.labels[:cfg["max_tokens"]])
                for c in enc.encode_batch([rounds_of(r) for r in long_rows + short_rows])]
        texts = [m["content"] for row in long_rows + short_rows for m in row["messages"]]
        return (tok, data, *eval_sets(cfg, tok, enc, texts))


def build_model(cfg: dict, tok):
    from transformers import LlamaConfig

    from longalign.modeling.loading import TRAINING_CLASSES, register_packed_attention
    from longalign.modeling.packed_attention import ATTN_IMPLEMENTATION
    from longalign.demo.tiny_model import special_ids
    register_packed_attention()
    config = LlamaConfig(vocab_size=len(tok), hidden_size=cfg["hidden"], intermediate_size=cfg["intermediate"],
                         num_hidden_layers=cfg["layers"], num_attention_heads=cfg["heads"],
                         num_key_value_heads=cfg["kv_heads"], max_position_embeddings=MAX_POSITIONS,
                         tie_word_embeddings=cfg["tie"], attention_bias=cfg["attn_bias"],
                         rope_parameters={"rope_type": "default", "rope_theta": cfg["rope_theta"]},
                         attn_implementation=ATTN_IMPLEMENTATION, **special_ids(tok))
    return TRAINING_CLASSES["llama"](config)


def endless_packs(data, max_tokens: int, rng: random.Random):
    """Row indices of each pack: every epoch a new shuffle, packed greedily (the paper's walk)."""
    from longalign.data.packing import greedy_pack
    while True:
        order = list(range(len(data)))
        rng.shuffle(order)
        for members in greedy_pack([len(data[i][0]) for i in order], max_tokens):
            yield [order[i] for i in members]


def pack_batch(collator, data, members: list[int]) -> dict:
    import numpy as np

    from longalign.train.collators import COUNTS_KEY
    from longalign.pack_geometry import cu_seqlens_values
    cu = cu_seqlens_values(np.array([len(data[i][0]) for i in members]), np.array([len(members)]))
    batch = collator([{"input_ids": [t for i in members for t in data[i][0]],
                       "labels": [t for i in members for t in data[i][1]], "cu_seqlens": cu.tolist()}])
    batch.pop(COUNTS_KEY, None)
    return batch


def train_and_evaluate(cfg: dict) -> list[dict]:
    import torch

    from longalign.train.collators import PackCollator
    cfg = {**DEFAULTS, **cfg}
    torch.set_num_threads(cfg["threads"])
    device = torch.device(cfg["device"] if torch.cuda.is_available() else "cpu")
    lines, started = [], time.time()
    tok, data, sets, disjoint = prepare(cfg)
    data_tokens = sum(len(ids) for ids, _ in data)
    torch.manual_seed(cfg["seed"])
    model = build_model(cfg, tok).to(device)
    steps = max(1, round(cfg["tokens"] / (EXPECTED_PACK_FILL * cfg["max_tokens"])))
    opt = torch.optim.AdamW(model.parameters(), lr=cfg["lr"], weight_decay=0.0, betas=(0.9, 0.95))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / cfg["warmup"])
                                              * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    collator, packs = PackCollator("sequence"), endless_packs(data, cfg["max_tokens"], random.Random(cfg["seed"]))
    trained, train_seconds = 0, 0.0
    for step in range(1, steps + 1):
        step_started, members = time.time(), next(packs)
        batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v
                 for k, v in pack_batch(collator, data, members).items()}
        loss = model(**batch, loss_aggregation="sum").loss / len(members)  # Eq. 2 over this pack
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        trained += batch["input_ids"].numel()
        if device.type == "cuda":
            torch.cuda.synchronize()
        train_seconds += time.time() - step_started
        if step % cfg["eval_every"] == 0 or step == steps:
            line = {"name": cfg["name"], "step": step, "steps": steps, "tokens": trained, "loss": round(loss.item(), 3),
                    "seconds": round(time.time() - started, 1), "train_seconds": round(train_seconds, 1),
                    "data_tokens": data_tokens, "disjoint": disjoint, **evaluate(model, sets, EVAL_PACK_TOKENS)}
            print(json.dumps(line), flush=True)
            lines.append(line)
            write_line(cfg, line)
    return lines


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", required=True, help="JSON list of config objects")
    parser.add_argument("--out", required=True)
    parser.add_argument("--parallel", type=int, default=1)
    args = parser.parse_args(argv)
    with open(args.configs) as f:
        configs = json.load(f)
    open(args.out, "w").close()
    configs = [{**c, "out": args.out} for c in configs]
    with mp.get_context("spawn").Pool(args.parallel) as pool:
        results = list(pool.imap_unordered(run, configs))
    failed = [lines[0]["name"] for lines in results if lines and "error" in lines[0]]
    print(f"[demo_sweep] {len(configs) - len(failed)} of {len(configs)} configs ran -> {args.out}"
          + (f"; failed: {failed}" if failed else ""))
    if failed:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
