"""bench/simulate_schedule.py: hand-computed schedules and costs, least-squares recovery."""
import json
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[2]

from bench import simulate_schedule as sim

# t = 1 + l + 0.5 l^2 for one sequence alone: l=4 -> 13, 3 -> 8.5, 2 -> 5, 1 -> 2.5
MODEL = sim.CostModel(c0=1.0, c1=1.0, c2=0.5, c_opt=0.25)
LENGTHS = [4, 1, 3, 2]


def test_features():
    assert sim.padded_features([3, 5]) == (10, 50)
    assert sim.packed_features([3, 5]) == (8, 34)
    assert sim.padded_features([]) == (0, 0)


def test_naive_two_gpus_four_sequences():
    steps = sim.schedule_from_order(LENGTHS, [0, 1, 2, 3], world=2, batch=1)
    assert steps == [[[4], [1]], [[3], [2]]]
    # max(13, 2.5) + max(8.5, 5) + 2 optimizer steps x 0.25
    assert sim.schedule_seconds(steps, MODEL, packed=False, grad_accum=1)["seconds"] == pytest.approx(22.0)
    # batch 2 padded to the longest: rank 0 [4 1] -> (8, 32) -> 25, rank 1 [3 2] -> (6, 18) -> 16
    steps = sim.schedule_from_order(LENGTHS, [0, 1, 2, 3], world=2, batch=2)
    assert sim.schedule_seconds(steps, MODEL, packed=False, grad_accum=1)["seconds"] == pytest.approx(25.25)


def test_naive_uses_the_seeded_permutation_and_leaves_missing_ranks_idle():
    order = np.random.default_rng(7).permutation(5)
    lengths = [4, 1, 3, 2, 6]
    assert sim.naive_schedule(lengths, 2, 1, seed=7) == sim.schedule_from_order(lengths, order, 2, 1)
    steps = sim.schedule_from_order(lengths, [0, 1, 2, 3, 4], 2, 1)
    assert steps[-1] == [[6], []]
    # 13 + 8.5 + (1 + 6 + 18 = 25); GA 2 -> 2 optimizer steps
    assert sim.schedule_seconds(steps, MODEL, False, grad_accum=2)["seconds"] == pytest.approx(47.0)


def test_sorted_two_gpus_four_sequences():
    steps = sim.sorted_schedule(LENGTHS, world=2, batch=1, seed=0)
    assert sorted(steps) == [[[2], [1]], [[4], [3]]]
    # max(13, 8.5) + max(5, 2.5) + one optimizer step (GA 2)
    assert sim.schedule_seconds(steps, MODEL, False, grad_accum=2)["seconds"] == pytest.approx(18.25)


@pytest.mark.parametrize("strategy", ["bfd", "greedy"])
def test_packed_two_gpus_four_sequences(strategy):
    steps = sim.packed_schedule(LENGTHS, world=2, max_length=5, strategy=strategy, seed=0)
    assert sorted(map(sorted, steps[0])) == [[1, 4], [2, 3]] and len(steps) == 1
    # pack [4 1]: 1 + 5 + 0.5 (16 + 1) = 14.5; pack [3 2]: 1 + 5 + 0.5 (9 + 4) = 12.5
    assert sim.schedule_seconds(steps, MODEL, True, grad_accum=1)["seconds"] == pytest.approx(14.75)


def test_simulate_ratios_and_hours():
    out = sim.simulate(LENGTHS, MODEL, MODEL, world=2, max_length=5, epochs=2.0, seed=0,
                       grad_accum={"naive": 1, "sort": 2, "pack": 1})
    naive = out["predicted"]["naive"]["seconds"]
    assert out["predicted"]["sort"]["seconds"] == pytest.approx(18.25)
    assert out["predicted"]["pack"]["seconds"] == pytest.approx(14.75)
    assert out["predicted"]["pack"]["hours"] == pytest.approx(2 * 14.75 / 3600)
    assert out["ratios"]["naive_over_pack"] == pytest.approx(naive / 14.75)
    assert sim.paper_ratios()["Llama-2-7B-64k"]["naive_over_pack"] == pytest.approx(67.2 / 23.4)


def synthetic_steps(model, n=60, ranks=3, seed=0):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(100, 65536, (n, ranks))
    features = [[(int(l), int(l) ** 2) for l in row] for row in lengths]
    flags = (np.arange(n) % 4 == 3)
    seconds = [max(model.micro_cost(x, y) for x, y in f) + model.c_opt * g for f, g in zip(features, flags)]
    return features, seconds, flags


