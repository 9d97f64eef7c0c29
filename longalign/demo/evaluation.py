"""Held-out retrieval accuracy of a demo model: exact match under greedy decoding.

    python -m longalign.demo.evaluation --model data/demo/model --raw data/demo/raw \
        --out data/demo/eval/trained.json [--context_tokens 2048 --per_task 20 --seed 5678]

Examples come from the long-task generators of `longalign.demo.tasks` (needle retrieval, key-value
lookup, other facts) and, under "unseen_kind", from its held-out task (a wording and a kind of
value never trained on), with a seed of their own (`held_out_seed`: never the training seed). Each one is sized in
tokens of the model's tokenizer: its query (document + question) has at most --context_tokens
tokens and at least `1 - SIZE_TOLERANCE` of that (`size_window`). Before anything is scored,
every example is checked disjoint from the training data in --raw: neither its query nor its reference answer
occurs in any message of long.jsonl or sharegpt.jsonl (an overlap is an error, not a count).

Scoring: the reply is generated greedily (`model.generate`, do_sample=False, through
`longalign.generation.LocalModel.respond`: the model's chat format, its EOS ends the reply) with at
most answer tokens + EXTRA_NEW_TOKENS new tokens; it is correct when, stripped of special tokens and surrounding whitespace, it equals the
reference answer exactly.

Short tasks (--short_examples, default 20): the first round of held-out chats of the training
data's short-task mix (stats.json `short_mix`, `longalign.demo.data.SHORT_MIXES`), same seed,
scored the same way. A round whose question or answer is a training message is skipped and
counted (formulaic rounds recur), never scored.

Output JSON: accuracy, per task {correct, total, accuracy}, the settings, the disjointness check
and every example's prediction; under "short" the same for the short tasks.
"""
from __future__ import annotations

import argparse
import json
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

from longalign.train.collators import COUNTS_KEY, PackCollator
from longalign.constants import IGNORE_INDEX
from longalign.demo.tasks import ALL_TASKS, HELD_OUT_TASKS, LONG_TASKS
from longalign.demo.data import DEFAULT_MIX, DEFAULT_SEED, SHORT_MIXES
from longalign.eval.generation import GenerationSettings, LocalModel, encode_text
from longalign.ops.weighted_loss import shift_targets
from longalign.pack_geometry import cu_seqlens_values, segment_ids
from longalign.data.packing import greedy_pack
from longalign.storage import write_json_atomic

EVAL_SEED_OFFSET = 4444  # held-out examples: the data seed + this
DEFAULT_CONTEXT_TOKENS = 2048
DEFAULT_PER_TASK = 20
DEFAULT_SHORT_EXAMPLES = 20
SHORT_ATTEMPTS_PER_EXAMPLE = 10  # candidates drawn per wanted short example before giving up
EXTRA_NEW_TOKENS = 4  # generation may run this far past the reference length (a longer reply is wrong)
SIZE_TOLERANCE = 0.1  # a sized query has between (1 - this) x and 1 x the requested tokens ...
MIN_SIZE_SLACK = 40  # ... or at least this many tokens of slack (a filler sentence is ~14 tokens)
SIZING_ATTEMPTS = 16  # bisection steps over the filler word count
FIRST_GUESS_TOKENS_PER_WORD = 1.5
TRAINING_FILES = ("long.jsonl", "sharegpt.jsonl")


def held_out_seed(data_seed: int = DEFAULT_SEED) -> int:
    return data_seed + EVAL_SEED_OFFSET


@dataclass
class RetrievalExample:
    task: str
    query: str
    answer: str
    query_tokens: int


def size_window(context_tokens: int) -> tuple[int, int]:
    """(fewest, most) query tokens a sized example may have."""
    slack = max(int(SIZE_TOLERANCE * context_tokens), MIN_SIZE_SLACK)
    return max(1, context_tokens - slack), context_tokens


def sized_example(task: str, seed: str, tokenizer, context_tokens: int) -> RetrievalExample:
    """One `task` example whose query has a token count in `size_window(context_tokens)`.

    Bisects the filler word count; every attempt draws from `random.Random(seed)`, so the same
    seed gives the same example.
    """
    low, high = size_window(context_tokens)
    fewest, most = 1, max(2, int(2 * context_tokens / FIRST_GUESS_TOKENS_PER_WORD))
    tokens = words = 0
    for _ in range(SIZING_ATTEMPTS):
        words = (fewest + most) // 2
        query, answer = ALL_TASKS[task](random.Random(seed), words)
        tokens = len(encode_text(tokenizer, query))
        if low <= tokens <= high:
            return RetrievalExample(task, query, answer, tokens)
        if tokens > high:
            most = words - 1
        else:
            fewest = words + 1
        if fewest > most:
            break
    raise ValueError(f"could not size a {task} example to {low}-{high} query tokens "
                     f"(last try: {tokens} tokens from {words} filler words)")


