"""bench/bench_batching.py: data, configs, timing records, and the CPU smoke run end to end."""
import json
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[2]

from bench import bench_batching as bb
from bench import simulate_schedule as sim
from helpers.prewarmed_python import launch_through, shared_prewarmed_python
from longalign.constants import IGNORE_INDEX


def test_synthetic_mix_is_seeded_and_in_range():
    lengths, fractions = bb.synthetic_mix(3, 9, (8000, 9000), (100, 200), seed=1)
    again, _ = bb.synthetic_mix(3, 9, (8000, 9000), (100, 200), seed=1)
    assert lengths.tolist() == again.tolist() and len(lengths) == 12
    assert ((lengths >= 8000) & (lengths <= 9000)).sum() == 3
    assert set(fractions[lengths >= 8000]) == {0.1} and set(fractions[lengths <= 200]) == {0.5}


@pytest.fixture
def bench_python(tmp_path_factory, monkeypatch):
    """The Python processes the bench launches (its sys.executable, torchrun's PYTHON_EXEC for the
    workers) are forks of an interpreter that imported torch and transformers once, each otherwise
    as that command runs (helpers/prewarmed_python.py)."""
    return launch_through(monkeypatch, shared_prewarmed_python(tmp_path_factory))


def test_token_dataset_format_and_sort_and_group(tmp_path, bench_python):
    import datasets

    lengths, fractions = np.array([10, 7, 20, 3]), np.array([0.5, 0.5, 0.1, 0.5])
    bb.write_token_dataset(tmp_path / "d", lengths, fractions, vocab=50, seed=0)
    dataset = datasets.load_from_disk(str(tmp_path / "d"))
    assert dataset.features["input_ids"].feature.dtype == "int32"
    for ids, labels, n, f in zip(dataset["input_ids"], dataset["labels"], lengths, fractions):
        targets = int(max(1, np.ceil(n * f)))
        assert len(ids) == len(labels) == n and all(0 <= t < 50 for t in ids)
        assert labels[:n - targets] == [IGNORE_INDEX] * (n - targets) and labels[n - targets:] == ids[n - targets:]
    bb.run_sort_and_group(tmp_path / "d", group_size=2, max_length=24, seed=0)
    assert json.loads((tmp_path / "d" / "sort" / "stats.json").read_text())["repeated_rows_to_complete_last_group"] == 0
    assert (tmp_path / "d" / "pack" / "stats.json").is_file()


def test_zero_config_drops_the_optimizer_and_allows_torch_adamw_with_offload():
    no_offload = json.loads((REPO / "ds_config" / "stage3_no_offload.json").read_text())
    config = bb.zero_config(no_offload)
    assert "optimizer" not in config and "zero_force_ds_cpu_optimizer" not in config
    assert config["zero_optimization"]["stage"] == 3
    offload = bb.zero_config(json.loads((REPO / "ds_config" / "stage3.json").read_text()))
    assert "optimizer" not in offload and offload["zero_force_ds_cpu_optimizer"] is False


def test_batch_cost_features_padded_and_packed():
    from longalign.train.collators import PackCollator, PaddedCollator

    rows = [{"input_ids": [1, 2, 3], "labels": [X := IGNORE_INDEX, 2, 3]}, {"input_ids": [4, 5], "labels": [X, 5]}]
    padded = bb.batch_cost_features(PaddedCollator("sequence", 0)(rows))
    assert padded == {"cost_tokens": 6, "cost_sum_sq": 18, "tokens": 5, "sequences": 2}
    pack = {"input_ids": [1, 2, 3, 4, 5], "labels": [X, 2, 3, X, 5], "cu_seqlens": [0, 3, 5]}
    packed = bb.batch_cost_features(PackCollator("sequence")([pack]))
    assert packed == {"cost_tokens": 5, "cost_sum_sq": 13, "tokens": 5, "sequences": 2}


def fake_record(seconds, lengths, flags, start=100.0):
    micro, t = [], start
    for s, n, f in zip(seconds, lengths, flags):
        micro.append({"cost_tokens": n, "cost_sum_sq": n * n, "tokens": n, "sequences": 1, "start": t,
                      "seconds": s, "optimizer_step": f})
        t += s
    return {"micro_steps": micro, "world_size": 2}


