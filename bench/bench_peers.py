"""This project against what a stock transformers / TRL user runs, side by side in one run.

    python bench/bench_peers.py --out peers.json          # GPU: CONFIGS in order, ~8 min budget
    python bench/bench_peers.py --only project-fa4-full stock-flex-gc-liger --out peers.json
    python bench/bench_peers.py --smoke --out /tmp/peers.json   # CPU: tiny model, SMOKE_CONFIGS

Every configuration runs in its own process (bench/config_runs.py; a failure or OOM is a row) on
the same packs (bench_train_step.synthetic_packs, same seed), the same model (the 1.36B bench
Llama: hidden 2048, 24 layers, 16 heads, MLP 5632, vocab 32000; tiny with --smoke), the same FLOP
count and the same peak measurement (bench/step_timing.py), fused AdamW, warm-up steps untimed.
--out gets the JSON (rewritten after every configuration) and <out>.md the markdown table.

- `project`: LongAlign's training class, attention "longalign_varlen" with the named backend,
  longalign.ops.recompute's policy, optional layer compile / liger kernels (bench_train_step.run).
  `project-defaults` is what train.py picks without flags (longalign.train.speed.memory_model).
- `stock`: `transformers.LlamaForCausalLM` with `attn_implementation` = flex_attention | sdpa |
  flash_attention_4, fed padding-free as `DataCollatorWithFlattening` emits it (one flat row,
  `position_ids` restarting per sequence, the first label of every sequence -100; `+kwargs`:
  also its `cu_seq_lens_q/k`, `max_length_q/k`), `gradient_checkpointing_enable()` as the Trainer
  calls it, its own token-mean loss, and with `liger` liger-kernel's `apply_liger_kernel_to_llama`
  defaults (RoPE, RMSNorm, SwiGLU, fused linear cross-entropy). transformers turns the restarting
  position_ids into a packed-sequence mask for sdpa (a dense (T, T) mask) and flex (a BlockMask),
  and into cu_seqlens for flash attention (its max length a 0-d tensor, unless given as kwargs).
- `loss`: one pack's LM-head loss forward + backward, LongAlign's chunked weighted loss against
  Liger's fused linear cross-entropy with reduction="none" weighted the same way (longalign.train.speed.liger):
  time, peak memory, agreement.

Headline (`headline`), from the measured rows only:
- `peer_best_mfu_64k`: the highest MFU of a stock row that ran; that row is the best peer.
- `speedup_vs_best_peer_equal_memory`: best peer's step seconds / the fastest project row's whose
  peak allocated memory is at most the best peer's x (1 + EQUAL_MEMORY_TOLERANCE). "Equal memory"
  means exactly that: not more peak memory than the peer (tolerance for allocator noise).
- `speedup_same_kernel_no_compile`: per attention kernel run by both (flex, FA4), the fastest stock
  row with that kernel and gradient checkpointing (with or without Liger) / the project row with
  that kernel, recompute full, no compile, no liger; the goal takes the smallest.
- `mfu_checkpointed_best`: the highest project MFU with every layer checkpointed (full,
  selective or offload, with or without compile; the activation-checkpointing goal); also
  `mfu_partially_checkpointed_best` (any policy but none: selective:K, full:K) and `mfu_best`.
- `defaults_vs_best`: fastest project row's step seconds / project-defaults' (1.0 = the defaults
  are the fastest that ran; every row that ran fits the GPU).
"""
from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

import bench_train_step
from config_runs import run_budgeted, run_in_subprocess
from peer_models import loss_comparison, stock_run
from longalign.storage import write_bytes_atomic, write_json_atomic

EQUAL_MEMORY_TOLERANCE = 0.03
GOALS = {"mfu_checkpointed_best": 0.60, "speedup_vs_best_peer_equal_memory": 1.6,
         "speedup_same_kernel_no_compile": 1.0, "defaults_vs_best": 0.95}
GOAL_TEXT = {"mfu_checkpointed_best": "MFU >= 0.60 at 64k with activation checkpointing",
             "speedup_vs_best_peer_equal_memory": ">= 1.6x the best runnable peer at equal peak memory",
             "speedup_same_kernel_no_compile": ">= 1.0x the peer with the same attention kernel and recompute, no compile",
             "defaults_vs_best": "defaults (no flags) within 5% of the best configuration that fits"}
