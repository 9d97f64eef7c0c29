"""`make demo` end to end (scripts/demo.sh in a temp OUT, fewer steps), and longalign.demo.tiny_model."""
import json
import os
import subprocess
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]

from helpers.prewarmed_python import shared_prewarmed_python
from longalign.demo.tiny_model import STATS_FILE, TinyShape, main as tiny_model_main, save_tiny_model

TEST_STEPS = 20  # a few % of the demo's default: plumbing, and a clear fall from the random-init loss
LOG_STEPS = 5
MIN_LOSS_DROP = 0.5  # nats between the first and the last logged loss (the demo falls ~2 in 20 steps)
TEST_DATA = {"DEMO_NUM_LONG": "24", "DEMO_NUM_SHORT": "200", "DEMO_EVAL_PER_TASK": "2"}
TEST_EVAL_SHORT = 5  # held-out short-task rounds scored (the demo's default: 20)
# the needle test's answers: a few tokens (its default of 64 is room for the whole needle sentence);
# each stage one intra-op thread (tiny models: a second thread buys nothing, and costs much on a busy CPU)
TEST_RUN = {"DEMO_EVAL_SHORT": str(TEST_EVAL_SHORT), "MAX_NEW_TOKENS": "16", "OMP_NUM_THREADS": "1"}
STAGES = ["data", "pre_tokenize", "sort_and_group", "model_init", "eval_base", "train", "eval_trained", "needle"]
# a base pretrained on the spot in seconds (the shipped one is tested in test_demo_base.py)
TEST_BASE_FLAGS = ["--steps", "20", "--batch", "4", "--context", "128", "--hidden", "32", "--heads", "4",
                   "--kv_heads", "2", "--intermediate", "64", "--layers", "2", "--vocab", "600", "--eval_examples", "2",
                   "--max_words", "80"]
DEMO_TIMEOUT_S = 600
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
SMALL = TinyShape(hidden=32, layers=2, heads=4, kv_heads=2, intermediate=64, max_positions=256)


# ---------- the demo ----------
MIXES = {"scratch": "few_words", "base": "few_words"}  # each start's default short-task mix
CONTEXTS = {"scratch": 2048, "base": 1024}  # each start's default longest query (scripts/demo.sh)


@pytest.fixture(scope="module", params=list(MIXES))
def demo(request, tmp_path_factory):
    """Run scripts/demo.sh once per start (random weights; a pretrained base), with fewer steps,
    less data, a smaller held-out set and shorter needle-test answers. Its PY: demo.sh runs a dozen
    Python processes per start, most of whose seconds go to importing torch and transformers; here
    each is a fork of one interpreter that imported them once, and otherwise runs as that command
    would (helpers/prewarmed_python.py)."""
    from longalign.demo.pretrain import main as pretrain_main

    out = tmp_path_factory.mktemp("demo") / "out"
    base, schedule = "", {}
    if request.param == "base":
        base = tmp_path_factory.mktemp("demo_base") / "base"
        pretrain_main(["--out", str(base), *TEST_BASE_FLAGS])
        schedule = {"DEMO_LR": "3e-3", "DEMO_WARMUP": "2"}  # the scratch defaults' rate, for 20 steps
    python, python_env = shared_prewarmed_python(tmp_path_factory)
    env = {**os.environ, "OUT": str(out), "DEMO_STEPS": str(TEST_STEPS), "DEMO_LOG_STEPS": str(LOG_STEPS),
           "PY": python, **python_env, "DEMO_BASE": str(base), **TEST_DATA, **TEST_RUN, **schedule}
    env.pop("HAYSTACK", None)
    proc = subprocess.run(["bash", str(REPO / "scripts" / "demo.sh")], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=DEMO_TIMEOUT_S)
    assert proc.returncode == 0, f"demo.sh failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return out, proc.stdout, request.param


def printed(stdout: str, prefix: str) -> list[str]:
    return [line[len(prefix):].strip() for line in stdout.splitlines() if line.startswith(prefix)]


def test_demo_datasets(demo):
    import datasets

    out, _, _ = demo
    columns = {"llama/10k": {"input_ids", "labels"}, "llama/10k/sort": {"input_ids", "labels"},
               "llama/10k/pack": {"input_ids", "labels", "loss_weights", "cu_seqlens", "num_sequences"}}
    for sub, needed in columns.items():
        dataset = datasets.load_from_disk(str(out / sub))
        assert len(dataset) > 0 and needed <= set(dataset.column_names), sub
    raw = json.loads((out / "raw" / "stats.json").read_text())
    total = json.loads((out / "llama/10k" / "stats.json").read_text())["total"]
    assert len(datasets.load_from_disk(str(out / "llama/10k"))) == total["kept"]  # every row kept or counted
    assert total["rows_read"] == raw["long_rows"] + raw["short_rows"] == total["kept"] + total["skipped_too_long"]


