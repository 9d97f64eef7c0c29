"""Predict naive / sorted / packed training time on 8 GPUs from a measured per-step cost model.

    python bench/simulate_schedule.py --bench_json bench/measured/batching_h200x2.json
    python bench/simulate_schedule.py --coefficients 0.25 2e-5 1e-10 --data_dir ./data/llama/10k

Cost model of one micro-step on one GPU (data parallel, ZeRO-3): t = c0 + c1 X + c2 Y, with
X, Y the tokens and the attention term of what that GPU computes: a padded batch (B, L) gives
X = B L, Y = B L^2; a pack gives X = sum l, Y = sum l^2 (block-diagonal attention). Every
optimizer step adds c_opt. A micro-step lasts as long as its slowest GPU (the others wait at
ZeRO-3's collectives), so a schedule costs  sum_steps max_r t_r + optimizer_steps c_opt.

Fit (`fit_cost_model`): least squares on bench/bench_batching.py's step-cost table. Its measured
time is the max over ranks, so the fit alternates: take the rank the current coefficients call
slowest, solve the linear least squares on its features, repeat until that choice is stable.
Separate models are fit for padded (naive + sort runs) and packed (pack run) micro-steps: the two
use different attention kernels (SDPA vs varlen).

Schedules, as train.py runs them (world size W, per-device batch b):
- naive: a seeded permutation, consecutive runs of W b rows = one micro-step, rank r the r-th
  b rows (HF random sampler sharded by accelerate), padded to the longest of each rank's b;
- sort: `longalign.data.sorting.sorted_group_order(lengths, W b, seed)`, the same cut;
- pack: `longalign.data.packing.plan_packs(lengths, max_length, strategy, W, seed)`, one pack per GPU.
Lengths: the synthetic LongAlign-like mix of bench/bench_sort_and_group.py (10k long 8k-64k +
60k short 100-4k) or the `input_ids` lengths of a real dataset directory.

The outputs are predictions: measured costs (from a smaller model on the bench's GPUs) replayed on
8 GPUs. The absolute hours describe that model, not the paper's 6B/7B on A800s; the ratios
naive/pack and naive/sort are what compares with the paper's (PAPER_HOURS). Not modelled: c0
(per-micro-step ZeRO-3 gathers) was measured at the bench's GPU count, and on 8 GPUs each gathers
7/8 instead of 1/2 of the weights; a slower GPU or a bigger model changes c1/c2 against c0.
"""
from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from longalign.constants import DEFAULT_MAX_LENGTH
from longalign.data.packing import plan_packs
from longalign.data.sorting import sorted_group_order

REPO = Path(__file__).resolve().parents[1]

# Paper §3.2 / Figure (training hours on 8 x A800 80G): naive, packing, sorted batching.
PAPER_HOURS = {"ChatGLM3-6B-64k": {"naive": 45.4, "pack": 20.5, "sort": 19.1},
               "Llama-2-7B-64k": {"naive": 67.2, "pack": 23.4, "sort": 23.3}}


@dataclass
class CostModel:
    c0: float  # seconds per micro-step (hooks, ZeRO-3 gathers, kernel launches)
    c1: float  # seconds per token computed
    c2: float  # seconds per unit of sum l^2 (attention)
    c_opt: float = 0.0  # seconds per optimizer step

    def micro_cost(self, x, y):
        return self.c0 + self.c1 * np.asarray(x, dtype=np.float64) + self.c2 * np.asarray(y, dtype=np.float64)


# ---------- features of one GPU's share of a micro-step ----------
def padded_features(lengths) -> tuple[int, int]:
    """(B L, B L^2) of a batch padded to its longest row. [3, 5] -> (10, 50)."""
    lengths = [int(v) for v in lengths]
    if not lengths:
        return 0, 0
    longest = max(lengths)
    return len(lengths) * longest, len(lengths) * longest * longest


