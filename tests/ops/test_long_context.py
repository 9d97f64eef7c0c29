"""ALST's single-GPU pieces (longalign/train/speed/long_context.py) leave the step unchanged; bench_long_context smoke."""
import json

import pytest
import torch

from longalign.train.collators import PackCollator
from helpers.prewarmed_python import launch_through, shared_prewarmed_python
from helpers.training_models import tiny_chatglm, tiny_llama

needs_deepspeed = pytest.mark.skipif(__import__("importlib").util.find_spec("deepspeed") is None,
                                     reason="deepspeed is not installed")


def packed_batch(vocab=128, seed=0):
    g = torch.Generator().manual_seed(seed)
    rows = []
    for lengths in ([20, 9, 31], [44]):
        ids = torch.randint(1, vocab, (sum(lengths),), generator=g).tolist()
        rows.append({"input_ids": ids, "labels": ids, "cu_seqlens": [0, *torch.tensor(lengths).cumsum(0).tolist()]})
    batch = PackCollator("sequence")(rows)
    batch.pop("batch_counts")
    return batch


@pytest.fixture(scope="module")
def one_rank_deepspeed(tmp_path_factory):
    """deepspeed.comm on a one-process gloo group (DeepSpeed's checkpointing logs by rank), met
    through a file of its own (no port another test process could hold). Without DeepSpeed's
    shared-memory collectives op: its CPU communication backend JIT-compiles that op for ranks on one
    host (about a minute on 2 cores whenever the torch_extensions cache is cold or was built from
    another checkout), and a group of one process never uses it."""
    import deepspeed
    from deepspeed.ops.op_builder.cpu.comm import ShareMemCommBuilder

    store = tmp_path_factory.mktemp("one_rank_deepspeed") / "store"
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(deepspeed.ops.__compatible_ops__, ShareMemCommBuilder.NAME, False)
        deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False, init_method=f"file://{store}",
                                   rank=0, world_size=1)
    yield
    torch.distributed.destroy_process_group()


def loss_and_grads(model, batch):
    model.zero_grad(set_to_none=True)
    loss = model(**batch, loss_aggregation="mean").loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.integration
@needs_deepspeed
@pytest.mark.parametrize("build", [tiny_llama, tiny_chatglm], ids=["llama", "chatglm"])
@pytest.mark.parametrize("piece", ["tile_mlps", "offload_checkpoints_to_cpu", "both"])
def test_alst_pieces_give_the_same_step(build, piece, one_rank_deepspeed, monkeypatch):
    """On the CPU the offload runs DeepSpeed's GPU code path (its asynchronous offload engine): the
    CPU accelerator is reported as not synchronized, which is what selects that path."""
    from deepspeed.accelerator import get_accelerator
    from longalign.train.speed import long_context
    if piece != "tile_mlps" and not torch.cuda.is_available():
        monkeypatch.setattr(get_accelerator(), "is_synchronized_device", lambda: False)
    torch.manual_seed(0)
    model = build(hidden_size=32).train()  # hidden 32 < 104 tokens: the MLPs run in 4 tiles
    batch = packed_batch()
    ref_loss, ref = loss_and_grads(model, batch)
    if piece in ("tile_mlps", "both"):
        assert long_context.tile_mlps(model) == 2
    if piece in ("offload_checkpoints_to_cpu", "both"):
        assert long_context.offload_checkpoints_to_cpu(model) == 2
    loss, grads = loss_and_grads(model, batch)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=1e-6)
    assert grads.keys() == ref.keys()
    for name in ref:
        torch.testing.assert_close(grads[name], ref[name], rtol=1e-5, atol=1e-6, msg=name)


@needs_deepspeed
def test_offload_refuses_the_cpu_accelerator_with_the_reason(one_rank_deepspeed):
    from longalign.train.speed.long_context import offload_checkpoints_to_cpu
    if torch.cuda.is_available():
        pytest.skip("runs on a GPU there")
    with pytest.raises(NotImplementedError, match="empties it"):
        offload_checkpoints_to_cpu(tiny_llama())


def test_mlp_tiles_follow_deepspeed_rule():
    from longalign.train.speed.long_context import mlp_tiles
    assert mlp_tiles(65536, 2048) == 32 and mlp_tiles(100, 2048) == 1 and mlp_tiles(2049, 2048) == 2


