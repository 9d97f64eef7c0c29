"""The paper's findings in miniature, from one pretrained base: data quantity (Table 2), training methods (Table 3).

    python bench/reproduce_mini.py --out bench/measured/reproduce_mini.json             # one GPU, bf16
    python bench/reproduce_mini.py --experiments quantity --out ...                    # one half of it
    python bench/reproduce_mini.py --cpu --threads 2 --epochs 0.2 --eval_per_task 8 --out ...  # CPU, bounded
    python bench/reproduce_mini.py --cpu --tiny --threads 1 --out /tmp/reproduce_mini.json   # smoke (tests)

Every run starts from the same weights: --base (the demo's pretrained tiny base) with its context
raised to --max_length (`longalign.demo.base.prepare_model_init`); the seed changes only the data
order (train.py --seed/--data_seed). --tiny without --base pretrains a tiny base on the spot
(TINY_BASE). Each run is train.py's own code path (`train.build_trainer(argv)` + `Trainer.train()`):
--epochs at --lr, cosine, AdamW beta2 0.95. A 2-step untimed warm-up run comes first, so that no
timed run pays the process's one-time start-up. The default is 1 epoch (the paper trains 2): one
epoch of the full data is about 490 optimizer steps of 2 packs of 2304 tokens, a little more than
the demo's training (600 packs), and keeps the 18 runs of 3 seeds within two 10-minute GPU calls
(--experiments quantity, then methods).

Experiments (--experiments, default both; the full-data pack_weighted run serves both, once per seed):
  quantity  packing + loss weighting (the demo's recipe) with 0% / 50% / 100% of the --num_long long
            tasks (`0k`, `half`, `full`: pre_tokenize's datanum, as LongAlign-0k/5k/10k) and the
            same short chats; the same epochs, so `0k` trains fewer tokens (as in the paper)
  methods   the full data trained four ways:
            naive          --batch_method naive: random batches of --batch sequences padded to the longest
            sort           --batch_method sort: sort_and_group.py groups of --batch similar lengths
            pack           --batch_method pack: packs of --max_length tokens, loss = mean over packs
                           of each pack's token mean (the paper's "packing")
            pack_weighted  --batch_method pack --pack_loss: 1/N_k weights (Eq. 2, "packing + loss weighting")
            naive/sort take --grad_accum micro-steps per optimizer step; a pack run takes P packs, P
            chosen so a step trains about as many sequences (the paper: 8 packs of ~12 sequences
            against 8 GPUs x GA 12).

Data (`longalign.demo.data`, seed DATA_SEED, the base's tokenizer; then the library's run_pretokenize
per data quantity and sort_and_group.py's sort_and_group per seed): --num_long long tasks of the
demo (`longalign.demo.tasks.LONG_TASKS`) over log-uniform 1/8 .. 1 x the longest query (--max_length
- ANSWER_ROOM: LongAlign-10k's 8k .. 64k spread), SHORT_PER_LONG short chats per long one
(LongAlign-10k + ShareGPT as bench/bench_sort_and_group.py models it).

Measures per run, on held-out examples (their own seed, checked disjoint from the training
messages), scored by teacher forcing (exact = greedy exact match, token for token):
long_accuracy / long_loss: the long tasks at LONG_EVAL_FRACTIONS of the longest query;
unseen_kind_accuracy: the held-out wording (`HELD_OUT_TASKS`, never trained on), apart;
needle_accuracy: the needle test's own needle and question in the demo's held-out haystack at
NEEDLE_COUNT lengths from NEEDLE_MIN_LENGTH to the longest query x NEEDLE_DEPTHS;
short_loss / short_accuracy: held-out short chats; train_seconds (Trainer.train(), CUDA-synchronised),
optimizer_steps, train_tokens (real) and processed_tokens (padding included).
Verdicts, tables and the headline figures (`summary.headline`: bench/results.json's
mini_long_task_exact_match_<arm>) come from bench/reproduce_mini_report.py. The plan (optimizer
steps and tokens of every run) is printed first: on CPU, choose --epochs from it (naive's padding
dominates).
"""
from __future__ import annotations