KERNEL_OF = {"flex": "flex", "flex_attention": "flex", "flash_attn_cute": "fa4", "flash_attention_4": "fa4",
             "cudnn": "cudnn", "sdpa": "sdpa", "reference": "reference"}
BUDGET_S, CONFIG_TIMEOUT_S, STEPS = 480.0, 150.0, ("--warmup", "2", "--steps", "3")
MIN_START_S = 45.0  # a configuration needs ~25-60 s on an H200: with less budget left it is skipped, not cut


@dataclass(frozen=True)
class Config:
    name: str
    system: str  # project | stock | loss
    attention: str | None = None  # project backend / stock attn_implementation; None: automatic
    recompute: str = "full"  # project policy | "auto" (train.py's choice) | "gradient_checkpointing" (stock)
    compile: bool = False
    liger: bool = False
    flash_kwargs: bool = False  # stock: DataCollatorWithFlattening(return_flash_attn_kwargs=True)


def project(name, attention, recompute, compile=False, liger=False):
    return Config(name, "project", attention, recompute, compile, liger)


def stock(name, attention, liger=False, flash_kwargs=False):
    return Config(name, "stock", attention, "gradient_checkpointing", False, liger, flash_kwargs)


# Most important first: configurations that would start after the budget are recorded as skipped.
CONFIGS = (
    project("project-fa4-selective-compile", "flash_attn_cute", "selective", compile=True),
    project("project-defaults", None, "auto"),
    project("project-fa4-offload-compile", "flash_attn_cute", "offload", compile=True),
    stock("stock-fa4-gc-liger+kwargs", "flash_attention_4", liger=True, flash_kwargs=True),
    project("project-fa4-full", "flash_attn_cute", "full"),
    stock("stock-flex-gc-liger", "flex_attention", liger=True),
    project("project-fa4-full-liger", "flash_attn_cute", "full", liger=True),
    project("project-fa4-full-compile", "flash_attn_cute", "full", compile=True),
    project("project-fa4-none-compile", "flash_attn_cute", "none", compile=True),
    project("project-flex-full", "flex", "full"),
    Config("loss-project-vs-liger", "loss"),
    stock("stock-fa4-gc-liger", "flash_attention_4", liger=True),
    stock("stock-flex-gc", "flex_attention"),
    stock("stock-fa4-gc+kwargs", "flash_attention_4", flash_kwargs=True),
    project("project-fa4-selective:23-compile", "flash_attn_cute", "selective:23", compile=True),
    project("project-fa4-selective:12-compile", "flash_attn_cute", "selective:12", compile=True),
    project("project-cudnn-full", "cudnn", "full"),
    stock("stock-sdpa-gc-liger", "sdpa", liger=True),
)
SMOKE_CONFIGS = (
    project("project-reference-full", "reference", "full"),
    project("project-reference-selective", "reference", "selective"),
    project("project-defaults", None, "auto"),
    stock("stock-sdpa-gc", "sdpa"),
    stock("stock-sdpa-gc+kwargs", "sdpa", flash_kwargs=True),
    stock("stock-sdpa-gc-liger", "sdpa", liger=True),
    Config("loss-project-vs-liger", "loss"),
)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="JSON path (<out>.md: the markdown table)")
    p.add_argument("--smoke", action="store_true", help="CPU, tiny model, SMOKE_CONFIGS")
    p.add_argument("--only", nargs="+", default=None, metavar="NAME", help="these configurations, in this order")
    p.add_argument("--budget_s", type=float, default=BUDGET_S, help="start no configuration after this")
    p.add_argument("--config_timeout_s", type=float, default=CONFIG_TIMEOUT_S)
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # one configuration, in this process
    args = p.parse_args(argv)
    table = {c.name: c for c in (SMOKE_CONFIGS if args.smoke else CONFIGS)}
    unknown = [n for n in args.only or [] if n not in table]
    if unknown or (args.worker and args.worker not in table):
        p.error(f"unknown configuration(s) {unknown or [args.worker]}; known: {sorted(table)}")
    args.configs = [table[n] for n in args.only] if args.only else list(table.values())
    args.table = table
    return args