@pytest.mark.slow
@pytest.mark.subprocess
@needs_deepspeed
def test_bench_long_context_smoke(tmp_path, tmp_path_factory, monkeypatch):
    """One subprocess per length (CPU, tiny); an out-of-memory child is a recorded row, not a crash.
    The parent runs here (its rows come from the children's processes); the children get one thread
    and are forks of an interpreter that imported torch and transformers once (helpers/prewarmed_python.py)."""
    import bench_long_context as bench

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    launch_through(monkeypatch, shared_prewarmed_python(tmp_path_factory))
    out = tmp_path / "long.jsonl"
    returned = bench.main(["--smoke", "--out", str(out), "--configs", "--recompute full --tiled_mlp"])
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert rows == json.loads(json.dumps(returned))
    assert [r["config"] for r in rows] == ["--recompute full --tiled_mlp"] * 2
    for r in rows:
        assert r["status"] == "ok", r
        assert r["tokens_per_s"] > 0 and r["mfu"] > 0 and r["loss_finite"]  # CPU: the MFU itself is noise
        assert r["tiled_mlp"] and r["grad_rel_diff"] < 1e-5 and r["loss_rel_diff"] < 1e-6  # vs plain full recompute
        memory = r["memory_gib"]
        assert memory["weights"] > 0 and memory["optimizer"] >= 2 * memory["weights"] * 0.99
    assert sorted({r["pack_tokens"] for r in rows}) == [256, 512]


@pytest.mark.slow
def test_an_out_of_memory_length_is_recorded_and_longer_ones_skipped(monkeypatch, capsys):
    import bench_long_context as bench

    def fake_child(config, length, args, timeout_s):
        status = "ok" if length < 512 else "oom"
        return {"config": config, "pack_tokens": length, "status": status, "oom_phase": "backward",
                "step_seconds": 1.0, "tokens_per_s": 1.0, "mfu": 0.1, "memory_gib": {}}

    monkeypatch.setattr(bench, "run_one", fake_child)
    rows = bench.run_all(bench.parse_args(["--smoke", "--lengths", "256,512,1024", "--configs", "--recompute full"]))
    assert [r["status"] for r in rows] == ["ok", "oom", "skipped"]
    assert rows[2]["reason"] == "oom at 512 tokens"
    assert "oom: backward" in capsys.readouterr().out


def test_long_packs_are_64k_packs_laid_end_to_end():
    import bench_long_context as bench
    assert bench.concatenated([{"input_ids": [1] * 8, "labels": [1] * 8, "cu_seqlens": [0, 5, 8]},
                               {"input_ids": [2] * 8, "labels": [2] * 8, "cu_seqlens": [0, 8]}])["cu_seqlens"] == [0, 5, 8, 16]
    rows = bench.long_packs(2, 512, 128, vocab=64, seed=0)
    for row in rows:
        assert len(row["input_ids"]) == len(row["labels"]) == row["cu_seqlens"][-1] <= 512
        lengths = [b - a for a, b in zip(row["cu_seqlens"][:-1], row["cu_seqlens"][1:])]
        assert max(lengths) <= 128 and min(lengths) > 0
    assert len(bench.long_packs(1, 512, 0, vocab=64, seed=0)[0]["input_ids"]) <= 512


def test_offload_policy_child_checks_itself_against_full_recompute(tmp_path):
    """--recompute offload in the long-context bench: the child's step equals plain full recompute
    (loss, gradient norms) before it is timed."""
    import bench_long_context as bench

    row = bench.run_child(bench.parse_args(["--smoke", "--child", "--pack_tokens", "256", "--recompute", "offload"]))
    assert row["status"] == "ok" and row["recompute"] == "offload"
    assert row["grad_rel_diff"] < 1e-5 and row["loss_rel_diff"] < 1e-6
    assert row["grad_norm"] == pytest.approx(row["reference_grad_norm"], rel=1e-5)


def test_offload_beyond_host_memory_is_refused_before_running(monkeypatch):
    """An offload that would not fit the machine's RAM is a `host_memory` row, not a host OOM."""
    import bench_long_context as bench

    monkeypatch.setattr(bench, "HOST_MEMORY_FRACTION", 1e-9)
    for config in (["--recompute", "offload"], ["--recompute", "full", "--offload_checkpoints"]):
        row = bench.run_child(bench.parse_args(["--smoke", "--child", "--pack_tokens", "256", *config]))
        assert row["status"] == "host_memory" and row["host_offload_gib"] > 0
