"""longalign.train.speed.memory_model: the activation-memory formula counted against what autograd keeps, the
static-memory terms, the recompute chooser on fake GPU sizes, and the speed-settings rules."""
import json
from pathlib import Path

import pytest
import torch

import longalign.modeling.packed_attention as packed_attention
from longalign.ops.varlen_attention import varlen_attention
from longalign.modeling.shape import ModelShape
from longalign.train.speed.memory_model import (GIB, MEMORY_HEADROOM, Kernels, MemorySetup, SpeedRequest,
                                   choose_recompute, choose_speed_settings, deepspeed_memory_fields,
                                   layer_activation_bytes, longest_row_tokens, predicted_peak_bytes,
                                   recompute_ladder)
from longalign.ops.recompute import decoder_layers
from helpers.flash_like import FlashLike, flash_like
from helpers.training_models import tiny_chatglm, tiny_llama

REPO = Path(__file__).resolve().parents[2]
LENGTHS = (9, 14, 6, 11)
DTYPE_BYTES = {torch.float32: 4, torch.bfloat16: 2}


def saved_bytes_of_first_layer(model, dtype):
    """(bytes of every storage layer 0 keeps for backward, bytes of those the kernel keeps);
    parameters and the shared rotary cos/sin excluded."""
    model.to(dtype).train()
    layer = decoder_layers(model)[0]
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    shared, inside, storages = set(), [False], {}

    def pre(module, args, kwargs):
        cos_sin = kwargs.get("position_embeddings") or args[1]
        shared.update(t.untyped_storage().data_ptr() for t in cos_sin)
        inside[0] = True

    def pack(t):
        s = t.untyped_storage()
        if inside[0] and s.data_ptr() not in params | shared:
            storages[s.data_ptr()] = s.nbytes()
        return t

    layer.register_forward_pre_hook(pre, with_kwargs=True)
    layer.register_forward_hook(lambda *a: inside.__setitem__(0, False))
    total = sum(LENGTHS)
    cu = torch.tensor([0, *torch.tensor(LENGTHS).cumsum(0).tolist()], dtype=torch.int32)
    ids = torch.randint(0, 100, (1, total))
    FlashLike.kept = []
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(input_ids=ids, labels=ids, cu_seq_lens_q=cu).loss.backward()
    kept = set(FlashLike.kept[:5])  # layer 0's call
    return sum(storages.values()), sum(n for ptr, n in storages.items() if ptr in kept)


