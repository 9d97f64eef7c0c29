"""Sequence parallelism (longalign/train/sequence_parallel.py): DeepSpeed Ulysses on gloo against SP = 1.

End to end: in the suite's one torchrun launch (helpers.torchrun_cases, `torchrun
--nproc_per_node N -m helpers.torchrun_worker SPEC`), each case runs train.py's build_trainer ->
Trainer.train with --sequence_parallel_size N under DeepSpeed ZeRO-3 (CPU accelerator, gloo) for
one optimizer step on its ranks (helpers.ulysses_cases), and its gradients and logged loss are
compared with the same step written out from per-sequence runs (helpers.train_runs.reference_step)
and with SP = 1.
The slicing and loss math are also checked without DeepSpeed, rank by rank.
"""
import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]

import train  # noqa: E402
from longalign.train.collators import COUNTS_KEY, PackCollator  # noqa: E402
from longalign.constants import IGNORE_INDEX as X  # noqa: E402
from longalign.ops.weighted_loss import causal_lm_loss, labels_for_targets, shift_targets  # noqa: E402
from longalign.train.sequence_parallel import (SequenceParallelPackCollator, check_head_counts,  # noqa: E402
                                         check_sequence_parallel_layout, sequence_parallel_order, valid_sizes)
from helpers.torchrun_cases import items_of, torchrun_launch  # noqa: E402,F401
from helpers.train_runs import (VOCAB, argv_for, frozen_gc, make_model_dir, one_torch_thread,  # noqa: E402,F401
                                reference_step, relative_error, run_one_step, save_dataset)

deepspeed_available = pytest.mark.skipif(
    __import__("importlib").util.find_spec("deepspeed") is None, reason="deepspeed is not installed")


# ---------- slicing and loss math, without DeepSpeed ----------
def pack_rows(seed=0):
    g = torch.Generator().manual_seed(seed)
    rows = []
    for members in (3, 1, 2):
        lengths = torch.randint(3, 9, (members,), generator=g).tolist()
        ids = torch.randint(1, 50, (sum(lengths),), generator=g).tolist()
        labels = [t if torch.rand(1, generator=g).item() < 0.7 else X for t in ids]
        rows.append({"input_ids": ids, "labels": labels, "cu_seqlens": [0, *torch.tensor(lengths).cumsum(0).tolist()]})
    return rows


def adapter_slices(batch: dict, sp: int) -> list[dict]:
    """What DeepSpeed's UlyssesSPDataLoaderAdapter gives each SP rank (its shift, then dim-1 slices)."""
    labels = torch.nn.functional.pad(batch["labels"], (0, 1), value=X)
    full = {k: v for k, v in batch.items() if k != "labels"}
    full["shift_labels"] = labels[:, 1:]
    chunk = batch["input_ids"].shape[1] // sp
    return [{k: v[:, s * chunk:(s + 1) * chunk] if torch.is_tensor(v) else v for k, v in full.items()}
            for s in range(sp)]


@pytest.mark.parametrize("sp", [2, 3, 4])
@pytest.mark.parametrize("reduction", ["sequence", "pack_mean", "token"])
def test_sliced_targets_and_weights_equal_the_whole_pack(sp, reduction):
    rows = pack_rows()
    whole = PackCollator(reduction)(rows)
    targets, weights = shift_targets(whole["labels"], whole["loss_weights"], whole["cu_seq_lens_q"])
    batch = SequenceParallelPackCollator(PackCollator(reduction), sp)(rows)
    total = batch["input_ids"].shape[1]
    assert total % sp == 0 and total - targets.numel() < sp
    slices = adapter_slices(batch, sp)
    got_t = torch.cat([s["shift_labels"][0] for s in slices])
    got_w = torch.cat([s["shift_loss_weights"][0] for s in slices])
    pad = total - targets.numel()
    assert torch.equal(got_t, torch.cat([targets, torch.full((pad,), X)]))  # the shard-boundary token too
    assert torch.equal(got_w, torch.cat([weights, torch.zeros(pad)]))
    positions = torch.cat([s["position_ids"][0] for s in slices])
    assert torch.equal(positions[:targets.numel()], whole["position_ids"][0])
    assert positions[targets.numel():].tolist() == list(range(pad))  # the padding tail: its own segment
    assert batch[COUNTS_KEY] == whole[COUNTS_KEY].tolist()