def test_merge_records_takes_the_slowest_rank_and_counts_every_sequence():
    rank0 = fake_record([1.0, 2.0, 1.0, 1.0], [10, 20, 10, 10], [False, True, False, True])
    rank1 = fake_record([1.5, 1.0, 1.0, 3.0], [15, 5, 10, 30], [False, True, False, True])
    rank0["step_ends"] = [103.5, 108.0]  # steps of 3.5 s and 4.5 s
    rank0["log_history"] = [{"loss": 1.0, "step": 1}, {"train_runtime": 9.0}]
    summary, rows = bb.merge_records([rank0, rank1], "sort")
    assert [row["seconds"] for row in rows] == [1.5, 2.0, 1.0, 3.0]
    assert rows[0]["ranks"][1]["cost_tokens"] == 15
    assert summary["epoch_seconds"] == pytest.approx(8.0) and summary["step_seconds"] == pytest.approx([3.5, 4.5])
    assert summary["sequences_trained"] == 8 and summary["tokens_trained"] == 110
    assert summary["seconds_per_sequence"] == pytest.approx(1.0)
    assert summary["steady_seconds_per_sequence"] == pytest.approx(4.5 / 4)
    assert summary["train_runtime"] == 9.0 and summary["optimizer_steps"] == 2
    assert bb.speedups({"naive": {"seconds_per_sequence": 3.0}, "pack": {"seconds_per_sequence": 1.5}}) == \
        {"speedup_pack_vs_naive": 2.0}


@pytest.mark.slow
def test_launch_commands():
    args = bb.parse_args(["--num_gpus", "4"])
    command = bb.launch_command(args, Path("/x/spec.json"))
    assert command[1:6] == ["-m", "deepspeed.launcher.runner", "--num_gpus", "4", "--master_port"]
    assert command[-2:] == ["worker", "/x/spec.json"] and "--no_local_rank" in command
    argv = bb.train_argv(args, "pack", Path("d"), Path("m"), Path("o"), Path("ds.json"))
    assert argv[argv.index("--gradient_accumulation_steps") + 1] == "1" and "--pack_loss" in argv
    assert "--deepspeed" in argv and "--bf16" in argv and "--gradient_checkpointing" in argv
    smoke = bb.parse_args(["--smoke", "--num_gpus", "1"])
    assert bb.launch_command(smoke, Path("s.json"))[1:] == [str(REPO / "bench" / "bench_batching.py"), "worker", "s.json"]
    with pytest.raises(SystemExit):
        bb.parse_args(["--num_gpus", "5"])  # 168 sequences do not split over 5 GPUs


@pytest.mark.slow
@pytest.mark.subprocess
@pytest.mark.parametrize("num_gpus,methods", [(1, ["pack", "sort", "naive"]), (2, ["pack", "naive"])])
def test_smoke_run_end_to_end_and_simulator_fit(tmp_path, num_gpus, methods, bench_python):
    """The bench's parent runs here; sort_and_group.py and every method's workers (torchrun with 2
    ranks) run in the processes it launches (through `bench_python`)."""
    out = tmp_path / "batching.json"
    returned = bb.main(["--smoke", "--num_gpus", str(num_gpus), "--workdir", str(tmp_path / "w"), "--out", str(out),
                        "--methods", *methods])
    result = json.loads(out.read_text())
    assert result == json.loads(json.dumps(returned))
    assert set(result["methods"]) == set(methods) and result["speedup_pack_vs_naive"] > 0
    for summary in result["methods"].values():
        assert summary["sequences_trained"] == result["data"]["sequences"] == 8  # the same sequences
        assert summary["seconds_per_sequence"] > 0 and len(summary["step_seconds"]) == summary["optimizer_steps"]
        assert all("step_tokens" in e for e in summary["trainer_logs"])
    assert {len(row["ranks"]) for row in result["step_costs"]} == {num_gpus}
    fits = sim.fit_from_bench(result, min_points=3)  # a smoke run has a few steps: plumbing only
    assert set(fits) == {"padded", "packed"}