def held_out_examples(tokenizer, context_tokens: int, per_task: int, seed: int,
                      tasks: Sequence[str] = tuple(LONG_TASKS)) -> list[RetrievalExample]:
    """`per_task` sized examples of each task, seeded by (seed, task, index)."""
    unknown = set(tasks) - set(ALL_TASKS)
    if unknown:
        raise ValueError(f"unknown tasks {sorted(unknown)}; known: {sorted(ALL_TASKS)}")
    return [sized_example(task, f"{seed}-{task}-{index}", tokenizer, context_tokens)
            for task in tasks for index in range(per_task)]


def held_out_short_examples(tokenizer, mix: str, count: int, seed: int,
                            texts: Sequence[str]) -> tuple[list[RetrievalExample], int]:
    """(`count` first rounds of `mix`'s short chats drawn from `seed` that are not training
    messages, how many candidates were skipped because their question or answer is one)."""
    topics, rng, seen = SHORT_MIXES[mix], random.Random(seed), set(texts)
    examples, skipped = [], 0
    for index in range(count * SHORT_ATTEMPTS_PER_EXAMPLE):
        if len(examples) == count:
            break
        question, answer = topics[index % len(topics)](rng)[0]
        if question in seen or answer in seen:
            skipped += 1
            continue
        examples.append(RetrievalExample("short", question, answer, len(encode_text(tokenizer, question))))
    if len(examples) < count:
        raise ValueError(f"only {len(examples)} of {count} held-out short examples are not training messages")
    return examples, skipped


def training_texts(raw_dir: str | Path) -> list[str]:
    """Every message content of the demo's training files."""
    texts = []
    for file_name in TRAINING_FILES:
        with open(Path(raw_dir) / file_name, encoding="utf-8") as f:
            texts += [m["content"] for line in f if line.strip() for m in json.loads(line)["messages"]]
    return texts


def check_disjoint(examples: Iterable[RetrievalExample], texts: Sequence[str]) -> dict:
    """Raise ValueError if a query or an answer of `examples` occurs in `texts`; else the counts.

    A query must not equal a training message; an answer must not occur inside one (so a
    held-out needle sentence or key-value line was never seen, even inside a long document).
    """
    examples = list(examples)
    corpus = "\x00".join(texts)
    seen = set(texts)
    overlaps = [e.answer for e in examples if e.query in seen or e.answer in corpus]
    if overlaps:
        raise ValueError(f"{len(overlaps)} held-out examples overlap the training data, e.g. {overlaps[0]!r}")
    return {"examples": len(examples), "training_messages": len(texts), "overlaps": 0}


def score_examples(candidate, examples: Sequence[RetrievalExample]) -> dict:
    """Greedy replies of `candidate` (a longalign.generation Candidate) and exact-match accuracy,
    overall and per task."""
    per_task: dict[str, dict] = {}
    records = []
    for example in examples:
        budget = len(encode_text(candidate.tokenizer, example.answer)) + EXTRA_NEW_TOKENS
        settings = GenerationSettings(max_new_tokens=budget, temperature=0.0)
        reply = candidate.respond(example.query, settings)["response"].strip()
        correct = reply == example.answer
        counts = per_task.setdefault(example.task, {"correct": 0, "total": 0})
        counts["correct"] += int(correct)
        counts["total"] += 1
        records.append({"task": example.task, "query_tokens": example.query_tokens,
                        "answer": example.answer, "prediction": reply, "correct": correct})
    for counts in per_task.values():
        counts["accuracy"] = counts["correct"] / counts["total"]
    total = sum(c["total"] for c in per_task.values())
    accuracy = sum(c["correct"] for c in per_task.values()) / total if total else None
    return {"accuracy": accuracy, "per_task": per_task, "examples": records}