def train_step_argv(config: Config, smoke: bool) -> list[str]:
    """bench_train_step's command line for a project configuration."""
    argv = [*STEPS, *(["--smoke"] if smoke else [])]
    if config.attention:
        argv += ["--attn_backend", config.attention]
    argv += ["--speed_defaults"] if config.recompute == "auto" else ["--recompute", config.recompute]
    return argv + ["--compile"] * config.compile + ["--liger"] * config.liger


def run_worker(config: Config, smoke: bool) -> dict:
    """One configuration's row (in the current process)."""
    targs = bench_train_step.parse_args(train_step_argv(config, smoke))
    if config.system == "project":
        result = bench_train_step.run(targs)
    elif config.system == "stock":
        result = stock_run(targs, config.attention, config.liger, config.flash_kwargs)
    else:
        result = loss_comparison(targs)
    return {**asdict(config), **result}


def _ran(row: dict) -> bool:
    return "error" not in row and "skipped" not in row and row.get("step_seconds") is not None


def _fastest(rows: list[dict]) -> dict | None:
    return min(rows, key=lambda r: r["step_seconds"], default=None)


def headline(rows: list[dict]) -> dict:
    """The module docstring's headline figures from the rows that ran (None where not measurable)."""
    ran = [r for r in rows if _ran(r) and r["system"] in ("project", "stock")]
    peers = [r for r in ran if r["system"] == "stock"]
    ours = [r for r in ran if r["system"] == "project"]
    out = {"peer_best": None, "peer_best_mfu_64k": None, "speedup_vs_best_peer_equal_memory": None,
           "equal_memory_project": None, "speedup_same_kernel_no_compile": None, "same_kernel": {},
           "mfu_checkpointed_best": None, "mfu_partially_checkpointed_best": None, "mfu_best": None,
           "defaults_vs_best": None}
    best_peer = max(peers, key=lambda r: r["mfu"], default=None)
    if best_peer is not None:
        out["peer_best"], out["peer_best_mfu_64k"] = best_peer["name"], best_peer["mfu"]
        if best_peer.get("peak_memory_gib") is not None:
            limit = best_peer["peak_memory_gib"] * (1 + EQUAL_MEMORY_TOLERANCE)
            equal = _fastest([r for r in ours if r.get("peak_memory_gib") is not None and r["peak_memory_gib"] <= limit])
            if equal is not None:
                out["equal_memory_project"] = equal["name"]
                out["speedup_vs_best_peer_equal_memory"] = best_peer["step_seconds"] / equal["step_seconds"]
    for kernel in sorted({KERNEL_OF.get(r["attention"]) for r in peers} - {None}):
        peer = _fastest([r for r in peers if KERNEL_OF.get(r["attention"]) == kernel])
        mine = _fastest([r for r in ours if KERNEL_OF.get(r["attn_backend"]) == kernel and r["recompute"] == "full"
                         and not r["compile"] and not r["liger"]])
        if mine is not None:
            out["same_kernel"][kernel] = {"peer": peer["name"], "project": mine["name"],
                                          "speedup": peer["step_seconds"] / mine["step_seconds"]}
    if out["same_kernel"]:
        out["speedup_same_kernel_no_compile"] = min(v["speedup"] for v in out["same_kernel"].values())
    checkpointed = [r for r in ours if r["recompute"] in ("full", "selective", "offload")]
    partially = [r for r in ours if r["recompute"] != "none"]
    for key, group in (("mfu_checkpointed_best", checkpointed), ("mfu_partially_checkpointed_best", partially),
                       ("mfu_best", ours)):
        out[key] = max((r["mfu"] for r in group), default=None)
    defaults = [r for r in ours if r["name"] == "project-defaults"]
    if defaults:
        out["defaults_vs_best"] = _fastest(ours)["step_seconds"] / defaults[0]["step_seconds"]
    return out


def goals(head: dict) -> list[dict]:
    """Each goal met / not met / not measured, from the headline numbers."""
    result = []
    for key, target in GOALS.items():
        value = head.get(key)
        status = "not measured" if value is None else ("met" if value >= target else "not met")
        result.append({"goal": GOAL_TEXT[key], "key": key, "target": target, "value": value, "status": status})
    return result


def _cell(value, fmt: str) -> str:
    return "" if value is None else format(value, fmt)