def test_demo_prints_every_stats_file(demo):
    out, stdout, _ = demo
    paths = [Path(p) for p in printed(stdout, "[demo] stats:")]
    expected = [out / "raw/stats.json", out / "llama/10k/stats.json", out / "llama/10k/sort/stats.json",
                out / "llama/10k/pack/stats.json", out / "model_init" / STATS_FILE, out / "eval/base.json",
                out / "model/trainer_state.json", out / "eval/trained.json", out / "needle/prompts/stats.json"]
    assert set(expected) <= set(paths)
    for path in paths:
        json.loads(path.read_text())  # exists and is complete JSON
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")], "temporary outputs left behind"


def test_demo_training_loss_fell(demo):
    out, stdout, _ = demo
    state = json.loads((out / "model" / "trainer_state.json").read_text())
    losses = [entry["loss"] for entry in state["log_history"] if "loss" in entry]
    assert state["global_step"] == TEST_STEPS and len(losses) == TEST_STEPS // LOG_STEPS
    assert losses[-1] < losses[0] - MIN_LOSS_DROP, losses
    line = printed(stdout, "[demo] loss:")
    assert line and f"{losses[0]:.3f}" in line[0] and f"{losses[-1]:.3f}" in line[0]


def test_demo_model_reloads_and_differs_from_init(demo):
    from longalign.eval.generation import load_model_and_tokenizer

    out, stdout, _ = demo
    assert printed(stdout, "[demo] trained model:") == [str(out / "model")]
    model, tokenizer, family = load_model_and_tokenizer(str(out / "model"), device="cpu")
    init, _, _ = load_model_and_tokenizer(str(out / "model_init"), device="cpu")
    assert family == "llama" and model.config.vocab_size == len(tokenizer)
    ids = torch.tensor([tokenizer("[INST]What is 2 plus 3?[/INST]")["input_ids"]])
    with torch.no_grad():
        logits, init_logits = model(ids).logits, init(ids).logits
    assert logits.shape == (1, ids.shape[1], len(tokenizer))
    assert not torch.allclose(logits, init_logits), "training did not change the weights"


def test_demo_needle_heatmap(demo):
    out, stdout, _ = demo
    heatmap = Path(printed(stdout, "[demo] heatmap:")[-1])
    assert heatmap == out / "needle/results/heatmap_match.png"
    assert heatmap.read_bytes().startswith(PNG_MAGIC)
    summary = json.loads((out / "needle/results/summary_match.json").read_text())
    prompts = json.loads((out / "needle/prompts/stats.json").read_text())
    assert summary["scored"] == prompts["written"] > 0
    assert Path(prompts["haystack_dir"]).resolve() == (out / "raw/haystack").resolve()  # the demo's own text


def test_demo_held_out_retrieval_reports(demo):
    out, _, start = demo
    for name in ("base", "trained"):
        report = json.loads((out / "eval" / f"{name}.json").read_text())
        assert report["disjoint"]["overlaps"] == 0 and report["seed"] != report["data_seed"]
        assert set(report["per_task"]) == {"needle", "kv", "fact"} and len(report["examples"]) == 6
        assert set(report["unseen_kind"]["per_task"]) == {"magic"} and len(report["unseen_kind"]["examples"]) == 2
        assert report["query_tokens"]["max"] <= report["context_tokens"] == CONTEXTS[start]
        assert report["short"]["mix"] == MIXES[start] and len(report["short"]["examples"]) == TEST_EVAL_SHORT


def test_demo_summary_table(demo):
    out, stdout, start = demo
    summary = json.loads((out / "summary.json").read_text())
    assert [s["stage"] for s in summary["stages"]] == STAGES
    assert summary["training"]["steps"] == TEST_STEPS and summary["training"]["tokens_trained_logged"] > 0
    state = json.loads((out / "model" / "trainer_state.json").read_text())
    assert summary["training"]["loss_first"] == state["log_history"][0]["loss"]
    table = (out / "summary.md").read_text()
    assert table in stdout and "held-out retrieval exact match" in table and "needle test mean score" in table
    assert "held-out short tasks exact match" in table and summary["short"]["mix"] == MIXES[start]
    assert "a needle kind never trained on" in table and "before -> after training" in table
    assert printed(stdout, "[demo] summary:") == [f"{out / 'summary.md'}, {out / 'summary.json'}"]