@pytest.mark.integration
@pytest.mark.parametrize("family", ["llama", "chatglm"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_none_policy_formula_counts_what_autograd_keeps(family, dtype, monkeypatch):
    monkeypatch.setattr(packed_attention, "varlen_attention", flash_like)
    torch.manual_seed(0)
    model = tiny_llama(vocab_size=100) if family == "llama" else tiny_chatglm(padded_vocab_size=100)
    total, kernel = saved_bytes_of_first_layer(model, dtype)
    shape = ModelShape.from_config(model.config)
    tokens, b = sum(LENGTHS), DTYPE_BYTES[dtype]
    predicted = layer_activation_bytes(shape, tokens, b)
    attention_only = layer_activation_bytes(shape, tokens, b)["selective"] - tokens * b * shape.hidden
    assert kernel == attention_only
    assert total == predicted["none"]


@pytest.mark.parametrize("family,dtype", [("llama", torch.bfloat16), ("chatglm", torch.float32)],
                         ids=["llama-bf16", "chatglm-fp32"])
def test_fused_formula_counts_what_a_compiled_layer_keeps(family, dtype, monkeypatch):
    """Each layer compiled through inductor's decompositions and min-cut partition (on the CPU
    without code generation: aot_eager_decomp_partition) keeps F + A (module docstring)."""
    from longalign.ops.recompute import apply_recompute

    torch._dynamo.reset()
    monkeypatch.setattr(packed_attention, "varlen_attention", flash_like)
    torch.manual_seed(0)
    model = tiny_llama(vocab_size=100) if family == "llama" else tiny_chatglm(padded_vocab_size=100)
    apply_recompute(model, "none", compile=True, compile_backend="aot_eager_decomp_partition")
    total, kernel = saved_bytes_of_first_layer(model, dtype)
    shape, b = ModelShape.from_config(model.config), DTYPE_BYTES[dtype]
    fused = layer_activation_bytes(shape, sum(LENGTHS), b, Kernels(fused=True))
    assert total == fused["none"] < layer_activation_bytes(shape, sum(LENGTHS), b)["none"]
    torch._dynamo.reset()


def test_memory_model_matches_every_recorded_peak():
    """Every peak recorded on the GPU under bench/measured/ (compiled and eager, FA4 / flex /
    torch varlen / cuDNN, 64k-512k packs, three widths) within 10% of the model's prediction for
    the packs that run trained (bench/measured_memory.py rebuilds them)."""
    import measured_memory

    runs = measured_memory.recorded_runs()
    assert len(runs) >= 28 and {r.kernels.fused for r in runs} == {True, False}
    worst = max(runs, key=lambda r: abs(r.error))
    assert abs(worst.error) <= 0.10, measured_memory.table(runs)


def test_compiled_defaults_take_no_recompute_where_it_fits():
    """The 1.36B bench model at 64k, compiled, on an H200 (139.8 GiB): no recompute (measured
    105.2 GiB, the fastest row), where the eager model's count chose selective:5."""
    choice = settings(SpeedRequest(), gpu_gib=139.8)
    assert choice.compile_layers and choice.recompute == "none"
    assert choose_recompute(LLAMA_1B, 65536, SETUP_1B, int(139.8 * GIB)).policy.startswith("selective:")


def test_offload_keeps_less_on_the_gpu_than_selective():
    """offload: no layer's tensors stay on the GPU between forward and backward (not even the inputs
    that full keeps); a layer's own and the previous layer's selective tensors come back for its backward."""
    assert peak("offload") < peak("full") < peak("selective")
    assert peak("offload:12") < peak("selective:12")
    assert "offload" not in recompute_ladder(LLAMA_1B.layers, packed=True)


LLAMA_1B = ModelShape("llama", layers=24, hidden=2048, heads=16, kv_heads=16, head_dim=128, intermediate=5632,
                      vocab=32000)
LAYER_PARAMS = 4 * 2048 * 2048 + 3 * 2048 * 5632 + 2 * 2048
SETUP_1B = MemorySetup(params=24 * LAYER_PARAMS + 2 * 32000 * 2048 + 2048, layer_params=LAYER_PARAMS)


def peak(policy, tokens=65536, setup=SETUP_1B):
    return predicted_peak_bytes(LLAMA_1B, policy, tokens, setup, 2, 4096)


def test_static_memory_terms():
    p, lp = 1000, 10
    assert MemorySetup(p, lp, weight_bytes=2).resident_bytes() == 2 * p + 2 * 2 * p  # weights + 2 bf16 states
    assert MemorySetup(p, lp, weight_bytes=4).resident_bytes() == 4 * p + 2 * 4 * p
    ds = dict(weight_bytes=2, master_weights=True, world_size=4)
    assert MemorySetup(p, lp, zero_stage=1, **ds).resident_bytes() == 2 * p + 16 * p // 4
    assert MemorySetup(p, lp, zero_stage=2, **ds).gradient_bytes(layers=50) == (2 * lp // 4, 2 * (p - 500) // 4)
    assert MemorySetup(p, lp, zero_stage=1, **ds).gradient_bytes(layers=50) == (2 * lp, 2 * (p - 500))
    assert MemorySetup(p, lp, zero_stage=3, **ds).resident_bytes() == 2 * p // 4 + 2 * 2 * lp + 16 * p // 4
    offload = MemorySetup(p, lp, zero_stage=3, offload_params=True, offload_optimizer=True, **ds)
    assert offload.resident_bytes() == 2 * 2 * lp


def test_peak_orders_policies_by_memory():
    assert peak("none") > peak("selective:6") > peak("selective:12") > peak("selective") > peak("full")
    assert peak("full:1") > peak("full:12") > peak("full")
    # the last layer's activations are used first in the backward, where its recompute would rebuild
    # them: keeping them costs less than their size (they meet the loss backward, not a recompute)
    per_layer = layer_activation_bytes(LLAMA_1B, 65536, 2)
    assert 0 <= peak("full:23") - peak("full") < per_layer["none"] - per_layer["full"]
    assert 0 <= peak("selective:23") - peak("selective") < per_layer["none"] - per_layer["selective"]
    assert peak("full", tokens=32768) < peak("full")


@pytest.mark.parametrize("gib", [40, 60, 80, 100, 141, 300])
def test_chooser_takes_the_first_rung_that_fits(gib):
    gpu = gib * GIB
    choice = choose_recompute(LLAMA_1B, 65536, SETUP_1B, gpu)
    ladder = recompute_ladder(LLAMA_1B.layers, packed=True)
    budget = int(MEMORY_HEADROOM * gpu)
    assert choice.budget_bytes == budget and choice.none_bytes == peak("none")
    assert choice.fits and peak(choice.policy) <= budget
    assert all(peak(p) > budget for p in ladder[:ladder.index(choice.policy)])


def test_chooser_examples():
    assert choose_recompute(LLAMA_1B, 65536, SETUP_1B, 300 * GIB).policy == "none"
    assert choose_recompute(LLAMA_1B, 65536, SETUP_1B, 141 * GIB).policy.startswith("selective:")
    assert choose_recompute(LLAMA_1B, 65536, SETUP_1B, 60 * GIB).policy.startswith("selective:")
    assert choose_recompute(LLAMA_1B, 65536, SETUP_1B, 40 * GIB).policy.startswith("full:")
    assert choose_recompute(LLAMA_1B, 65536, SETUP_1B, 20 * GIB).policy == "full"
    tight = choose_recompute(LLAMA_1B, 65536, SETUP_1B, 1 * GIB)
    assert tight.policy == "full" and not tight.fits and "DOES NOT FIT" in tight.describe()
    padded = choose_recompute(LLAMA_1B, 65536, SETUP_1B, 60 * GIB, packed=False)
    assert padded.policy.startswith("full")
    assert not any(p.startswith("selective") for p in recompute_ladder(24, packed=False))


def test_paper_7b_on_8_gpus_under_zero3_offload():
    shape = ModelShape("llama", 32, 4096, 32, 32, 128, 11008, 32000)
    layer = 4 * 4096 ** 2 + 3 * 4096 * 11008 + 2 * 4096
    setup = MemorySetup(32 * layer + 2 * 32000 * 4096, layer, world_size=8,
                        **deepspeed_memory_fields(REPO / "ds_config" / "stage3.json"))
    on_a800 = choose_recompute(shape, 65536, setup, 80 * GIB)  # the paper's GPU
    on_h200 = choose_recompute(shape, 65536, setup, 141 * GIB)
    assert on_a800.fits and on_h200.fits
    assert recompute_ladder(32, True).index(on_h200.policy) < recompute_ladder(32, True).index(on_a800.policy)


def test_deepspeed_fields_from_the_shipped_configs():
    fields = {name: deepspeed_memory_fields(REPO / "ds_config" / f"{name}.json")
              for name in ("stage1", "stage2", "stage3", "stage3_no_offload")}
    assert [f["zero_stage"] for f in fields.values()] == [1, 2, 3, 3]
    assert fields["stage3"]["offload_params"] and fields["stage3"]["offload_optimizer"]
    assert not fields["stage3_no_offload"]["offload_params"]
    assert deepspeed_memory_fields(None) == {}
    assert deepspeed_memory_fields(json.loads((REPO / "ds_config" / "stage2.json").read_text()))["zero_stage"] == 2


def test_longest_row_reads_list_lengths():
    import datasets
    ds = datasets.Dataset.from_dict({"input_ids": [[1, 2, 3], list(range(17)), [5]]})
    assert longest_row_tokens(ds) == 17


def settings(request, device="cuda", zero_stage=0, gpu_gib=141):
    setup = MemorySetup(SETUP_1B.params, LAYER_PARAMS, zero_stage=zero_stage, master_weights=zero_stage > 0)
    return choose_speed_settings(request, device, LLAMA_1B, setup, 65536, packed=True, attention="flash_attn_cute",
                                 gpu_bytes=gpu_gib * GIB)


def test_speed_settings_rules():
    auto = settings(SpeedRequest())
    compiled = Kernels(fused=True, attention="flash_attn_cute")
    assert auto.recompute == choose_recompute(LLAMA_1B, 65536, SETUP_1B, 141 * GIB, kernels=compiled).policy
    assert auto.compile_layers and not auto.liger
    line = auto.log_line()
    assert line.count("\n") == 0 and "attention=flash_attn_cute" in line and "predicted peak" in line
    assert settings(SpeedRequest(), zero_stage=3).compile_layers is False
    assert settings(SpeedRequest(liger=True)).compile_layers is False
    assert settings(SpeedRequest(recompute="full", compile_layers=False)).recompute == "full"
    exact = settings(SpeedRequest(paper_exact=True))
    assert (exact.recompute, exact.compile_layers, exact.liger) == (None, False, False)
    cpu = settings(SpeedRequest(), device="cpu")
    assert (cpu.recompute, cpu.compile_layers) == (None, False)  # CPU: today's defaults
    assert settings(SpeedRequest(recompute="selective", compile_layers=True), device="cpu").recompute == "selective"
    with pytest.raises(ValueError, match="paper_exact"):
        settings(SpeedRequest(paper_exact=True, recompute="full"))
    with pytest.raises(ValueError, match="CUDA"):
        settings(SpeedRequest(liger=True), device="cpu")


def test_training_settings_from_a_loaded_model_with_a_fake_gpu():
    """train.py's path: shape and parameter counts from the model, ZeRO terms from a DeepSpeed
    config, then the wrappers applied (compile is lazy: nothing runs here)."""
    from longalign.train.speed.memory_model import apply_speed_settings, training_speed_settings

    model = tiny_llama(num_hidden_layers=4)
    tiny_gpu = 2 * 2 ** 20  # 2 MiB: the tiny model at 4096 tokens needs recomputation
    auto = training_speed_settings(SpeedRequest(), model, "cuda", tokens=4096, packed=True, gpu_bytes=tiny_gpu)
    assert auto.recompute != "none" and auto.compile_layers
    assert apply_speed_settings(model, auto) and all("forward" in layer.__dict__ for layer in decoder_layers(model))
    zero3 = training_speed_settings(SpeedRequest(), model, "cuda", tokens=4096, packed=True, world_size=8,
                                    ds_config=REPO / "ds_config" / "stage3.json", gpu_bytes=tiny_gpu)
    assert not zero3.compile_layers and "ZeRO-3" in zero3.log_line()
    exact = training_speed_settings(SpeedRequest(paper_exact=True), tiny_llama(), "cuda", 4096, True)
    plain = tiny_llama()
    assert not apply_speed_settings(plain, exact) and not any("forward" in l.__dict__ for l in decoder_layers(plain))