def markdown(rows: list[dict], head: dict, goal_rows: list[dict]) -> str:
    lines = ["| configuration | system | attention | recompute | compile | liger | s/step | MFU | peak GiB | "
             "predicted GiB | wall s |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        left = (f"| {r['config']} | {r.get('system', '')} | {r.get('attn_backend') or r.get('attention') or ''} | "
                f"{r.get('recompute', '')} | {'yes' if r.get('compile') else 'no'} | {'yes' if r.get('liger') else 'no'} |")
        if r.get("system") == "loss" and "error" not in r and "skipped" not in r:
            continue  # its own table below
        if not _ran(r):
            reason = r.get("skipped") or "fails: " + r.get("error", "").strip().splitlines()[-1][:120].replace("|", "/")
            lines.append(f"{left} {reason} | | | | {r.get('wall_s', '')} |")
            continue
        lines.append(f"{left} {_cell(r.get('step_seconds'), '.3f')} | {_cell(r.get('mfu'), '.3f')} | "
                     f"{_cell(r.get('peak_memory_gib'), '.1f')} | {_cell(r.get('predicted_peak_gib'), '.1f')} | "
                     f"{r.get('wall_s', '')} |")
    for r in (r for r in rows if r.get("system") == "loss" and "losses" in r):
        lines += ["", f"LM-head loss, one pack of {r['tokens']} tokens, vocab {r['vocab']}, hidden {r['hidden']}:", "",
                  "| loss | fwd+bwd s | peak above inputs GiB | loss | error |", "|---|---|---|---|---|"]
        lines += [f"| {name} | {_cell(v.get('seconds'), '.4f')} | {_cell(v.get('peak_extra_gib'), '.2f')} | "
                  f"{_cell(v.get('loss'), '.6f')} | {v.get('error', '')[:120]} |" for name, v in r["losses"].items()]
        if r.get("agreement"):
            lines.append("agreement (relative): " + ", ".join(f"{k} {v:.2e}" for k, v in r["agreement"].items()))
    lines += ["", "| figure | value |", "|---|---|"]
    lines += [f"| {k} | {v if not isinstance(v, float) else round(v, 3)} |" for k, v in head.items() if k != "same_kernel"]
    lines += [f"| same kernel {k} | {v['speedup']:.3f} ({v['project']} vs {v['peer']}) |"
              for k, v in head["same_kernel"].items()]
    lines += ["", "| goal | value | status |", "|---|---|---|"]
    lines += [f"| {g['goal']} | {_cell(g['value'], '.3f')} | {g['status']} |" for g in goal_rows]
    return "\n".join(lines) + "\n"


def save(rows: list[dict], out: Path, smoke: bool) -> dict:
    head = headline(rows)
    report = {"benchmark": "peers", "smoke": smoke, "torch": torch.__version__,
              "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() and not smoke else "cpu",
              "equal_memory_tolerance": EQUAL_MEMORY_TOLERANCE, "rows": rows, "headline": head, "goals": goals(head)}
    write_json_atomic(out, report)
    write_bytes_atomic(out.with_suffix(".md"), markdown(rows, head, report["goals"]).encode())
    return report


def main(argv=None) -> dict:
    args = parse_args(argv)
    out = Path(args.out)
    if args.worker:
        write_json_atomic(out, run_worker(args.table[args.worker], args.smoke))
        return json.loads(out.read_text())
    script = Path(__file__).resolve()

    def one(config: Config, timeout_s: float) -> dict:
        row = run_in_subprocess(script, ["--worker", config.name, *(["--smoke"] if args.smoke else [])], timeout_s)
        brief = {k: row.get(k) for k in ("step_seconds", "mfu", "peak_memory_gib", "wall_s")}
        print(json.dumps({"config": config.name, **brief, "error": row.get("error", "")[-300:] or None}), flush=True)
        return row

    rows = run_budgeted(args.configs, one, args.budget_s, args.config_timeout_s, min_start_s=MIN_START_S,
                        on_result=lambda rows: save(rows, out, args.smoke), name=lambda c: c.name, describe=asdict)
    report = save(rows, out, args.smoke)
    print(out.with_suffix(".md").read_text(), flush=True)
    return report


if __name__ == "__main__":
    main()
