"""bench/reproduce_mini.py: the CPU smoke run end to end from one base, and the verdicts from numbers."""
import gc
import json

import numpy as np
import pytest

import reproduce_mini as rm
import reproduce_mini_report as rr

ALL_ARMS = ("0k", "half", "full", "naive", "sort", "pack", "pack_weighted")


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """The smoke run, with the objects this test process already holds out of the garbage collector's
    scans (gc.freeze): each of its 13 trainings ends in accelerate's gc.collect(), which otherwise walks
    every object of the process (about a second each here)."""
    tmp = tmp_path_factory.mktemp("reproduce_mini")
    out, workdir = tmp / "report.json", tmp / "work"
    import sort_and_group, train  # noqa: F401  (imported by the run: their objects frozen too)

    gc.freeze()
    try:
        report = rm.main(["--cpu", "--tiny", "--seeds", "2", "--threads", "1", "--out", str(out),
                          "--workdir", str(workdir)])
    finally:
        gc.unfreeze()
    return report, json.loads(out.read_text()), workdir


def test_cpu_tiny_smoke_run_trains_every_arm_and_reports_it(smoke):
    report, saved, _ = smoke
    assert saved["summary"] == report["summary"]
    pairs = {(r["data"], r["method"]) for r in saved["runs"]}
    assert pairs == set(rr.ARMS.values()) and len(saved["runs"]) == 2 * len(pairs)  # full/pack_weighted once a seed
    assert {r["seed"] for r in saved["runs"]} == {0, 1}
    for run in saved["runs"]:
        assert run["train_seconds"] > 0 and run["optimizer_steps"] > 0 and run["train_tokens"] > 0
        for metric in ("long_accuracy", "unseen_kind_accuracy", "needle_accuracy", "short_accuracy"):
            assert 0 <= run[metric] <= 1
        assert run["short_loss"] > 0 and run["long_loss"] > 0
    assert all(d["overlaps"] == 0 for d in saved["eval"]["disjoint"].values())
    assert saved["eval_sizes"]["unseen"] and saved["eval_sizes"]["needle"] > 0
    assert {d: q["datanum"] for d, q in saved["data"]["quantities"].items()} == {"0k": 0, "half": 3, "full": 6}
    grouping = saved["grouping"]["0"]["full"]
    assert grouping["sort_padding_fraction"] <= grouping["unsorted_padding_fraction"]
    headline = saved["summary"]["headline"]
    assert set(headline) == {f"mini_long_task_exact_match_{arm}" for arm in ALL_ARMS}
    assert headline["mini_long_task_exact_match_full"] == headline["mini_long_task_exact_match_pack_weighted"]
    assert [(p["data"], p["method"]) for p in saved["plan"]] == rm.planned_runs(list(rr.EXPERIMENTS))
    seed0 = {(r["data"], r["method"]): r for r in saved["runs"] if r["seed"] == 0}
    for planned in saved["plan"]:  # whole epochs: the plan is exact
        ran = seed0[planned["data"], planned["method"]]
        assert (planned["optimizer_steps"], planned["train_tokens"]) == (ran["optimizer_steps"], ran["train_tokens"])


def test_less_long_data_trains_fewer_tokens_and_only_naive_pads(smoke):
    runs = {(r["seed"], r["data"], r["method"]): r for r in smoke[1]["runs"]}
    for seed in (0, 1):
        tokens = [runs[seed, data, "pack_weighted"]["train_tokens"] for data in ("0k", "half", "full")]
        assert tokens == sorted(tokens) and tokens[0] < tokens[-1]
        assert runs[seed, "full", "naive"]["processed_tokens"] > runs[seed, "full", "naive"]["train_tokens"]
        pack = runs[seed, "full", "pack"]
        assert pack["processed_tokens"] == pack["train_tokens"] == runs[seed, "full", "naive"]["train_tokens"]