import argparse
import hashlib
import importlib.util
import os
import random
import shutil
import statistics
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

from reproduce_mini_report import ARMS, EXPERIMENTS, markdown, plan_lines, planned_run, summarize

from longalign.train.collators import COUNT_FIELDS, COUNTS_KEY
from longalign.demo.base import DEFAULT_BASE, prepare_model_init
from longalign.demo.tasks import HELD_OUT_TASKS, LONG_TASKS
from longalign.demo.words import filler
from longalign.demo.data import generate_haystack, generate_short, rounds_of, write_demo_data
from longalign.demo.evaluation import (RetrievalExample, check_disjoint, held_out_examples, held_out_seed,
                                 teacher_forced_scores, training_texts)
from longalign.eval.generation import encode_text
from longalign.data.tokenize_stage import PretokenizeConfig, run_pretokenize
from longalign.storage import write_json_atomic
from longalign.data.tokenization import ConversationTokenizer

REPO = Path(__file__).resolve().parents[1]  # train.py and sort_and_group.py (imported in-process)
WORKDIR_MARKER = "reproduce_mini.workdir"  # a --workdir holding this is ours to replace

METHODS = {"naive": ["--batch_method", "naive"], "sort": ["--batch_method", "sort"],
           "pack": ["--batch_method", "pack"], "pack_weighted": ["--batch_method", "pack", "--pack_loss"]}
LONG_DATA_FRACTION = {"0k": 0.0, "half": 0.5, "full": 1.0}  # of --num_long, per data quantity
DATA_SEED = 1234
SHORT_PER_LONG = 6  # bench/bench_sort_and_group.py: 10k long + 60k short
LONG_RANGE_FACTOR = 8  # LongAlign-10k: 8k .. 64k tokens
ANSWER_ROOM = 256  # tokens of --max_length left for the template and the answer (the demo: 2304 - 2048)
FILLER_SAMPLE_WORDS = 2000  # filler words encoded to measure the base tokenizer's tokens per filler word
LONG_EVAL_FRACTIONS = (0.5, 1.0)
NEEDLE_MIN_LENGTH, NEEDLE_COUNT = 256, 4  # Needle_test/demo.sh: 4 lengths from 256 to the longest query
NEEDLE_DEPTHS = (0.0, 25.0, 50.0, 75.0, 100.0)
WARMUP_FRACTION = 0.05  # of the optimizer steps (transformers 5: a float warmup_steps < 1 is a ratio)
WARMUP_RUN_STEPS = 2  # the untimed warm-up run
GPU = dict(max_length=2304, num_long=1200, batch=8, grad_accum=2, epochs=1.0, lr=1e-3, eval_per_task=16,
           eval_short=192, num_proc=min(os.cpu_count() or 1, 8))
TINY = dict(max_length=768, num_long=6, batch=2, grad_accum=1, epochs=1.0, lr=3e-3, eval_per_task=1,
            eval_short=6, num_proc=1)