# ---------- longalign.demo.tiny_model ----------
@pytest.mark.parametrize("family", ["llama", "chatglm"])
def test_tiny_model_matches_tokenizer_and_trains(family, tiny_tokenizer_dir, tiny_tokenizer, tmp_path):
    from longalign.modeling.loading import load_training_model

    summary = save_tiny_model(family, tiny_tokenizer_dir, tmp_path / "m", SMALL, seed=1)
    model = load_training_model(tmp_path / "m", dtype=torch.float32)
    config = model.config
    assert config.vocab_size == len(tiny_tokenizer) == summary["vocab_size"]
    assert (config.pad_token_id, config.eos_token_id) == (tiny_tokenizer.pad_token_id, tiny_tokenizer.eos_token_id)
    assert summary["parameters"] == sum(p.numel() for p in model.parameters())
    assert json.loads((tmp_path / "m" / STATS_FILE).read_text())["family"] == family
    ids = torch.tensor([tiny_tokenizer("The key is 42. The key is 42.")["input_ids"]])
    loss = model(ids, labels=ids, cu_seq_lens_q=torch.tensor([0, ids.shape[1]], dtype=torch.int32)).loss
    assert torch.isfinite(loss) and loss.item() > 0
    loss.backward()


def test_tiny_model_cli_is_seeded_and_replaces_output(tiny_tokenizer_dir, tmp_path, capsys):
    from safetensors.torch import load_file

    args = ["--family", "llama", "--tokenizer", tiny_tokenizer_dir, "--hidden", "32", "--intermediate", "64"]
    tiny_model_main(args + ["--out", str(tmp_path / "a")])
    tiny_model_main(args + ["--out", str(tmp_path / "b")])
    tiny_model_main(args + ["--out", str(tmp_path / "c"), "--seed", "7"])
    a, b, c = (load_file(str(tmp_path / d / "model.safetensors")) for d in "abc")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)
    (tmp_path / "a" / "stale.txt").write_text("old run")
    tiny_model_main(args + ["--out", str(tmp_path / "a")])
    assert not (tmp_path / "a" / "stale.txt").exists()
    assert (tmp_path / "a" / "tokenizer.json").is_file()
    assert json.loads(capsys.readouterr().out.splitlines()[-1])["hidden"] == 32


@pytest.mark.parametrize("bad", [["--hidden", "30"], ["--kv_heads", "3"], ["--layers", "0"]])
def test_tiny_model_rejects_bad_shapes(bad, tiny_tokenizer_dir, tmp_path):
    with pytest.raises(SystemExit, match="must be"):
        tiny_model_main(["--family", "llama", "--tokenizer", tiny_tokenizer_dir, "--out", str(tmp_path), *bad])


def test_tiny_model_tied_embeddings(tiny_tokenizer_dir, tmp_path):
    from longalign.modeling.loading import load_training_model

    args = ["--family", "llama", "--tokenizer", tiny_tokenizer_dir, "--hidden", "32", "--intermediate", "64"]
    tied = tiny_model_main(args + ["--out", str(tmp_path / "tied"), "--tie_embeddings"])
    untied = tiny_model_main(args + ["--out", str(tmp_path / "untied")])
    assert untied["parameters"] - tied["parameters"] == 32 * len(json.loads(
        (tmp_path / "tied" / "tokenizer.json").read_text())["model"]["vocab"])  # one vocab x hidden matrix less
    model = load_training_model(tmp_path / "tied", dtype=torch.float32)
    assert model.lm_head.weight is model.model.embed_tokens.weight  # still one tensor after loading
    with pytest.raises(SystemExit, match="tie_embeddings is for llama"):
        tiny_model_main(["--family", "chatglm", "--tokenizer", tiny_tokenizer_dir, "--out", str(tmp_path / "g"),
                         "--tie_embeddings"])


def test_demo_report_tokens_and_table():
    from longalign.demo.report import markdown, training_summary

    state = {"global_step": 30, "log_history": [
        {"step": 10, "loss": 5.0, "step_tokens": 100.0}, {"step": 30, "loss": 1.0, "step_tokens": 50.0},
        {"step": 30, "train_runtime": 9.0}]}
    summary = training_summary(state)
    assert summary["tokens_trained_logged"] == 10 * 100 + 20 * 50  # step_tokens x steps of its window
    assert (summary["loss_first"], summary["loss_last"], summary["loss_last_step"]) == (5.0, 1.0, 30)
    per_task = {"needle": {"correct": 9, "total": 10}}
    table = markdown({"stages": [{"stage": "train", "seconds": 12.0}], "total_seconds": 12.0,
                      "load_average": [1.0, 2.0, 3.0], "training": summary,
                      "retrieval": {"base": 0.0, "trained": 0.9, "trained_per_task": per_task,
                                    "query_tokens": {"min": 1900, "max": 2048}},
                      "unseen_kind": {"base": 0.0, "trained": 0.7, "per_task": {"magic": {"correct": 7, "total": 10}}},
                      "short": {"mix": "few_words", "examples": 20, "base": 0.0, "trained": 0.55},
                      "needle": {"mean_score": 7.5, "scored": 20, "heatmap": "h.png"}})
    assert "| train | 12 |" in table and "0% -> **90%** (needle 9/10" in table and "**7.5**" in table
    assert "0% -> **55%** (20 first rounds of mix few_words)" in table and "0% -> **70%** (magic 7/10)" in table
    assert "2,000 in 30 steps" in table and "5.000 (step 10) -> 1.000 (step 30)" in table