def test_every_run_starts_from_the_base_weights(smoke):
    from transformers import AutoModelForCausalLM

    _, saved, workdir = smoke
    base = rm.weights_fingerprint(AutoModelForCausalLM.from_pretrained(str(workdir / "tiny-base")))
    assert {r["init_weights_sha256"] for r in saved["runs"]} == {base}
    by_seed = {s: {r["loss_last"] for r in saved["runs"] if r["seed"] == s and r["data"] == "full"} for s in (0, 1)}
    assert by_seed[0] != by_seed[1]  # the seed changes the data order, hence the training


def test_tables_put_the_papers_figures_beside_ours(smoke):
    table = rr.markdown(smoke[1]["summary"])
    for figure in ("45.4", "19.1", "20.5", "5.76", "6.21", "3.73", "5.97", "5.34", "5.51"):
        assert figure in table
    assert table.count("(paper: ") == len(rr.DIRECTIONS) + len(rr.LEVELS)
    assert "| long data |" in table and "| method |" in table


@pytest.mark.parametrize("flags, message", [
    (["--base", "/nonexistent/base"], "--base /nonexistent/base: no config.json"),
    (["--tiny", "--max_length", "500"], "--max_length must be >= 512"),
    (["--tiny", "--epochs", "0"], "--epochs > 0"),
    (["--tiny", "--num_long", "1"], "--num_long >= 2"),
])
def test_bad_settings_are_refused_by_name(flags, message, tmp_path, capsys):
    with pytest.raises(SystemExit):
        rm.main(["--cpu", "--out", str(tmp_path / "r.json"), "--workdir", str(tmp_path / "w"), *flags])
    assert message in capsys.readouterr().err and not (tmp_path / "w").exists()


def test_a_workdir_not_made_by_the_script_is_refused(tmp_path):
    (tmp_path / "mine").mkdir()
    with pytest.raises(SystemExit, match="was not made by this script"):
        rm.fresh_workdir(str(tmp_path / "mine"))
    assert (tmp_path / "mine").is_dir()


def test_plan_counts_steps_and_padding_per_method():
    lengths = np.array([10, 2, 2, 2, 10, 2, 2, 2])
    grouping = {"rows": 8, "packs": 3, "sort_padding_fraction": 0.5, "pack_grad_accum": 3}
    naive = rr.planned_run("full", "naive", lengths, grouping, 2, 2, 1.0)
    assert naive["optimizer_steps"] == 2 and naive["train_tokens"] == 32 and 32 < naive["processed_tokens"] <= 80
    assert rr.planned_run("full", "sort", lengths, grouping, 2, 2, 0.5) == {
        "data": "full", "method": "sort", "optimizer_steps": 1, "train_tokens": 16, "processed_tokens": 32}
    pack = rr.planned_run("full", "pack", lengths, grouping, 2, 2, 2.0)
    assert (pack["optimizer_steps"], pack["processed_tokens"]) == (2, 64)
    assert "128 processed tokens over 2 seeds" in rr.plan_lines([pack], 2)[-1]


def run(arm, seed, **metrics):
    data, method = rr.ARMS[arm]
    return {"data": data, "method": method, "seed": seed, "train_seconds": 1.0, "long_accuracy": 0.0,
            "short_loss": 1.0, "short_accuracy": 0.0, **metrics}


def direction(name):
    return next(d for d in rr.DIRECTIONS if d[0] == name)