TINY_BASE = dict(steps=3, batch=2, context=64, hidden=32, layers=2, heads=2, kv_heads=2, intermediate=64,
                 vocab=400, eval_examples=2, max_words=40, warmup=1)  # longalign.demo.pretrain.PretrainConfig


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="JSON report (rewritten after every run)")
    p.add_argument("--cpu", action="store_true", help="train on the CPU (fp32) instead of one GPU (bf16)")
    p.add_argument("--tiny", action="store_true", help="smoke-test sizes (TINY) instead of GPU")
    p.add_argument("--base", default=None, help=f"the pretrained base (default {DEFAULT_BASE}; "
                                                "--tiny without --base: a tiny one made on the spot)")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--first_seed", type=int, default=0,
                   help="seeds first_seed .. first_seed + seeds - 1 (to split seeds over processes; "
                        "bench/reproduce_mini_report.py merges their reports)")
    p.add_argument("--experiments", nargs="+", choices=list(EXPERIMENTS), default=list(EXPERIMENTS))
    p.add_argument("--workdir", default="/tmp/reproduce_mini", help="data, models (replaced)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default torch's; 1 is fastest for --tiny on a busy machine)")
    for name, value in GPU.items():
        p.add_argument(f"--{name}", type=type(value), default=None, help=f"default {value} (tiny: {TINY[name]})")
    args = p.parse_args(argv)
    for name, value in (TINY if args.tiny else GPU).items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.base is None and not args.tiny:
        args.base = str(DEFAULT_BASE)
    if args.base is not None and not (Path(args.base) / "config.json").is_file():
        p.error(f"--base {args.base}: no config.json there (make a base with python -m longalign.demo.pretrain)")
    if args.first_seed < 0:
        p.error(f"--first_seed must be >= 0, got {args.first_seed}")
    if args.seeds < 1 or args.epochs <= 0 or args.num_long < 2 or (args.threads is not None and args.threads < 1):
        p.error("--seeds and --threads must be >= 1, --epochs > 0 and --num_long >= 2 (half of it is a data "
                "quantity)")
    if args.max_length - ANSWER_ROOM < NEEDLE_MIN_LENGTH:
        p.error(f"--max_length must be >= {NEEDLE_MIN_LENGTH + ANSWER_ROOM} (the shortest needle test "
                f"length + ANSWER_ROOM), got {args.max_length}")
    return args


def planned_runs(experiments: list[str]) -> list[tuple[str, str]]:
    """The distinct (data, method) runs of one seed, in order (a run two experiments share once)."""
    return list(dict.fromkeys(ARMS[arm] for e in EXPERIMENTS if e in experiments for arm in EXPERIMENTS[e]))


# ---------- base and data ----------
def tiny_base(workdir: Path, cpu: bool) -> str:
    from longalign.demo.pretrain import PretrainConfig, pretrain

    out = workdir / "tiny-base"
    pretrain(out, PretrainConfig(**TINY_BASE), "cpu" if cpu else None)
    return str(out)


def tokens_per_filler_word(tokenizer) -> float:
    """Tokens per requested filler word (the long tasks' size argument) under `tokenizer`."""
    text = " ".join(filler(random.Random(DATA_SEED), FILLER_SAMPLE_WORDS))
    return len(encode_text(tokenizer, text)) / FILLER_SAMPLE_WORDS


def build_data(args, workdir: Path, tokenizer) -> dict:
    """Demo tasks at the scaled mix with the base's tokenizer -> pre_tokenize (library), per data quantity."""
    longest = args.max_length - ANSWER_ROOM
    per_word = tokens_per_filler_word(tokenizer)
    words = (max(1, int(longest / LONG_RANGE_FACTOR / per_word)), int(longest / per_word))
    raw = workdir / "raw"
    data_stats = write_demo_data(raw, DATA_SEED, args.num_long, SHORT_PER_LONG * args.num_long, long_words=words,
                                 tokenizer_from=args.base)
    quantities = {}
    for data in dict.fromkeys(d for d, _ in planned_runs(args.experiments)):
        config = PretokenizeConfig(family="llama", tokenizer=str(raw / "tokenizer"), long_path=str(raw / "long.jsonl"),
                                   short_path=str(raw / "sharegpt.jsonl"),
                                   datanum=round(LONG_DATA_FRACTION[data] * args.num_long),
                                   max_length=args.max_length, truncate="skip", num_proc=args.num_proc,
                                   output_dir=str(workdir / "data" / data))
        quantities[data] = {"path": config.output_dir, "datanum": config.datanum,
                            "pretokenize": run_pretokenize(config)["total"]}
    return {"raw": str(raw), "demo_data": data_stats, "tokens_per_filler_word": per_word, "long_words": words,
            "longest_query_tokens": longest, "quantities": quantities}