@pytest.mark.parametrize("reduction", ["sequence", "pack_mean", "token"])
def test_per_rank_loss_sums_to_the_whole_pack(reduction):
    """sum over SP ranks of each slice's S = the pack's S (hidden states taken as given)."""
    torch.manual_seed(0)
    rows = pack_rows(1)
    whole = PackCollator(reduction)(rows)
    weight = torch.randn(50, 16, dtype=torch.float64)
    T = whole["input_ids"].shape[1]
    for sp in (2, 4):
        batch = SequenceParallelPackCollator(PackCollator(reduction), sp)(rows)
        hidden = torch.randn(1, batch["input_ids"].shape[1], 16, dtype=torch.float64)
        ref = causal_lm_loss(hidden[:, :T], weight, whole["labels"], whole["loss_weights"], whole["cu_seq_lens_q"],
                             reduction="sum")
        chunk = hidden.shape[1] // sp
        parts = [causal_lm_loss(hidden[:, s * chunk:(s + 1) * chunk], weight, shift_labels=sl["shift_labels"],
                                shift_weights=sl["shift_loss_weights"], reduction="sum")
                 for s, sl in enumerate(adapter_slices(batch, sp))]
        torch.testing.assert_close(sum(parts), ref, rtol=1e-12, atol=1e-12)


def test_labels_for_targets_inverts_the_plain_shift():
    t = torch.tensor([5, 6, X, 7, X])
    labels = labels_for_targets(t)
    assert labels.tolist() == [[X, 5, 6, X, 7]]
    with pytest.raises(ValueError, match="last position"):
        labels_for_targets(torch.tensor([5, 6]))


def test_pre_shifted_loss_takes_one_kind_of_targets():
    hidden, weight = torch.randn(1, 4, 8), torch.randn(16, 8)
    labels = torch.tensor([[X, 1, 2, 3]])
    with pytest.raises(ValueError, match="either labels"):
        causal_lm_loss(hidden, weight)
    with pytest.raises(ValueError, match="shift_weights belong to shift_labels"):
        causal_lm_loss(hidden, weight, labels, shift_weights=torch.ones(1, 4))
    with pytest.raises(ValueError, match="already shifted"):
        causal_lm_loss(hidden, weight, shift_labels=labels, cu_seqlens=torch.tensor([0, 4]))


