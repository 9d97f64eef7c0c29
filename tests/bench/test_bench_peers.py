"""bench/bench_peers.py: headline and goals from rows, the one-process-per-configuration smoke run
(same packs and FLOP count for the project and stock transformers), the padding-free batches of
the stock peer, the loss comparison; bench_train_step's paper-width presets."""
import json

import pytest
import torch
from transformers import DataCollatorWithFlattening

import bench_peers
import bench_train_step
import peer_models
from helpers.prewarmed_python import launch_through, shared_prewarmed_python
from longalign.train.collators import PackCollator


def row(name, system, seconds, peak, attention, recompute="full", compile=False, liger=False, mfu=None):
    return {"config": name, "name": name, "system": system, "step_seconds": seconds, "peak_memory_gib": peak,
            "mfu": mfu if mfu is not None else 1.0 / seconds, "attention": attention, "attn_backend": attention,
            "recompute": recompute, "compile": compile, "liger": liger}


ROWS = [
    row("stock-flex-gc-liger", "stock", 3.0, 18.0, "flex_attention", "gradient_checkpointing", liger=True),
    row("stock-flex-gc", "stock", 3.5, 41.0, "flex_attention", "gradient_checkpointing"),
    row("stock-fa4-gc-liger+kwargs", "stock", 2.4, 20.0, "flash_attention_4", "gradient_checkpointing", liger=True),
    {"config": "stock-fa4-gc-liger", "name": "stock-fa4-gc-liger", "system": "stock", "error": "IntTuple"},
    row("project-fa4-full", "project", 2.5, 20.5, "flash_attn_cute"),
    row("project-fa4-full-compile", "project", 2.0, 18.3, "flash_attn_cute", compile=True),
    row("project-fa4-selective-compile", "project", 1.8, 40.0, "flash_attn_cute", "selective", compile=True),
    row("project-flex-full", "project", 3.6, 20.8, "flex"),
    row("project-fa4-none-compile", "project", 1.6, 105.0, "flash_attn_cute", "none", compile=True),
    row("project-defaults", "project", 1.7, 90.0, "flash_attn_cute", "selective:5", compile=True),
    {"config": "stock-sdpa-gc-liger", "skipped": "skipped: 480 s budget spent"},
]


def test_headline_from_measured_rows():
    head = bench_peers.headline(ROWS)
    assert head["peer_best"] == "stock-fa4-gc-liger+kwargs" and head["peer_best_mfu_64k"] == pytest.approx(1 / 2.4)
    # equal memory: peak <= 20.0 * 1.03 = 20.6 GiB -> project-fa4-full (20.5) and -full-compile (18.3) qualify
    assert head["equal_memory_project"] == "project-fa4-full-compile"
    assert head["speedup_vs_best_peer_equal_memory"] == pytest.approx(2.4 / 2.0)
    same = head["same_kernel"]
    assert same["fa4"] == {"peer": "stock-fa4-gc-liger+kwargs", "project": "project-fa4-full",
                           "speedup": pytest.approx(2.4 / 2.5)}
    assert same["flex"]["peer"] == "stock-flex-gc-liger" and same["flex"]["speedup"] == pytest.approx(3.0 / 3.6)
    assert head["speedup_same_kernel_no_compile"] == pytest.approx(3.0 / 3.6)
    assert head["mfu_checkpointed_best"] == pytest.approx(1 / 1.8)  # `none` and `selective:5` are not "every layer"
    assert head["mfu_partially_checkpointed_best"] == pytest.approx(1 / 1.7) and head["mfu_best"] == pytest.approx(1 / 1.6)
    assert head["defaults_vs_best"] == pytest.approx(1.6 / 1.7)


def test_equal_memory_tolerance_is_a_hard_limit():
    rows = [row("stock-x", "stock", 2.0, 20.0, "flex_attention"),
            row("project-big", "project", 1.0, 20.0 * (1 + bench_peers.EQUAL_MEMORY_TOLERANCE) + 0.01, "flex")]
    assert bench_peers.headline(rows)["speedup_vs_best_peer_equal_memory"] is None
    rows.append(row("project-small", "project", 1.5, 19.0, "flex"))
    assert bench_peers.headline(rows)["speedup_vs_best_peer_equal_memory"] == pytest.approx(2.0 / 1.5)


def test_goals_met_not_met_not_measured():
    status = {g["key"]: g["status"] for g in bench_peers.goals(bench_peers.headline(ROWS))}
    assert status == {"mfu_checkpointed_best": "not met", "speedup_vs_best_peer_equal_memory": "not met",
                      "speedup_same_kernel_no_compile": "not met", "defaults_vs_best": "not met"}
    empty = bench_peers.goals(bench_peers.headline([]))
    assert {g["status"] for g in empty} == {"not measured"}
    assert "met" == bench_peers.goals({"mfu_checkpointed_best": 0.61})[0]["status"]