def encoded(encoder, examples: list[RetrievalExample]) -> list[tuple[list[int], list[int]]]:
    return [(c.ids, c.labels) for c in encoder.encode_batch([[(e.query, e.answer)] for e in examples])]


def needle_examples(tokenizer, longest: int) -> list[RetrievalExample]:
    """The needle test's own needle and question in the demo's held-out haystack, lengths x depths."""
    from demo_sweep import NEEDLE_BUFFER, needle_and_question

    from longalign.eval.needle_test.needle import haystack_ids, make_prompt, sentence_end_patterns

    needle, question = needle_and_question()
    step = (longest - NEEDLE_MIN_LENGTH) / (NEEDLE_COUNT - 1)
    lengths = sorted({round(NEEDLE_MIN_LENGTH + i * step) for i in range(NEEDLE_COUNT)})
    hay = haystack_ids(tokenizer, "\n\n".join(generate_haystack(DATA_SEED)), longest)
    ends = sentence_end_patterns(tokenizer)
    records = [make_prompt(tokenizer, hay, needle, question, n, d, NEEDLE_BUFFER, ends)
               for n in lengths for d in NEEDLE_DEPTHS]
    return [RetrievalExample("needle_test", r["prompt"], needle.strip(), r["prompt_tokens"]) for r in records]


def eval_sets(args, raw: str, tokenizer) -> dict:
    """Held-out rows (input_ids, labels): long tasks and the unseen kind at LONG_EVAL_FRACTIONS, the
    needle test, short chats; every retrieval example checked disjoint from the training messages."""
    encoder, seed = ConversationTokenizer(tokenizer, "llama"), held_out_seed(DATA_SEED)
    texts, longest = training_texts(raw), args.max_length - ANSWER_ROOM
    sets, disjoint = {"long": {}, "unseen": {}}, {}
    for fraction in LONG_EVAL_FRACTIONS:
        context = int(fraction * longest)
        for key, tasks in (("long", tuple(LONG_TASKS)), ("unseen", tuple(HELD_OUT_TASKS))):
            examples = held_out_examples(tokenizer, context, args.eval_per_task, seed + context, tasks)
            disjoint[f"{key}_{context}"] = check_disjoint(examples, texts)
            sets[key][str(context)] = encoded(encoder, examples)
    needles = needle_examples(tokenizer, longest)
    disjoint["needle_test"] = check_disjoint(needles, texts)
    sets["needle"] = encoded(encoder, needles)
    seen = set(texts)
    rounds = [rounds_of(chat) for chat in generate_short(random.Random(seed), args.eval_short)]
    unseen = [r for r in rounds if not any(u in seen and a in seen for u, a in r)]  # drop chats seen in training
    sets["short"] = [(c.ids, c.labels) for c in encoder.encode_batch(unseen)]
    return {**sets, "disjoint": disjoint, "short_dropped_seen_in_training": len(rounds) - len(unseen)}