def test_sampler_order_gives_each_micro_step_consecutive_rows():
    assert sequence_parallel_order(8, 4, 2) == [0, 2, 1, 3, 4, 6, 5, 7]
    assert sequence_parallel_order(4, 2, 2) == [0, 1, 2, 3]  # DP = 1: stored order
    world, sp = 8, 4
    order = sequence_parallel_order(16, world, sp)
    dp = world // sp
    for step in range(16 // dp):  # micro-step m: group g trains the row its rank s = m % sp read
        i, s = divmod(step, sp)
        trained = [order[i * world + g * sp + s] for g in range(dp)]
        assert trained == list(range(step * dp, (step + 1) * dp))


def test_layout_and_head_errors_say_what_to_change():
    assert check_sequence_parallel_layout(1, 8, 1, "sort", False) == 8
    assert check_sequence_parallel_layout(4, 8, 1, "pack", True) == 2
    with pytest.raises(ValueError, match="--deepspeed"):
        check_sequence_parallel_layout(2, 2, 1, "pack", False)
    with pytest.raises(ValueError, match="--batch_method pack"):
        check_sequence_parallel_layout(2, 2, 1, "sort", True)
    with pytest.raises(ValueError, match="per_device_train_batch_size 1"):
        check_sequence_parallel_layout(2, 2, 2, "pack", True)
    with pytest.raises(ValueError, match=r"choose one of \[1, 2, 3, 6\]"):
        check_sequence_parallel_layout(4, 6, 1, "pack", True)
    from transformers import LlamaConfig
    from longalign.modeling.configuration_chatglm import ChatGLMConfig
    assert valid_sizes(32, 2) == [1, 2, 4, 8, 16, 32]  # ChatGLM3-6B: kv heads replicated beyond 2
    assert valid_sizes(40, 40) == [1, 2, 4, 5, 8, 10, 20, 40]  # Llama-2-13B
    assert valid_sizes(12, 8) == [1, 2, 4]  # 8 kv heads: 3, 6, 12 divide neither way
    check_head_counts(ChatGLMConfig(rope_ratio=1.0), 8)
    with pytest.raises(ValueError, match=r"12 query / 8 key-value heads; choose one of \[1, 2, 4\]"):
        check_head_counts(LlamaConfig(num_attention_heads=12, num_key_value_heads=8, hidden_size=96), 3)


def test_sort_and_group_builds_512k_packs_for_a_data_parallel_group(tmp_path):
    """--max_length 524288 with --group_size DP = W / N; a built pack slices exactly over N = 4."""
    import datasets
    import sort_and_group

    g = torch.Generator().manual_seed(0)
    lengths = [500_000, 310_000, 200_000, 120_000] + torch.randint(100, 3000, (20,), generator=g).tolist()
    ids = [torch.randint(0, 1000, (n,), generator=g, dtype=torch.int32).tolist() for n in lengths]
    labels = [[X] * (n // 2) + row[n // 2:] for n, row in zip(lengths, ids)]
    datasets.Dataset.from_dict({"input_ids": ids, "labels": labels}).save_to_disk(str(tmp_path))
    summary = sort_and_group.sort_and_group(tmp_path, group_size=2, max_length=524_288, pack_strategy="bfd",
                                            seed=0, too_long="error")
    stats = summary["pack"]
    assert stats["too_long"] == 0 and stats["pack_tokens_max"] <= 524_288 and stats["packs"] % 2 == 0
    pack = datasets.load_from_disk(str(tmp_path / "pack"))
    row = max(pack, key=lambda r: len(r["input_ids"]))
    whole = PackCollator("sequence")([row])
    targets, weights = shift_targets(whole["labels"], whole["loss_weights"], whole["cu_seq_lens_q"])
    slices = adapter_slices(SequenceParallelPackCollator(PackCollator("sequence"), 4)([row]), 4)
    n = targets.numel()
    assert torch.equal(torch.cat([s["shift_labels"][0] for s in slices])[:n], targets)
    assert torch.equal(torch.cat([s["shift_loss_weights"][0] for s in slices])[:n], weights)


def test_train_py_refuses_sequence_parallelism_without_deepspeed(tmp_path):
    argv = argv_for(str(tmp_path / "m"), str(tmp_path / "d"), str(tmp_path / "o"), "pack")
    with pytest.raises(ValueError, match="add --deepspeed"):
        train.parse_args(argv + ["--sequence_parallel_size", "2"])
    assert train.parse_args(argv)[0].sequence_parallel_size == 1
    assert train.parse_args(argv)[1].parallelism_config is None


def test_group_size_error_names_the_data_parallel_size():
    from longalign.train.trainer import check_data_parallel_layout
    assert check_data_parallel_layout(2, 8, 1, sequence_parallel_size=4) == 1
    with pytest.raises(ValueError, match=r"data-parallel size 4 \(world size 8 / --sequence_parallel_size 2\).*"
                                         r"--group_size 4"):
        check_data_parallel_layout(2, 8, 1, sequence_parallel_size=2)


def test_paper_scripts_take_sp_from_the_environment(tmp_path):
    """SP=4 on 8 GPUs: --sequence_parallel_size 4 and 4x the accumulation (same packs per step)."""
    from helpers.script_stubs import launch, write_stub
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    write_stub(bin_dir / "deepspeed", 'echo deepspeed > "$ARGS_OUT"; printf "%s\\n" "$@" >> "$ARGS_OUT"\n')
    for sp, accumulation in (("1", "1"), ("4", "4")):
        words = launch(REPO / "scripts" / "chatglm_pack.sh", bin_dir, tmp_path, NUM_GPUS="8", SP=sp)
        args = words[words.index("train.py") + 1:]
        pairs = {args[i]: args[i + 1] for i in range(len(args) - 1) if args[i].startswith("--")}
        assert pairs["--sequence_parallel_size"] == sp and pairs["--gradient_accumulation_steps"] == accumulation
        namespace, unknown = train.build_parser().parse_known_args(args)
        assert unknown == [] and namespace.sequence_parallel_size == int(sp)


# ---------- end to end: DeepSpeed Ulysses on gloo ----------
PACK_TOKENS = 37  # not a multiple of 2 or 4: the padding tail is exercised


def make_equal_length_packs(path: Path, n_packs: int = 6, seed: int = 0) -> str:
    """pack/ rows of PACK_TOKENS tokens each, 1-3 sequences (prompt, then a learnable answer).

    Equal lengths because DeepSpeed's adapter all-gathers each rank's batch with a per-rank length,
    which NCCL accepts uneven and gloo does not ("ProcessGroupGloo::allgather: invalid tensor size").
    """
    g = torch.Generator().manual_seed(seed)
    rows = {"input_ids": [], "labels": [], "cu_seqlens": []}
    for p in range(n_packs):
        members = 1 + p % 3
        cuts = sorted(torch.randperm(PACK_TOKENS - 9, generator=g)[:members - 1].add(5).tolist())
        cu = [0, *cuts, PACK_TOKENS]
        ids, labels = [], []
        for k, (a, b) in enumerate(zip(cu[:-1], cu[1:])):
            prompt = 0 if k % 2 else (b - a) // 2  # a labelled first token: a plain shift would cross into it
            seq = torch.randint(3, VOCAB, (b - a,), generator=g).tolist()
            ids += seq
            labels += [X] * prompt + seq[prompt:]
        rows["input_ids"].append(ids)
        rows["labels"].append(labels)
        rows["cu_seqlens"].append(cu)
    save_dataset(rows, path / "pack", {"group_size": 2})
    return str(path)


ULYSSES_CASES = [  # family, reduction, world size, SP size
    ("chatglm", "sequence", 2, 2),   # DP 1
    ("llama", "token", 4, 4),        # 4 query / 2 kv heads over 4 ranks: kv heads replicated
    ("chatglm", "pack_mean", 4, 2),  # DP 2 x SP 2: data order and counts over DP groups
]
ULYSSES_TEST = "test_deepspeed_ulysses_step_equals_sequence_parallel_1"


def ulysses_name(family: str, reduction: str, world: int, sp: int) -> str:
    return f"ulysses-{family}-{reduction}-{world}-{sp}"


def launch_cases(items, folder: Path) -> list[dict]:
    """The selected Ulysses cases (the project's rule: the sequence-parallel cases in one launch,
    helpers.torchrun_cases; run by helpers.ulysses_cases), on random-init models of both families and
    equal-length packs."""
    selected = {tuple(item.callspec.params[k] for k in ("family", "reduction", "world", "sp"))
                for item in items_of(items, ULYSSES_TEST)}
    if not selected or __import__("importlib").util.find_spec("deepspeed") is None:
        return []
    models = {f: make_model_dir(folder / f"model_{f}", f) for f in ("chatglm", "llama")}
    data = make_equal_length_packs(folder / "data")
    return [{"module": "helpers.ulysses_cases", "name": ulysses_name(*case), "model": models[case[0]], "data": data,
             "out": str(folder / ulysses_name(*case)), "reduction": case[1], "ga": 4 // (case[2] // case[3]),
             "sp": case[3], "world": case[2]}
            for case in ULYSSES_CASES if case in selected]


@pytest.mark.distributed
@pytest.mark.subprocess
@deepspeed_available
@pytest.mark.parametrize("family,reduction,world,sp", ULYSSES_CASES)
def test_deepspeed_ulysses_step_equals_sequence_parallel_1(torchrun_launch, tmp_path, family, reduction, world, sp):
    """One step of 4 packs (rows 0-3) under DeepSpeed ZeRO-3 + Ulysses on gloo: gradients and logged
    loss equal the per-sequence reference and train.py at SP = 1; micro-step m trains rows
    [m DP, (m+1) DP), one per SP group, each split over its N ranks."""
    import datasets
    spec = torchrun_launch.case(ulysses_name(family, reduction, world, sp))
    model, data = spec["model"], spec["data"]
    dp = world // sp
    ranks = torchrun_launch.ranks(spec["name"])
    ref_loss, ref_grads = reference_step(model, data, "pack", reduction)
    single = run_one_step({**spec, "out": str(tmp_path / "single")}, "pack", reduction, 1)
    assert relative_error(single["grads"], ref_grads) < 1e-5
    for result in ranks:
        assert relative_error(result["grads"], ref_grads) < 1e-5
        assert abs(result["loss"] - ref_loss) < 1e-5 * abs(ref_loss) + 1e-6
    stored = datasets.load_from_disk(os.path.join(data, "pack"))["input_ids"]
    for m in range(spec["ga"]):
        for g in range(dp):
            pack = sum((ranks[g * sp + s]["seen"][m] for s in range(sp)), [])
            assert pack[:PACK_TOKENS] == stored[m * dp + g] and pack[PACK_TOKENS:] == [0] * (len(pack) - PACK_TOKENS)