def test_stock_batches_are_the_project_packs_padding_free():
    (pack,) = bench_train_step.synthetic_packs(1, 512, 256, seed=3)
    stock = DataCollatorWithFlattening(return_flash_attn_kwargs=True)(peer_models.flattened_features(pack))
    ours = PackCollator("sequence")([pack])
    assert torch.equal(stock["input_ids"], ours["input_ids"])
    assert torch.equal(stock["position_ids"], ours["position_ids"])  # restarting at every sequence
    assert torch.equal(stock["cu_seq_lens_q"].to(torch.int32), ours["cu_seq_lens_q"])
    assert stock["max_length_q"] == ours["max_length_q"] and isinstance(stock["max_length_q"], int)
    starts = ours["cu_seq_lens_q"][:-1].long()
    assert (stock["labels"][0, starts] == -100).all()  # no target crosses a sequence start


@pytest.mark.slow
def test_smoke_run_one_process_per_configuration(tmp_path, tmp_path_factory, monkeypatch):
    """Each configuration's process is a fork of an interpreter that imported torch and transformers
    once (helpers/prewarmed_python.py), with one thread: tiny steps."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    launch_through(monkeypatch, shared_prewarmed_python(tmp_path_factory))
    out = tmp_path / "peers.json"
    names = ["project-reference-full", "stock-sdpa-gc+kwargs", "stock-sdpa-gc-liger"]
    bench_peers.main(["--smoke", "--only", *names, "--out", str(out)])
    report = json.loads(out.read_text())
    rows = {r["config"]: r for r in report["rows"]}
    assert list(rows) == names
    ours, stock = rows["project-reference-full"], rows["stock-sdpa-gc+kwargs"]
    assert ours["loss_finite"] and stock["loss_finite"]
    # same packs, same model, same FLOP count
    assert ours["tokens_per_step"] == stock["tokens_per_step"] and ours["params"] == stock["params"]
    assert ours["model_tflops_per_step"] == pytest.approx(stock["model_tflops_per_step"])
    liger_row = rows["stock-sdpa-gc-liger"]
    assert ("error" in liger_row) != ("step_seconds" in liger_row)  # recorded either way
    assert report["headline"]["peer_best"] == "stock-sdpa-gc+kwargs"
    table = out.with_suffix(".md").read_text()
    assert all(name in table for name in names) and "| goal |" in table


@pytest.mark.slow
def test_budget_spent_configurations_are_recorded_as_skipped(tmp_path):
    out = tmp_path / "peers.json"
    bench_peers.main(["--smoke", "--budget_s", "0", "--out", str(out)])
    rows = json.loads(out.read_text())["rows"]
    assert len(rows) == len(bench_peers.SMOKE_CONFIGS) and all("skipped" in r for r in rows)
    assert all(r["system"] for r in rows)  # the configuration is described even when skipped


@pytest.mark.slow
def test_loss_comparison_runs_the_project_loss_and_records_the_other():
    result = peer_models.loss_comparison(bench_train_step.parse_args(["--smoke"]))
    ours = result["losses"]["project_chunked"]
    assert ours["seconds"] > 0 and ours["loss"] > 0
    theirs = result["losses"]["liger_fused_none_weighted"]
    assert ("error" in theirs) == (result["agreement"] is None)


@pytest.mark.slow
def test_width_presets_and_layers_auto():
    glm = bench_train_step.main(["--smoke", "--width", "chatglm3-6b", "--layers", "auto", "--recompute", "auto",
                                 "--gpu_gib", "0.005", "--attn_backend", "reference"])
    assert glm["family"] == "chatglm" and glm["width"] == "chatglm3-6b" and glm["loss_finite"]
    assert 1 <= glm["layers"] <= glm["depth"] and glm["predicted_peak_gib"] <= 0.9 * 0.005
    llama = bench_train_step.main(["--smoke", "--width", "llama2-7b", "--layers", "2", "--recompute", "full",
                                   "--attn_backend", "reference"])
    assert llama["layers"] == 2 and llama["depth"] == bench_train_step.SMOKE_DEPTH
    assert llama["step_seconds_scaled_to_depth"] == pytest.approx(llama["step_seconds"] * llama["depth"] / 2)
    with pytest.raises(SystemExit):
        bench_train_step.parse_args(["--layers", "auto"])  # no width: nothing to fill up to