def teacher_forced_scores(model, rows: Sequence[tuple[list[int], list[int]]], max_tokens: int) -> list[dict]:
    """Per row (input_ids, labels as pre_tokenize makes them): {"exact", "loss", "targets"}.

    exact: every target token (each reply and its closing token) is the model's argmax given the
    reference prefix, which is exactly when greedy decoding reproduces the reference token for
    token; loss: the row's mean target-token cross-entropy. Rows run packed (PackCollator,
    block-diagonal attention), up to `max_tokens` tokens per forward, so each is scored as alone.
    """
    import numpy as np
    import torch

    device = next(model.parameters()).device
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    results: list[dict] = [{} for _ in rows]
    collator = PackCollator("token")
    lengths = [len(ids) for ids, _ in rows]
    # the paper's greedy walk in stored order; a row longer than max_tokens still runs, alone
    for members in greedy_pack([min(length, max_tokens) for length in lengths], max_tokens):
        cu = cu_seqlens_values(np.array([lengths[i] for i in members]), np.array([len(members)]))
        flat = {"input_ids": [t for i in members for t in rows[i][0]],
                "labels": [t for i in members for t in rows[i][1]], "cu_seqlens": cu.tolist()}
        batch = collator([flat])
        labels, cu_seqlens = batch["labels"], torch.from_numpy(cu).long()
        inputs = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()
                  if k not in ("labels", "loss_weights", COUNTS_KEY)}  # no labels: the model returns logits
        with torch.no_grad(), autocast:
            logits = model(**inputs).logits[0].float().cpu()
        targets, _ = shift_targets(labels, None, cu_seqlens)
        valid = targets != IGNORE_INDEX
        losses = torch.nn.functional.cross_entropy(logits, targets.clamp(min=0), reduction="none")
        correct = logits.argmax(-1) == targets
        segments = segment_ids(cu_seqlens)
        for position, index in enumerate(members):
            mine = valid & (segments == position)
            results[index] = {"exact": bool(correct[mine].all()), "loss": float(losses[mine].mean()),
                              "targets": int(mine.sum())}
    return results


def evaluate_model(model_dir: str, raw_dir: str, context_tokens: int = DEFAULT_CONTEXT_TOKENS,
                   per_task: int = DEFAULT_PER_TASK, seed: int | None = None,
                   short_examples: int = DEFAULT_SHORT_EXAMPLES) -> dict:
    """Load the model, build and check the held-out examples, score them; return the report."""
    started = time.perf_counter()
    data_stats = json.loads((Path(raw_dir) / "stats.json").read_text())
    data_seed, mix = data_stats["seed"], data_stats.get("short_mix", DEFAULT_MIX)
    seed = held_out_seed(data_seed) if seed is None else seed
    if seed == data_seed:
        raise ValueError(f"--seed {seed} is the training data's seed: held-out examples need another")
    candidate = LocalModel(str(model_dir), device="cpu")
    examples = held_out_examples(candidate.tokenizer, context_tokens, per_task, seed)
    unseen = held_out_examples(candidate.tokenizer, context_tokens, per_task, seed, tuple(HELD_OUT_TASKS))
    texts = training_texts(raw_dir)
    disjoint = check_disjoint(examples + unseen, texts)
    scores = score_examples(candidate, examples)
    short, skipped = held_out_short_examples(candidate.tokenizer, mix, short_examples, seed, texts)
    lengths = [e.query_tokens for e in examples]
    return {"model": str(model_dir), "chat_format": candidate.chat_format.name, "seed": seed, "data_seed": data_seed,
            "context_tokens": context_tokens, "per_task": per_task,
            "query_tokens": {"min": min(lengths), "max": max(lengths), "mean": sum(lengths) / len(lengths)},
            "disjoint": disjoint, **scores, "unseen_kind": score_examples(candidate, unseen),
            "short": {"mix": mix, "skipped_seen_in_training": skipped, **score_examples(candidate, short)},
            "seconds": time.perf_counter() - started}


def _accuracy_text(scores: dict) -> str:
    return "none scored" if scores["accuracy"] is None else f"{scores['accuracy']:.1%}"


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="model directory (with its tokenizer)")
    parser.add_argument("--raw", required=True, help="the demo_data output the model was trained on")
    parser.add_argument("--out", required=True, help="report JSON (written atomically)")
    parser.add_argument("--context_tokens", type=int, default=DEFAULT_CONTEXT_TOKENS)
    parser.add_argument("--per_task", type=int, default=DEFAULT_PER_TASK)
    parser.add_argument("--seed", type=int, default=None, help="default: the data seed + EVAL_SEED_OFFSET")
    parser.add_argument("--short_examples", type=int, default=DEFAULT_SHORT_EXAMPLES,
                        help="held-out short-task rounds to score (0: none)")
    args = parser.parse_args(argv)
    if args.context_tokens < 1 or args.per_task < 1 or args.short_examples < 0:
        parser.error("--context_tokens and --per_task must be >= 1, --short_examples >= 0")
    report = evaluate_model(args.model, args.raw, args.context_tokens, args.per_task, args.seed, args.short_examples)
    write_json_atomic(args.out, report)
    tasks = ", ".join(f"{t} {c['correct']}/{c['total']}" for t, c in
                      {**report["per_task"], **report["unseen_kind"]["per_task"]}.items())
    print(f"[demo_eval] {args.model}: exact match {report['accuracy']:.1%} ({tasks}) at "
          f"{report['query_tokens']['min']}-{report['query_tokens']['max']} query tokens; short tasks "
          f"{_accuracy_text(report['short'])} -> {args.out}")
    return report


if __name__ == "__main__":
    main()