def test_direction_verdicts_are_computed_from_the_seeds():
    faster = [run("naive", s, train_seconds=10.0) for s in range(3)] + [run("sort", s, train_seconds=4.0)
                                                                         for s in range(3)]
    verdict = rr.direction(faster, *rr.METHOD_DIRECTIONS[0])
    assert verdict["verdict"] == "reproduced" and verdict["seeds_in_direction"] == 3
    assert verdict["gain"]["mean"] == 6.0  # seconds saved
    assert rr.summarize(faster)["speedup_vs_naive"]["sort"]["mean"] == 2.5
    assert "(speed-up 2.50 ± 0.00x)" in rr.markdown(rr.summarize(faster))
    weighting = direction("loss weighting improves long tasks over plain packing")
    mixed = [run("pack", s, long_accuracy=0.5) for s in range(3)] + [
        run("pack_weighted", s, long_accuracy=a) for s, a in enumerate((0.7, 0.4, 0.6))]
    assert rr.direction(mixed, *weighting)["verdict"] == "mixed"
    tie = [run("pack", s, long_accuracy=0.5) for s in range(2)] + [run("pack_weighted", s, long_accuracy=0.5)
                                                                  for s in range(2)]
    assert rr.direction(tie, *weighting)["verdict"] == "tie"  # equal is not the paper's direction
    worse = tie[:2] + [run("pack_weighted", 0, long_accuracy=0.5), run("pack_weighted", 1, long_accuracy=0.2)]
    assert rr.direction(worse, *weighting)["verdict"] == "not reproduced"
    assert rr.direction(tie, *rr.METHOD_DIRECTIONS[0])["verdict"] == "not measured"
    assert rr.direction(tie, *rr.METHOD_DIRECTIONS[3])["verdict"] == "not measured"  # runs without long_loss


def test_long_data_directions_compare_the_data_quantities():
    lifted = [run("0k", s, long_accuracy=0.1) for s in range(3)] + [run("full", s, long_accuracy=0.8)
                                                                     for s in range(3)]
    all_vs_none = rr.direction(lifted, *direction("long data lifts long tasks (all vs none)"))
    assert all_vs_none["verdict"] == "reproduced" and all_vs_none["gain"]["mean"] == pytest.approx(0.7)
    assert rr.direction(lifted, *direction("half the long data lifts long tasks"))["verdict"] == "not measured"
    # the shared full-data run is the methods' pack_weighted arm too
    assert rr.direction(lifted + [run("pack", s, long_accuracy=0.9) for s in range(3)],
                        *direction("loss weighting improves long tasks over plain packing"))["verdict"] == \
        "not reproduced"
    needle = rr.direction(lifted, *direction("long data lifts the needle test"))
    assert needle["verdict"] == "not measured"  # runs without needle_accuracy


def test_short_task_level_verdict_uses_the_stated_tolerance():
    spec = next(v for v in rr.LEVELS if v[2] == "full")
    tolerance = spec[4]
    within = [run("0k", s, short_loss=2.0) for s in range(3)] + [
        run("full", s, short_loss=2.0 * (1 + c)) for s, c in enumerate((0.99 * tolerance, -tolerance / 2, 0.0))]
    verdict = rr.level(within, *spec)
    assert verdict["verdict"] == "level" and verdict["seeds_within"] == 3
    outside = within[:3] + [run("full", 0, short_loss=2.0), run("full", 1, short_loss=2.0),
                            run("full", 2, short_loss=2.0 * (1 + 2 * tolerance))]
    verdict = rr.level(outside, *spec)
    assert verdict["verdict"] == "not level" and verdict["seeds_within"] == 2
    assert verdict["change"]["mean"] == pytest.approx(2 * tolerance / 3)
    assert rr.level(within[:3], *spec)["verdict"] == "not measured"
    assert rr.relative_change(0.0, 0.0) == 0.0 and rr.relative_change(1.0, 0.0) == float("inf")


def test_summary_counts_the_shared_run_in_both_experiments():
    runs = [run("full", s, long_accuracy=a) for s, a in enumerate((0.5, 0.7))]
    summary = rr.summarize(runs)
    assert summary["arms"]["full"] == summary["arms"]["pack_weighted"]
    assert summary["headline"] == {"mini_long_task_exact_match_full": pytest.approx(0.6),
                                   "mini_long_task_exact_match_pack_weighted": pytest.approx(0.6)}
