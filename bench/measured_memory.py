"""The memory model of longalign/train/speed/memory_model.py against every peak recorded under bench/measured/.

    python bench/measured_memory.py               # one line per recorded run, the largest error last
    python bench/measured_memory.py --record      # also memory_model_max_error in bench/results.json

Each recorded run (RECORDED: the train-step sweeps, the peer comparison's project rows, the
paper-width runs and the long-context ladder, all on one H200) is rebuilt as it ran: the model
shape and parameter counts of bench_train_step's model for that width and depth, the packs it
trained (bench_train_step.synthetic_packs / bench_long_context.long_packs, same seed: their mean
real tokens over the timed steps must equal the row's `tokens_per_step`, or the row is refused),
its recompute policy, compile / Liger (fused norms and SwiGLU) and attention backend. The
predicted peak is the largest over the steps it ran (step 0 before AdamW's states exist), to
compare with torch.cuda.max_memory_allocated over the same steps (`peak_memory_gib`).

Not used: runs whose packs came from an older generator (train_step_h200.json,
train_step_flex_h200.json: their `tokens_per_step` matches no pack sequence of today's code, so
the lengths they ran cannot be rebuilt) and stock transformers rows (not this model).
"""
from __future__ import annotations

import json
import statistics
from dataclasses import dataclass
from pathlib import Path

import torch

import bench_long_context
import bench_train_step
from longalign.ops.weighted_loss import DEFAULT_CHUNK_TOKENS
from longalign.modeling.weighted_lm import TRAINING_CLASSES
from longalign.modeling.shape import ModelShape
from longalign.train.speed.memory_model import GIB, Kernels, MemorySetup, parameter_counts, predicted_peak_bytes
from longalign.ops.recompute import decoder_layers

MEASURED = Path(__file__).resolve().parent / "measured"
RECORDED = ("h200_session4/peers.json", "h200_session4/widths.jsonl", "h200_session4/long_full.jsonl",
            "h200_session3/sweep_fa4.jsonl", "h200_session3/sweep_cudnn.jsonl", "h200_session3/sweep_a.jsonl",
            "h200_session3/sweep_b.jsonl", "h200_session3/sweep_final.jsonl", "train_sweep_h200.jsonl",
            "train_sweep2_h200.jsonl")
SEED = 0  # bench_train_step's and bench_long_context's default; no recorded run changed it


@dataclass(frozen=True)
class Recorded:
    source: str
    name: str
    policy: str
    kernels: Kernels
    step_tokens: tuple[int, ...]  # every step's pack length, warm-up first
    measured_gib: float
    predicted_gib: float

    @property
    def error(self) -> float:
        return (self.predicted_gib - self.measured_gib) / self.measured_gib


def _rows(path: Path) -> list[dict]:
    if path.suffix == ".jsonl":
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in json.loads(path.read_text())["rows"] if r.get("system") == "project"]


def _model(row: dict):
    """(ModelShape, MemorySetup) of the bench model this row trained."""
    argv = ["--width", row["width"]] if row.get("width") else []
    args = bench_train_step.parse_args(argv + ["--layers", str(row.get("layers") or 24)])
    config = bench_train_step.model_config(args, args.layers)
    with torch.device("meta"):
        model = TRAINING_CLASSES[args.family](config)
    params, layer_params = parameter_counts(model, decoder_layers(model)[0])
    return ModelShape.from_config(config), MemorySetup(params, layer_params, 2), args.vocab


def _step_tokens(row: dict, vocab: int) -> list[int]:
    """Pack lengths of every step the row ran, checked against its recorded timed mean."""
    warmup, steps = row.get("warmup", 2), row.get("steps", 3)
    if "document_tokens" in row:  # bench_long_context: packs of 64k laid end to end
        packs = bench_long_context.long_packs(warmup + steps, row["pack_tokens"], row["document_tokens"], vocab, SEED)
    else:
        extra = int(bool(row.get("profile")))
        packs = bench_train_step.synthetic_packs(warmup + steps + extra, row.get("pack_tokens") or 65536, vocab, SEED)
    lengths = [len(p["input_ids"]) for p in packs]
    real = statistics.mean(lengths[warmup:warmup + steps])
    if abs(real - row["tokens_per_step"]) > 0.5:
        raise ValueError(f"{row.get('config') or row.get('name')}: rebuilt packs average {real} tokens, "
                         f"the row says {row['tokens_per_step']}")
    return lengths


def predict(row: dict) -> tuple[float, tuple[int, ...]]:
    """The model's peak (GiB) over the steps the row ran, and those steps' pack lengths."""
    shape, setup, vocab = _model(row)
    kernels = Kernels(fused=bool(row.get("compile") or row.get("liger")), attention=row["attn_backend"])
    lengths = _step_tokens(row, vocab)
    peaks = [predicted_peak_bytes(shape, row["recompute"], tokens, setup, 2, DEFAULT_CHUNK_TOKENS, kernels,
                                  optimizer_state=i > 0) for i, tokens in enumerate(lengths)]
    return max(peaks) / GIB, tuple(lengths)


def recorded_runs() -> list[Recorded]:
    """Every recorded run with a measured peak, once (identical configuration and peak: one row)."""
    out, seen = [], set()
    for source in RECORDED:
        for row in _rows(MEASURED / source):
            if row.get("peak_memory_gib") is None or "error" in row:
                continue
            name = row.get("name") or row.get("config") or row["recompute"]
            key = (row["recompute"], bool(row.get("compile")), bool(row.get("liger")), row["attn_backend"],
                   row.get("width"), row.get("pack_tokens"), round(row["peak_memory_gib"], 2))
            if key in seen:
                continue
            seen.add(key)
            predicted, lengths = predict(row)
            kernels = Kernels(fused=bool(row.get("compile") or row.get("liger")), attention=row["attn_backend"])
            out.append(Recorded(source, name, row["recompute"], kernels, lengths, row["peak_memory_gib"], predicted))
    return out


def table(runs: list[Recorded]) -> str:
    lines = [f"{'source':<32} {'run':<62} {'max tokens':>10} {'measured':>9} {'predicted':>9} {'error':>7}"]
    for r in sorted(runs, key=lambda r: abs(r.error)):
        lines.append(f"{r.source:<32} {r.name[:62]:<62} {max(r.step_tokens):>10} {r.measured_gib:9.2f} "
                     f"{r.predicted_gib:9.2f} {r.error:+7.1%}")
    return "\n".join(lines + [f"max |error| {max(abs(r.error) for r in runs):.1%} over {len(runs)} runs"])


def main(argv=None) -> list[Recorded]:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--record", action="store_true", help="memory_model_max_error into bench/results.json")
    args = parser.parse_args(argv)
    runs = recorded_runs()
    print(table(runs))
    if args.record:
        from results import record

        record({"memory_model_max_error": round(max(abs(r.error) for r in runs), 4)},
               source=f"python bench/measured_memory.py --record ({len(runs)} recorded peaks, {', '.join(RECORDED)})",
               machine="predicted on a CPU against peaks measured on one NVIDIA H200 (2026-11-22, 2026-12-01)")
    return runs


if __name__ == "__main__":
    main()