def packed_features(lengths) -> tuple[int, int]:
    """(sum l, sum l^2) of a pack. [3, 5] -> (8, 34)."""
    lengths = np.asarray(lengths, dtype=np.int64)
    return int(lengths.sum()), int((lengths * lengths).sum())


# ---------- schedules: micro-steps of per-rank lists of lengths ----------
def schedule_from_order(lengths, order, world: int, batch: int) -> list[list[list[int]]]:
    """Cut `order` into micro-steps of world x batch rows; rank r gets rows [r b, (r + 1) b).

    A last incomplete micro-step leaves the missing ranks empty (they cost nothing).
    lengths=[4 1 3 2], order=[0 1 2 3], world=2, batch=1 -> [[[4], [1]], [[3], [2]]]
    """
    lengths = np.asarray(lengths)
    rows = world * batch
    steps = []
    for start in range(0, len(order), rows):
        chunk = [int(lengths[i]) for i in order[start:start + rows]]
        steps.append([chunk[r * batch:(r + 1) * batch] for r in range(world)])
    return steps


def naive_schedule(lengths, world: int, batch: int, seed: int):
    order = np.random.default_rng(seed).permutation(len(lengths))
    return schedule_from_order(lengths, order, world, batch)


def sorted_schedule(lengths, world: int, batch: int, seed: int):
    order, _ = sorted_group_order(np.asarray(lengths), world * batch, seed)
    return schedule_from_order(lengths, order, world, batch)


def packed_schedule(lengths, world: int, max_length: int, strategy: str, seed: int):
    lengths = np.minimum(np.asarray(lengths, dtype=np.int64), max_length)  # the too-long policy: truncate
    packs, _ = plan_packs(lengths, max_length, strategy, world, seed)
    pack_lengths = [[int(lengths[i]) for i in pack] for pack in packs]
    return [pack_lengths[start:start + world] for start in range(0, len(pack_lengths), world)]