def evaluate(model, sets: dict, max_length: int) -> dict:
    was_training = model.training
    model.eval()
    long = {c: teacher_forced_scores(model, rows, max_length) for c, rows in sets["long"].items()}
    unseen = [s for rows in sets["unseen"].values() for s in teacher_forced_scores(model, rows, max_length)]
    needle = teacher_forced_scores(model, sets["needle"], max_length)
    short = teacher_forced_scores(model, sets["short"], max_length)
    model.train(was_training)
    long_all = [s for scores in long.values() for s in scores]
    return {"long_accuracy": statistics.fmean(s["exact"] for s in long_all),
            "long_loss": statistics.fmean(s["loss"] for s in long_all),
            "long_accuracy_by_context": {c: statistics.fmean(s["exact"] for s in v) for c, v in long.items()},
            "unseen_kind_accuracy": statistics.fmean(s["exact"] for s in unseen),
            "unseen_kind_loss": statistics.fmean(s["loss"] for s in unseen),
            "needle_accuracy": statistics.fmean(s["exact"] for s in needle),
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


def weights_fingerprint(model) -> str:
    """sha256 over the model's state dict (names and fp32 values, in name order)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def count_batches(trainer) -> list:
    """Record every micro-batch the trainer fetches: (its real tokens, from COUNTS_KEY, as a tensor
    on its device, so no synchronisation; its processed tokens, padding included)."""
    seen, fetch, tokens = [], trainer.get_batch_samples, COUNT_FIELDS.index("tokens")

    def counting(epoch_iterator, num_batches, device=None):
        batches, denominator = fetch(epoch_iterator, num_batches, device)
        seen.extend((batch[COUNTS_KEY][tokens], batch["input_ids"].numel()) for batch in batches)
        return batches, denominator

    trainer.get_batch_samples = counting
    return seen


def train_one(argv: list[str], sets: dict | None, max_length: int) -> dict:
    import torch

    import train

    trainer = train.build_trainer(argv)
    fingerprint = weights_fingerprint(trainer.model)
    batches = count_batches(trainer)
    sync = torch.cuda.synchronize if torch.cuda.is_available() and not trainer.args.use_cpu else (lambda: None)
    sync()
    started = time.perf_counter()
    trainer.train()
    sync()
    seconds = time.perf_counter() - started
    logs = [e for e in trainer.state.log_history if "loss" in e]
    run = {"train_seconds": seconds, "optimizer_steps": trainer.state.global_step,
           "train_tokens": sum(int(real) for real, _ in batches), "processed_tokens": sum(n for _, n in batches),
           "init_weights_sha256": fingerprint, "loss_first": logs[0]["loss"] if logs else None,
           "loss_last": logs[-1]["loss"] if logs else None}
    if sets is not None:
        started = time.perf_counter()
        run.update(evaluate(trainer.model, sets, max_length), eval_seconds=time.perf_counter() - started)
    return run


def pack_accumulation(sequences_per_pack: float, sequences_per_step: int) -> int:
    """Packs per optimizer step so that a step trains about `sequences_per_step` sequences."""
    return max(1, round(sequences_per_step / sequences_per_pack))


def group_data(args, built: dict, seed: int) -> dict:
    """sort_and_group every data quantity with this seed; per quantity its grouping figures."""
    import sort_and_group

    grouping = {}
    for data, quantity in built["quantities"].items():
        grouped = sort_and_group.sort_and_group(quantity["path"], args.batch, args.max_length, "bfd", seed,
                                                "truncate", overwrite=True)
        grouping[data] = {"rows": grouped["sort"]["rows"], "packs": grouped["pack"]["packs"],
                          "sort_padding_fraction": grouped["sort"]["padding_fraction_mean"],
                          "unsorted_padding_fraction": grouped["sort"]["padding_fraction_mean_unsorted"],
                          "sequences_per_pack": grouped["pack"]["sequences_per_pack_mean"],
                          "pack_grad_accum": pack_accumulation(grouped["pack"]["sequences_per_pack_mean"],
                                                               args.batch * args.grad_accum)}
    return grouping


def plan(args, built: dict, grouping: dict) -> list[dict]:
    """Per run of one seed, about how many optimizer steps and tokens (`reproduce_mini_report.planned_run`)."""
    from longalign.data.token_sequences import load_token_table, row_lengths

    lengths = {data: row_lengths(load_token_table(quantity["path"]).column("input_ids"))
               for data, quantity in built["quantities"].items()}
    return [planned_run(data, method, lengths[data], grouping[data], args.batch, args.grad_accum, args.epochs)
            for data, method in planned_runs(args.experiments)]


def warm_up(args, built: dict, workdir: Path, init: str) -> float:
    """The untimed warm-up: WARMUP_RUN_STEPS steps of the first planned run's data (seconds)."""
    data = built["quantities"][planned_runs(args.experiments)[0][0]]["path"]
    argv = train_argv("pack_weighted", args, init, data, str(workdir / "runs" / "warmup"), 0, 1)
    return train_one(argv + ["--max_steps", str(WARMUP_RUN_STEPS)], None, args.max_length)["train_seconds"]


def run_seed(args, seed: int, built: dict, sets: dict, workdir: Path, report: dict) -> None:
    """Every planned run from the same init with this seed's data order; the report is rewritten after each."""
    grouping = report["grouping"][str(seed)] = group_data(args, built, seed)
    if "plan" not in report:
        report["plan"] = plan(args, built, grouping)
        print("\n".join(plan_lines(report["plan"], args.seeds)), flush=True)
        report["warmup_seconds"] = warm_up(args, built, workdir, report["init"])
    for data, method in planned_runs(args.experiments):
        argv = train_argv(method, args, report["init"], built["quantities"][data]["path"],
                          str(workdir / "runs" / f"{data}_{method}_{seed}"), seed, grouping[data]["pack_grad_accum"])
        run = {"seed": seed, "data": data, "method": method, **train_one(argv, sets, args.max_length)}
        report["runs"].append(run)
        print(f"[reproduce_mini] seed {seed} {data}/{method}: {run['train_seconds']:.1f} s, "
              f"{run['train_tokens']:,} tokens, long {run['long_accuracy']:.2f}, unseen kind "
              f"{run['unseen_kind_accuracy']:.2f}, needle {run['needle_accuracy']:.2f}, "
              f"short loss {run['short_loss']:.3f}", flush=True)
        write_json_atomic(args.out, {**report, "summary": summarize(report["runs"])})


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


def reproduce(args, argv) -> dict:
    import torch
    from transformers import AutoTokenizer

    workdir = fresh_workdir(args.workdir)
    started = time.perf_counter()
    if args.base is None:
        args.base = tiny_base(workdir, args.cpu)
    init = prepare_model_init(args.base, workdir / "init", args.max_length)
    tokenizer = AutoTokenizer.from_pretrained(args.base)
    built = build_data(args, workdir, tokenizer)
    sets = eval_sets(args, built["raw"], tokenizer)
    report = {"command": sys.argv if argv is None else ["bench/reproduce_mini.py", *argv], "args": vars(args),
              "device": f"cpu ({torch.get_num_threads()} threads)" if args.cpu else torch.cuda.get_device_name(0),
              "torch": torch.__version__, "date": date.today().isoformat(), "init": str(workdir / "init"),
              "model_init": init, "data": built,
              "eval": {k: v for k, v in sets.items() if k not in ("long", "unseen", "needle", "short")},
              "eval_sizes": {"long": {c: len(r) for c, r in sets["long"].items()},
                             "unseen": {c: len(r) for c, r in sets["unseen"].items()},
                             "needle": len(sets["needle"]), "short": len(sets["short"])},
              "setup_seconds": time.perf_counter() - started, "grouping": {}, "runs": []}
    for seed in range(args.first_seed, args.first_seed + args.seeds):
        run_seed(args, seed, built, sets, workdir, report)
    report.update(summary=summarize(report["runs"]), total_seconds=time.perf_counter() - started)
    write_json_atomic(args.out, report)
    return report


def main(argv=None) -> dict:
    import torch

    args = parse_args(argv)
    if not args.cpu and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: pass --cpu (with --tiny for the smoke test)")
    threads = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        report = reproduce(args, argv)
    finally:
        torch.set_num_threads(threads)  # the caller's (a test process goes on)
    print(markdown(report["summary"]), end="")
    print(f"[reproduce_mini] {len(report['runs'])} runs in {report['total_seconds']:.0f} s -> {args.out}")
    return report


if __name__ == "__main__":
    if importlib.util.find_spec("train") is None:  # `python bench/reproduce_mini.py`: add the repository root
        path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
        sys.exit(subprocess.run([sys.executable, *sys.argv], env={**os.environ, "PYTHONPATH": path}).returncode)
    main()
