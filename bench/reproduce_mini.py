"""The paper's batching ablation (Table 3 time, LongBench-Chat / MT-Bench direction) at toy scale.

    python bench/reproduce_mini.py --out bench/measured/reproduce_mini_h200.json    # one GPU, bf16
    python bench/reproduce_mini.py --cpu --tiny --out /tmp/reproduce_mini.json      # smoke (tests)

One data mix, one random-init model per seed, four ways of training it (train.py's own code path:
`train.build_trainer(argv)` + `Trainer.train()`, the same epochs and learning rate):
  naive          --batch_method naive: random batches of --batch sequences padded to the longest
  sort           --batch_method sort: sort_and_group.py groups of --batch similar lengths
  pack           --batch_method pack: packs of --max_length tokens, loss = mean over packs of each
                 pack's token mean (the paper's "packing")
  pack_weighted  --batch_method pack --pack_loss: 1/N_k weights (Eq. 2, "packing + loss weighting")
naive/sort take --grad_accum micro-steps per optimizer step; pack takes P packs, P chosen so a step
trains about as many sequences (the paper: 8 packs of ~12 sequences against 8 GPUs x GA 12).

Data (longalign.demo_data, seed DATA_SEED, written by write_demo_data, then the library's
run_pretokenize and sort_and_group.py's sort_and_group): the LongAlign-10k + ShareGPT mix scaled
down as bench/bench_sort_and_group.py models it (10k long of 8k-64k tokens, 6 short per long):
--num_long retrieval tasks (needle sentence, key-value line) over log-uniform 1/8 .. 1 x the
longest query (LongAlign-10k's factor of 8 up to --max_length, the scaled 64k), answers of a few
tokens; 6x as many short chats (counting, tables, spelling, copying) with answers of tens of tokens.

Measures per run: train seconds (Trainer.train(), CUDA-synchronised); long-task accuracy = held-out
retrieval exact match at LONG_EVAL_FRACTIONS of the longest query (longalign.demo_eval examples,
other seed, checked disjoint; scored by teacher forcing, which equals greedy exact match token for
token); short-task quality = held-out short chats' mean per-sequence answer loss and exact match.
Seeds change the model init and the data order; mean +- sd over seeds. Prints a markdown table
with the paper's ChatGLM3-6B-64k figures and one line per direction, computed from the numbers.
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import random
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from longalign.demo_data import generate_short, rounds_of, write_demo_data
from longalign.demo_eval import (check_disjoint, held_out_examples, held_out_seed, teacher_forced_scores,
                                 training_texts)
from longalign.pretokenize import PretokenizeConfig, run_pretokenize
from longalign.storage import write_json_atomic
from longalign.tiny_model import TinyShape, save_tiny_model
from longalign.tokenization import ConversationTokenizer

REPO = Path(__file__).resolve().parents[1]  # train.py and sort_and_group.py (imported in-process)
WORKDIR_MARKER = "reproduce_mini.workdir"  # a --workdir holding this is ours to replace

METHODS = {"naive": ["--batch_method", "naive"], "sort": ["--batch_method", "sort"],
           "pack": ["--batch_method", "pack"], "pack_weighted": ["--batch_method", "pack", "--pack_loss"]}
# ChatGLM3-6B-64k, 8 x A800 (paper Table 3 and its training-time figure); MT-Bench is the short-task score.
PAPER = {"hours": {"naive": 45.4, "sort": 19.1, "pack": 20.5, "pack_weighted": 20.5},
         "longbench_chat": {"naive": 5.87, "sort": 5.4, "pack": 5.76, "pack_weighted": 6.21},
         "mt_bench": {"naive": 5.61, "sort": 5.76, "pack": 5.64, "pack_weighted": 5.5}}
# (name, ours better is, metric, method a, method b, what the paper found)
DIRECTIONS = (("sorted batching trains faster than naive", "lower", "train_seconds", "sort", "naive",
               "45.4 h -> 19.1 h"),
              ("packing trains faster than naive", "lower", "train_seconds", "pack_weighted", "naive",
               "45.4 h -> 20.5 h"),
              ("loss weighting improves long tasks over plain packing", "higher", "long_accuracy",
               "pack_weighted", "pack", "LongBench-Chat 5.76 -> 6.21"),
              ("loss weighting lowers the long-task answer loss of plain packing", "lower", "long_loss",
               "pack_weighted", "pack", "LongBench-Chat 5.76 -> 6.21"))
DATA_SEED = 1234
SHORT_PER_LONG = 6  # bench/bench_sort_and_group.py: 10k long + 60k short
LONG_RANGE_FACTOR = 8  # LongAlign-10k: 8k .. 64k tokens
TOKENS_PER_FILLER_WORD = 1.45  # the demo tokenizer on demo filler text (vocab 512-2048); sizes --num_long's words
ANSWER_ROOM = 64  # tokens left in --max_length for the template and the answer
LONG_EVAL_FRACTIONS = (0.5, 1.0)
WARMUP_FRACTION = 0.05  # of the optimizer steps (transformers 5: a float warmup_steps < 1 is a ratio)
GPU = dict(max_length=4096, num_long=600, hidden=256, layers=4, heads=8, kv_heads=4, intermediate=768,
           vocab=1024, batch=8, grad_accum=2, epochs=2, lr=2e-3, eval_per_task=16, eval_short=192)
TINY = dict(max_length=512, num_long=4, hidden=32, layers=2, heads=4, kv_heads=2, intermediate=64,
            vocab=512, batch=2, grad_accum=1, epochs=1, lr=3e-3, eval_per_task=1, eval_short=6)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="JSON report (rewritten after every run)")
    p.add_argument("--cpu", action="store_true", help="train on the CPU (fp32) instead of one GPU (bf16)")
    p.add_argument("--tiny", action="store_true", help="smoke-test sizes (TINY) instead of GPU")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(METHODS))
    p.add_argument("--workdir", default="/tmp/reproduce_mini", help="data, models (replaced)")
    for name, value in GPU.items():
        p.add_argument(f"--{name}", type=type(value), default=None, help=f"default {value} (tiny: {TINY[name]})")
    args = p.parse_args(argv)
    for name, value in (TINY if args.tiny else GPU).items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.seeds < 1 or args.max_length <= 2 * ANSWER_ROOM:
        p.error("--seeds must be >= 1 and --max_length > 2 x ANSWER_ROOM")
    return args


# ---------- data ----------
def build_data(args, workdir: Path) -> dict:
    """Demo tasks at the scaled mix -> pre_tokenize (library) -> the training dataset."""
    longest = args.max_length - ANSWER_ROOM
    words = (int(longest / LONG_RANGE_FACTOR / TOKENS_PER_FILLER_WORD), int(longest / TOKENS_PER_FILLER_WORD))
    raw, data = workdir / "raw", workdir / "data"
    data_stats = write_demo_data(raw, DATA_SEED, args.num_long, SHORT_PER_LONG * args.num_long, args.vocab, words)
    config = PretokenizeConfig(family="llama", tokenizer=str(raw / "tokenizer"), long_path=str(raw / "long.jsonl"),
                               short_path=str(raw / "sharegpt.jsonl"), datanum=args.num_long,
                               max_length=args.max_length, truncate="skip", num_proc=min(os.cpu_count() or 1, 8),
                               output_dir=str(data))
    stats = run_pretokenize(config)
    return {"raw": str(raw), "data": str(data), "demo_data": data_stats, "long_words": words,
            "pretokenize": stats["total"], "longest_query_tokens": longest}


def eval_sets(args, raw: str, tokenizer) -> dict:
    """Held-out rows (input_ids, labels): retrieval at LONG_EVAL_FRACTIONS, short chats."""
    encoder, seed = ConversationTokenizer(tokenizer, "llama"), held_out_seed(DATA_SEED)
    texts = training_texts(raw)
    long_rows, disjoint = {}, {}
    for fraction in LONG_EVAL_FRACTIONS:
        context = int(fraction * (args.max_length - ANSWER_ROOM))
        examples = held_out_examples(tokenizer, context, args.eval_per_task, seed + context)
        disjoint[str(context)] = check_disjoint(examples, texts)
        long_rows[str(context)] = [(c.ids, c.labels) for c in encoder.encode_batch([[(e.query, e.answer)]
                                                                                     for e in examples])]
    seen = set(texts)
    chats = generate_short(random.Random(seed), args.eval_short)
    rounds = [rounds_of(chat) for chat in chats]
    unseen = [r for r in rounds if not any(u in seen and a in seen for u, a in r)]  # drop chats seen in training
    return {"long": long_rows, "short": [(c.ids, c.labels) for c in encoder.encode_batch(unseen)],
            "disjoint": disjoint,
            "short_dropped_seen_in_training": len(rounds) - len(unseen)}


def evaluate(model, sets: dict, max_length: int) -> dict:
    was_training = model.training
    model.eval()
    per_context = {c: teacher_forced_scores(model, rows, max_length) for c, rows in sets["long"].items()}
    short = teacher_forced_scores(model, sets["short"], max_length)
    model.train(was_training)
    long_all = [s for scores in per_context.values() for s in scores]
    return {"long_accuracy": statistics.fmean(s["exact"] for s in long_all),
            "long_loss": statistics.fmean(s["loss"] for s in long_all),
            "long_accuracy_by_context": {c: statistics.fmean(s["exact"] for s in v) for c, v in per_context.items()},
            "short_loss": statistics.fmean(s["loss"] for s in short),
            "short_accuracy": statistics.fmean(s["exact"] for s in short)}


# ---------- training ----------
def train_argv(method: str, args, init: str, data: str, out: str, seed: int, pack_accum: int) -> list[str]:
    accum = pack_accum if method.startswith("pack") else args.grad_accum
    batch = 1 if method.startswith("pack") else args.batch
    argv = ["--model_name_or_path", init, "--train_file", data, "--output_dir", out, *METHODS[method],
            "--per_device_train_batch_size", str(batch), "--gradient_accumulation_steps", str(accum),
            "--num_train_epochs", str(args.epochs), "--learning_rate", str(args.lr),
            "--lr_scheduler_type", "cosine", "--warmup_steps", str(WARMUP_FRACTION), "--adam_beta2", "0.95",
            "--weight_decay", "0", "--logging_steps", "10", "--save_strategy", "no", "--seed", str(seed),
            "--data_seed", str(seed), "--disable_tqdm", "true", "--dataloader_num_workers", "0",
            "--compile_layers", "false", "--recompute", "none"]  # a tiny model: no compile, no recompute
    return argv + (["--use_cpu"] if args.cpu else ["--bf16"])


def train_one(method: str, argv: list[str], sets: dict, max_length: int) -> dict:
    import torch

    import train

    trainer = train.build_trainer(argv)
    sync = torch.cuda.synchronize if torch.cuda.is_available() and not trainer.args.use_cpu else (lambda: None)
    sync()
    started = time.perf_counter()
    trainer.train()
    sync()
    seconds = time.perf_counter() - started
    logs = [e for e in trainer.state.log_history if "loss" in e]
    scores = evaluate(trainer.model, sets, max_length)
    return {"method": method, "train_seconds": seconds, "optimizer_steps": trainer.state.global_step,
            "loss_first": logs[0]["loss"] if logs else None, "loss_last": logs[-1]["loss"] if logs else None,
            "tokens_per_s": statistics.fmean(e["tokens_per_s"] for e in logs) if logs else None, **scores}


def pack_accumulation(sequences_per_pack: float, sequences_per_step: int) -> int:
    """Packs per optimizer step so that a step trains about `sequences_per_step` sequences."""
    return max(1, round(sequences_per_step / sequences_per_pack))


def run_seed(args, seed: int, built: dict, sets: dict, workdir: Path, report: dict) -> None:
    """One init, then every method from it; the report is rewritten after each run."""
    init, data = workdir / f"init_seed{seed}", built["data"]
    shape = TinyShape(hidden=args.hidden, layers=args.layers, heads=args.heads, kv_heads=args.kv_heads,
                      intermediate=args.intermediate, max_positions=args.max_length, tie_embeddings=True)
    import sort_and_group

    save_tiny_model("llama", Path(built["raw"]) / "tokenizer", init, shape, seed=seed)
    grouped = sort_and_group.sort_and_group(data, args.batch, args.max_length, "bfd", seed, "truncate",
                                            overwrite=True)
    pack_accum = pack_accumulation(grouped["pack"]["sequences_per_pack_mean"], args.batch * args.grad_accum)
    report["grouping"][str(seed)] = {"sort_padding_fraction": grouped["sort"]["padding_fraction_mean"],
                                     "unsorted_padding_fraction": grouped["sort"]["padding_fraction_mean_unsorted"],
                                     "sequences_per_pack": grouped["pack"]["sequences_per_pack_mean"],
                                     "pack_grad_accum": pack_accum}
    for method in args.methods:
        argv = train_argv(method, args, str(init), data, str(workdir / f"run_{method}_{seed}"), seed, pack_accum)
        run = train_one(method, argv, sets, args.max_length)
        report["runs"].append({"seed": seed, **run})
        print(f"[reproduce_mini] seed {seed} {method}: {run['train_seconds']:.1f} s, long {run['long_accuracy']:.2f}, "
              f"short loss {run['short_loss']:.3f}", flush=True)
        write_json_atomic(args.out, {**report, "summary": summarize(report["runs"])})


# ---------- summary ----------
def mean_sd(values: list[float]) -> dict:
    return {"mean": statistics.fmean(values), "sd": statistics.stdev(values) if len(values) > 1 else 0.0,
            "n": len(values)}


def summarize(runs: list[dict]) -> dict:
    metrics = ("train_seconds", "long_accuracy", "long_loss", "short_loss", "short_accuracy")
    methods = {}
    for method in METHODS:
        mine = [r for r in runs if r["method"] == method]
        if mine:
            methods[method] = {m: mean_sd([r[m] for r in mine]) for m in metrics if all(m in r for r in mine)}
    return {"methods": methods, "directions": [direction(runs, *d) for d in DIRECTIONS]}


def direction(runs: list[dict], name: str, better: str, metric: str, a: str, b: str, paper: str) -> dict:
    """Whether `a` beats `b` on `metric` in every seed that ran both (the paper's direction).

    Verdicts: "reproduced" (a better in every seed), "not reproduced" (a worse in some seed and
    better in none), "tie" (equal in every seed: the metric cannot tell them apart, e.g. both 0),
    "mixed", "not measured" (no seed ran both, or the runs predate the metric).
    """
    by_seed: dict[int, dict] = {}
    for run in runs:
        by_seed.setdefault(run["seed"], {})[run["method"]] = run.get(metric)
    sign = -1.0 if better == "lower" else 1.0
    gains = [sign * (v[a] - v[b]) for v in by_seed.values() if v.get(a) is not None and v.get(b) is not None]
    if not gains:
        verdict = "not measured"
    elif all(g > 0 for g in gains):
        verdict = "reproduced"
    elif all(g == 0 for g in gains):
        verdict = "tie"
    elif all(g <= 0 for g in gains):
        verdict = "not reproduced"
    else:
        verdict = "mixed"
    return {"direction": name, "paper": paper, "metric": metric, "a": a, "b": b, "better": better,
            "seeds_in_direction": sum(g > 0 for g in gains), "seeds": len(gains),
            "gain": mean_sd(gains) if gains else None, "verdict": verdict}


def markdown(summary: dict) -> str:
    def cell(stat, fmt):
        return f"{stat['mean']:{fmt}} ± {stat['sd']:{fmt}}" if stat else "—"

    lines = ["| method | train s | long-task exact match | long-task answer loss | short-task loss | "
             "short-task exact match | paper: hours | paper: LongBench-Chat | paper: MT-Bench |",
             "|---|---|---|---|---|---|---|---|---|"]
    for method, s in summary["methods"].items():
        lines.append(f"| {method} | {cell(s['train_seconds'], '.1f')} | {cell(s['long_accuracy'], '.3f')} | "
                     f"{cell(s.get('long_loss'), '.3f')} | "
                     f"{cell(s['short_loss'], '.3f')} | {cell(s['short_accuracy'], '.3f')} | "
                     f"{PAPER['hours'][method]} | {PAPER['longbench_chat'][method]} | {PAPER['mt_bench'][method]} |")
    lines.append("")
    for d in summary["directions"]:
        gain = f"{cell(d['gain'], '.3f')} {d['metric']}" if d["gain"] else "no runs"
        lines.append(f"- {d['direction']} (paper: {d['paper']}): **{d['verdict']}** — {d['a']} vs {d['b']}, "
                     f"{d['seeds_in_direction']}/{d['seeds']} seeds in the paper's direction, gain {gain}")
    return "\n".join(lines) + "\n"


def fresh_workdir(path: str) -> Path:
    """--workdir, emptied if an earlier run of this script made it; another folder is refused."""
    workdir = Path(path)
    if workdir.exists():
        if not (workdir / WORKDIR_MARKER).is_file():
            raise SystemExit(f"--workdir {workdir} exists and was not made by this script; choose another")
        shutil.rmtree(workdir)
    workdir.mkdir(parents=True)
    (workdir / WORKDIR_MARKER).write_text("made by bench/reproduce_mini.py; replaced by its next run\n")
    return workdir


def main(argv=None) -> dict:
    import torch
    from transformers import AutoTokenizer

    args = parse_args(argv)
    if not args.cpu and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: pass --cpu (with --tiny for the smoke test)")
    workdir = fresh_workdir(args.workdir)
    started = time.perf_counter()
    built = build_data(args, workdir)
    sets = eval_sets(args, built["raw"], AutoTokenizer.from_pretrained(str(Path(built["raw"]) / "tokenizer")))
    device = "cpu" if args.cpu else torch.cuda.get_device_name(0)
    report = {"command": sys.argv, "args": vars(args), "device": device, "torch": torch.__version__,
              "data": built, "eval": {k: v for k, v in sets.items() if k not in ("long", "short")},
              "eval_sizes": {"long": {c: len(r) for c, r in sets["long"].items()}, "short": len(sets["short"])},
              "setup_seconds": time.perf_counter() - started, "grouping": {}, "runs": [], "paper": PAPER}
    for seed in range(args.seeds):
        run_seed(args, seed, built, sets, workdir, report)
    report.update(summary=summarize(report["runs"]), total_seconds=time.perf_counter() - started)
    write_json_atomic(args.out, report)
    print(markdown(report["summary"]), end="")
    print(f"[reproduce_mini] {len(report['runs'])} runs in {report['total_seconds']:.0f} s -> {args.out}")
    return report


if __name__ == "__main__":
    if importlib.util.find_spec("train") is None:  # `python bench/reproduce_mini.py`: add the repository root
        path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
        sys.exit(subprocess.run([sys.executable, *sys.argv], env={**os.environ, "PYTHONPATH": path}).returncode)
    main()