def schedule_seconds(steps, model: CostModel, packed: bool, grad_accum: int) -> dict:
    """Predicted seconds of a schedule: sum over micro-steps of the slowest rank + optimizer steps."""
    features = packed_features if packed else padded_features
    total = 0.0
    for ranks in steps:
        costs = [model.micro_cost(*features(r)) for r in ranks if len(r)]
        total += max(costs)
    optimizer_steps = -(-len(steps) // grad_accum)
    return {"seconds": total + optimizer_steps * model.c_opt, "micro_steps": len(steps),
            "optimizer_steps": optimizer_steps}


# ---------- fitting ----------
MIN_FIT_POINTS = 8  # micro-steps per fitted model: at least twice its 3-4 coefficients
def fit_cost_model(rank_features, seconds, optimizer_step=None, fixed_opt: float | None = None,
                   max_iterations: int = 50) -> tuple[CostModel, dict]:
    """Least-squares CostModel from micro-steps measured as the max over ranks.

    rank_features: per micro-step a list of (x, y) per rank (empty ranks left out); seconds: the
    measured micro-step times; optimizer_step: whether each one ended with an optimizer step.
    c_opt is fitted when that flag varies, taken from `fixed_opt` when given, else 0 (then a
    constant optimizer cost is inside c0).
    """
    seconds = np.asarray(seconds, dtype=np.float64)
    flags = np.zeros(len(seconds)) if optimizer_step is None else np.asarray(optimizer_step, dtype=np.float64)
    features = [np.asarray(f, dtype=np.float64).reshape(-1, 2) for f in rank_features]
    target = seconds - (fixed_opt or 0.0) * flags
    fit_opt = fixed_opt is None and 0 < flags.sum() < len(flags)
    chosen = [int(np.argmax(f[:, 1] * 1e6 + f[:, 0])) for f in features]  # start: the largest attention
    seen, best = set(), None
    for iteration in range(max_iterations):
        seen.add(tuple(chosen))
        model = _solve(np.array([f[c] for f, c in zip(features, chosen)]), flags, target, fit_opt, fixed_opt)
        predicted = np.array([max(model.micro_cost(f[:, 0], f[:, 1])) for f in features]) + model.c_opt * flags
        error = float(((seconds - predicted) ** 2).sum())
        if best is None or error < best[0]:
            best = (error, model, predicted)
        chosen = [int(np.argmax(model.micro_cost(f[:, 0], f[:, 1]))) for f in features]
        if tuple(chosen) in seen:  # converged (or cycling: keep the best model seen)
            break
    _, model, predicted = best
    residual = seconds - predicted
    total = ((seconds - seconds.mean()) ** 2).sum()
    quality = {"points": len(seconds), "iterations": iteration + 1,
               "r2": float(1 - (residual ** 2).sum() / total) if total > 0 else None,
               "rms_residual_s": float(np.sqrt((residual ** 2).mean())),
               "sum_measured_s": float(seconds.sum()), "sum_predicted_s": float(predicted.sum())}
    return model, quality


def _solve(picked: np.ndarray, flags: np.ndarray, target: np.ndarray, fit_opt: bool,
           fixed_opt: float | None) -> CostModel:
    """Linear least squares of target on [1, x, y (, flag)], columns scaled for conditioning."""
    columns = [np.ones(len(target)), picked[:, 0], picked[:, 1]] + ([flags] if fit_opt else [])
    design = np.stack(columns, axis=1)
    scale = np.abs(design).max(axis=0)
    scale[scale == 0] = 1.0
    coef, *_ = np.linalg.lstsq(design / scale, target, rcond=None)
    coef = coef / scale
    return CostModel(float(coef[0]), float(coef[1]), float(coef[2]), float(coef[3]) if fit_opt else (fixed_opt or 0.0))


def fit_from_bench(bench: dict, skip_first: int = 1, min_points: int = MIN_FIT_POINTS) -> dict:
    """{"padded": (model, quality), "packed": (model, quality)} from bench_batching's JSON.

    The first `skip_first` micro-steps of each run are left out (one-off start-up costs). The
    packed run usually steps the optimizer after every micro-step (GA 1): its c_opt is then the
    padded fit's, subtracted before fitting.
    """
    groups = {"padded": ("naive", "sort"), "packed": ("pack",)}
    fits, skipped = {}, {}
    for kind in ("padded", "packed"):
        rows = [row for row in bench["step_costs"] if row["method"] in groups[kind] and row["micro_step"] >= skip_first]
        if len(rows) < min_points:
            # c0, c1, c2 (+ c_opt) from a handful of points fit them exactly and extrapolate wildly
            # (4 packed points of a 4-GPU run gave c0 = -367 s); the other kind's model stands in
            skipped[kind] = len(rows)
            continue
        features = [[(r["cost_tokens"], r["cost_sum_sq"]) for r in row["ranks"] if r["sequences"]] for row in rows]
        flags = [row["optimizer_step"] for row in rows]
        fixed = None
        if kind == "packed" and "padded" in fits and len(set(flags)) == 1:
            fixed = fits["padded"][0].c_opt
        fits[kind] = fit_cost_model(features, [row["seconds"] for row in rows], flags, fixed_opt=fixed)
    if not fits:
        raise ValueError("the bench JSON has too few step-cost rows to fit a model")
    for kind, points in skipped.items():
        other = fits["packed" if kind == "padded" else "padded"]
        fits[kind] = (other[0], {**other[1], "borrowed": f"only {points} {kind} micro-steps measured "
                                 f"(< {min_points}): the other kind's model is used"})
    return fits


# ---------- simulation ----------
def simulate(lengths, padded_model: CostModel, packed_model: CostModel, world: int = 8, naive_batch: int = 1,
             sort_batch: int = 1, max_length: int = DEFAULT_MAX_LENGTH, grad_accum=None, epochs: float = 1.0,
             seed: int = 42) -> dict:
    """Predicted hours of naive, sort, pack (bfd) and pack_greedy; ratios against naive."""
    ga = {"naive": 12, "sort": 12, "pack": 1, **(grad_accum or {})}
    runs = {
        "naive": schedule_seconds(naive_schedule(lengths, world, naive_batch, seed), padded_model, False, ga["naive"]),
        "sort": schedule_seconds(sorted_schedule(lengths, world, sort_batch, seed), padded_model, False, ga["sort"]),
        "pack": schedule_seconds(packed_schedule(lengths, world, max_length, "bfd", seed), packed_model, True, ga["pack"]),
        "pack_greedy": schedule_seconds(packed_schedule(lengths, world, max_length, "greedy", seed), packed_model,
                                        True, ga["pack"]),
    }
    for run in runs.values():
        run["hours"] = run["seconds"] * epochs / 3600
    ratios = {f"naive_over_{m}": runs["naive"]["seconds"] / runs[m]["seconds"] for m in runs if m != "naive"}
    return {"predicted": runs, "ratios": ratios}


def paper_ratios() -> dict:
    return {model: {"naive_over_pack": h["naive"] / h["pack"], "naive_over_sort": h["naive"] / h["sort"]}
            for model, h in PAPER_HOURS.items()}


def dataset_lengths(directory: str) -> np.ndarray:
    import datasets

    dataset = datasets.load_from_disk(directory)
    return np.asarray(dataset.data.table.column("input_ids").combine_chunks().value_lengths(), dtype=np.int64)


def load_lengths(args) -> np.ndarray:
    if args.data_dir:
        return dataset_lengths(args.data_dir)
    from bench_sort_and_group import synthetic_lengths

    lengths, _ = synthetic_lengths(args.length_seed, args.long_distribution)
    return lengths


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--bench_json", help="bench/bench_batching.py output: fit the cost models")
    source.add_argument("--coefficients", type=float, nargs="+", metavar="C",
                        help="c0 c1 c2 [c_opt], used for every micro-step")
    p.add_argument("--data_dir", default=None, help="a tokenized dataset: its lengths (default: synthetic mix)")
    p.add_argument("--long_distribution", choices=("uniform", "loguniform"), default="uniform")
    p.add_argument("--length_seed", type=int, default=0)
    p.add_argument("--world", type=int, default=8)
    p.add_argument("--naive_batch", type=int, default=1, help="per-device batch of naive (> 1: padded)")
    p.add_argument("--max_length", type=int, default=DEFAULT_MAX_LENGTH)
    p.add_argument("--grad_accum", type=int, nargs=3, default=[12, 12, 1], metavar=("NAIVE", "SORT", "PACK"))
    p.add_argument("--epochs", type=float, default=2.0, help="scripts/*.sh default")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    if args.bench_json:
        fits = fit_from_bench(json.loads(Path(args.bench_json).read_text()))
        padded, packed = fits["padded"][0], fits["packed"][0]
        fit_info = {kind: {"model": asdict(m), "quality": q} for kind, (m, q) in fits.items()}
    else:
        if len(args.coefficients) not in (3, 4):
            p.error("--coefficients takes c0 c1 c2 [c_opt]")
        padded = packed = CostModel(*args.coefficients)
        fit_info = {"given": asdict(padded)}
    lengths = load_lengths(args)
    result = simulate(lengths, padded, packed, args.world, args.naive_batch, 1, args.max_length,
                      dict(zip(("naive", "sort", "pack"), args.grad_accum)), args.epochs, args.seed)
    result.update({"kind": "prediction", "cost_models": fit_info, "sequences": int(len(lengths)),
                   "tokens": int(lengths.sum()), "world": args.world, "epochs": args.epochs,
                   "paper_hours": PAPER_HOURS, "paper_ratios": paper_ratios()})
    text = json.dumps(result, indent=1, default=float)
    if args.out:
        Path(args.out).write_text(text + "\n")
    print(text)
    return result


if __name__ == "__main__":
    main()