def test_fit_recovers_known_coefficients_under_the_max_over_ranks():
    truth = sim.CostModel(c0=0.2, c1=3e-5, c2=2e-10, c_opt=0.1)
    features, seconds, flags = synthetic_steps(truth)
    model, quality = sim.fit_cost_model(features, seconds, flags)
    for name in ("c0", "c1", "c2", "c_opt"):
        assert getattr(model, name) == pytest.approx(getattr(truth, name), rel=1e-6), name
    assert quality["r2"] == pytest.approx(1.0)


def test_fit_with_a_fixed_optimizer_cost_and_constant_flags():
    features, seconds, _ = synthetic_steps(sim.CostModel(c0=0.5, c1=1e-5, c2=5e-11), ranks=1)
    seconds = [s + 0.3 for s in seconds]  # GA 1: every micro-step steps the optimizer
    model, _ = sim.fit_cost_model(features, seconds, [True] * len(seconds), fixed_opt=0.3)
    assert (model.c0, model.c1, model.c2) == pytest.approx((0.5, 1e-5, 5e-11), rel=1e-6)
    folded, _ = sim.fit_cost_model(features, seconds, [True] * len(seconds))
    assert folded.c0 == pytest.approx(0.8, rel=1e-6) and folded.c_opt == 0.0


def bench_dict(padded, packed):
    rows = []
    for method, model, ga in (("naive", padded, 4), ("sort", padded, 4), ("pack", packed, 1)):
        features, _, _ = synthetic_steps(model, n=24, ranks=2, seed=len(rows))
        for i, f in enumerate(features):
            flag = (i + 1) % ga == 0
            seconds = max(model.micro_cost(x, y) for x, y in f) + model.c_opt * flag
            rows.append({"method": method, "micro_step": i, "seconds": seconds, "optimizer_step": flag,
                         "ranks": [{"cost_tokens": x, "cost_sum_sq": y, "tokens": x, "sequences": 1} for x, y in f]})
    return {"step_costs": rows}


def test_fit_from_bench_separates_padded_and_packed():
    padded = sim.CostModel(0.3, 2e-5, 1e-10, 0.05)
    packed = sim.CostModel(0.1, 2.5e-5, 0.8e-10, 0.05)
    fits = sim.fit_from_bench(bench_dict(padded, packed))
    assert fits["padded"][0].c2 == pytest.approx(1e-10, rel=1e-6)
    assert fits["packed"][0].c0 == pytest.approx(0.1, rel=1e-6)  # c_opt taken from the padded fit
    assert fits["packed"][0].c_opt == pytest.approx(0.05, rel=1e-6)


def test_too_few_packed_points_borrow_the_padded_model_and_say_so():
    padded = sim.CostModel(0.3, 2e-5, 1e-10, 0.05)
    bench = bench_dict(padded, sim.CostModel(0.1, 2.5e-5, 0.8e-10, 0.05))
    pack_rows = [r for r in bench["step_costs"] if r["method"] == "pack"]
    bench["step_costs"] = [r for r in bench["step_costs"] if r["method"] != "pack"] + pack_rows[:5]
    fits = sim.fit_from_bench(bench, skip_first=0)
    assert fits["packed"][0] == fits["padded"][0]  # 5 points would fit 4 coefficients exactly
    assert "only 5 packed" in fits["packed"][1]["borrowed"]
    assert "borrowed" not in fits["padded"][1]


def test_cli_with_bench_json_and_real_dataset_lengths(tmp_path):
    """The command line through the script's main, in this process."""
    import datasets

    datasets.Dataset.from_dict({"input_ids": [[1] * n for n in (4, 1, 3, 2)],
                                "labels": [[1] * n for n in (4, 1, 3, 2)]}).save_to_disk(str(tmp_path / "d"))
    assert sim.dataset_lengths(str(tmp_path / "d")).tolist() == [4, 1, 3, 2]
    bench = tmp_path / "bench.json"
    bench.write_text(json.dumps(bench_dict(sim.CostModel(0.3, 2e-5, 1e-10, 0.05), sim.CostModel(0.1, 2e-5, 1e-10))))
    sim.main(["--bench_json", str(bench), "--data_dir", str(tmp_path / "d"), "--world", "2", "--max_length", "5",
              "--out", str(tmp_path / "sim.json")])
    result = json.loads((tmp_path / "sim.json").read_text())
    assert result["kind"] == "prediction" and result["sequences"] == 4
    assert set(result["predicted"]) == {"naive", "sort", "pack", "pack_greedy"}
    assert result["cost_models"]["padded"]["model"]["c1"] == pytest.approx(2e-5, rel=1e-5)
