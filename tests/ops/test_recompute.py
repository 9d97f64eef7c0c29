"""longalign.ops.recompute on tiny packed models, fp32 CPU: every policy (offload too) gives the gradients of no
checkpointing, and `selective` runs the attention kernel once per layer where `full` runs it twice."""
import pytest
import torch

import longalign.ops.varlen_attention as attention
from longalign.constants import IGNORE_INDEX
from longalign.ops.recompute import apply_recompute, parse_policy
from helpers.prewarmed_python import launch_through, shared_prewarmed_python
from helpers.training_models import tiny_chatglm, tiny_llama

LENGTHS = (7, 12, 5, 9)  # one pack of four sequences
LAYERS = 4
POLICIES = ("none", "full", "selective", "partial:2", "selective:3", "full:0", "offload", "offload:3")


def llama():
    return tiny_llama(num_hidden_layers=LAYERS)


def chatglm():
    return tiny_chatglm(num_layers=LAYERS)


FAMILIES = {"llama": llama, "chatglm": chatglm}  # head_dim 16: the smallest flex (Triton) takes


def pack(vocab=128, seed=1):
    g = torch.Generator().manual_seed(seed)
    total = sum(LENGTHS)
    ids = torch.randint(0, vocab, (1, total), generator=g)
    labels = ids.clone()
    labels[0, :3] = IGNORE_INDEX
    cu = torch.tensor([0, *torch.tensor(LENGTHS).cumsum(0).tolist()], dtype=torch.int32)
    weights = torch.rand(1, total, generator=g)
    return dict(input_ids=ids, labels=labels, cu_seq_lens_q=cu, loss_weights=weights)


def grads_and_calls(family, policy, monkeypatch, compile_backend=None, backend="reference",
                    device="cpu", dtype=torch.float32):
    """Parameter gradients of one packed step under `policy`, and attention kernel calls made."""
    calls = []
    name = "_" + backend  # varlen_attention looks its backend function up at each call
    kernel = getattr(attention, name)

    def counting(*args, **kwargs):
        calls.append(1)
        return kernel(*args, **kwargs)

    monkeypatch.setattr(attention, name, counting)
    monkeypatch.setenv(attention.ENV_VAR, backend)
    torch.manual_seed(0)
    model = FAMILIES[family]().to(device=device, dtype=dtype).train()
    if policy is not None:
        apply_recompute(model, policy, compile=compile_backend is not None,
                        compile_backend=compile_backend or "inductor")
    model(**{k: v.to(device) for k, v in pack().items()}).loss.backward()
    monkeypatch.setattr(attention, name, kernel)
    return {n: p.grad.float().clone() for n, p in model.named_parameters()}, len(calls)


def assert_close(got, want, rtol=1e-6):
    assert got.keys() == want.keys()
    for name in want:
        err = (got[name] - want[name]).abs().max() / want[name].abs().max().clamp_min(1e-30)
        assert err <= rtol, (name, float(err))


@pytest.mark.integration
@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("policy", POLICIES)
def test_policy_gradients_equal_no_checkpointing(family, policy, monkeypatch):
    want, base_calls = grads_and_calls(family, None, monkeypatch)
    got, calls = grads_and_calls(family, policy, monkeypatch)
    assert_close(got, want)
    modes = parse_policy(policy, LAYERS)
    # one kernel call per layer forward, plus one per fully checkpointed layer's recompute
    assert base_calls == LAYERS and calls == LAYERS + modes.count("full")


@pytest.mark.integration
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_selective_skips_attention_in_backward_full_does_not(family, monkeypatch):
    _, full = grads_and_calls(family, "full", monkeypatch)
    _, selective = grads_and_calls(family, "selective", monkeypatch)
    assert (full, selective) == (2 * LAYERS, LAYERS)


@pytest.mark.integration
def test_two_steps_and_reapplying_policy(monkeypatch):
    """Regions are per call (a second step replays nothing stale); re-applying replaces the policy."""
    torch.manual_seed(0)
    model = llama().train()
    apply_recompute(model, "full")
    apply_recompute(model, "selective")
    for _ in range(2):
        model.zero_grad()
        model(**pack()).loss.backward()
    want, _ = grads_and_calls("llama", None, monkeypatch)
    assert_close({n: p.grad for n, p in model.named_parameters()}, want)


@pytest.mark.integration
def test_eval_and_no_grad_forward_is_plain():
    torch.manual_seed(0)
    model = llama()
    want = model.eval()(**pack()).loss
    apply_recompute(model, "selective")
    with torch.no_grad():
        assert torch.equal(model.train()(**pack()).loss, want)
    assert torch.equal(model.eval()(**pack()).loss, want)


@pytest.mark.integration
@pytest.mark.parametrize("policy", ["selective", "full"])
def test_compiled_layers_same_gradients(policy, monkeypatch):
    """torch.compile of each layer (aot_eager: the dynamo/autograd path without a C++ build)."""
    torch._dynamo.reset()
    want, _ = grads_and_calls("llama", None, monkeypatch)
    got, calls = grads_and_calls("llama", policy, monkeypatch, compile_backend="aot_eager")
    assert_close(got, want)
    assert calls == (LAYERS if policy == "selective" else 2 * LAYERS)


@pytest.mark.integration
@pytest.mark.skipif(not torch.cuda.is_available(), reason="GPU attention backends")
@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("backend", ["torch_varlen", "flex", "flash_attn", "flash_attn_cute", "cudnn"])
def test_cuda_bf16_backends(family, backend, monkeypatch):
    """On the GPU kernels, bf16: selective, full and offload (pinned copies on the side stream)
    match no checkpointing (to bf16 rounding of non-deterministic backward accumulation), and
    selective / offload run each kernel once per layer."""
    if backend not in attention.available_backends("cuda", torch.bfloat16):
        pytest.skip(f"{backend} not available")
    run = dict(backend=backend, device="cuda", dtype=torch.bfloat16)
    want, _ = grads_and_calls(family, None, monkeypatch, **run)
    for policy, expected_calls in (("selective", LAYERS), ("full", 2 * LAYERS), ("offload", LAYERS)):
        got, calls = grads_and_calls(family, policy, monkeypatch, **run)
        assert_close(got, want, rtol=2e-2)
        assert calls == expected_calls


def test_parse_policy():
    assert parse_policy("partial:1", 3) == ["full", "none", "none"]
    assert parse_policy("selective:2", 3) == ["selective", "selective", "none"]
    assert parse_policy("none", 2) == ["none", "none"]
    for bad in ("partial", "selective:4", "none:1", "sometimes"):
        with pytest.raises(ValueError):
            parse_policy(bad, 3)


@pytest.mark.slow
def test_bench_train_step_smoke_policies(tmp_path):
    import json

    import bench_train_step

    result = bench_train_step.main(["--smoke", "--recompute", "selective:1", "--attn_backend", "reference",
                                    "--out", str(tmp_path / "b.json")])
    assert result["loss_finite"] and 0 < result["mfu"] < 1 and result["recompute"] == "selective:1"
    assert json.loads((tmp_path / "b.json").read_text())["attn_backend"] == "reference"


@pytest.mark.slow
def test_bench_sweep_runs_each_config_in_a_subprocess(tmp_path, tmp_path_factory, capsys, monkeypatch):
    """Each configuration's process is a fork of an interpreter that imported torch and transformers
    once (helpers/prewarmed_python.py), with one thread: tiny steps."""
    import json

    import bench_train_step

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    launch_through(monkeypatch, shared_prewarmed_python(tmp_path_factory))
    out = tmp_path / "sweep.jsonl"
    results = bench_train_step.main(["--smoke", "--sweep", "--recompute none", "--recompute bogus",
                                     "--out", str(out)])
    assert [r["config"] for r in results] == ["--recompute none", "--recompute bogus"]
    assert results[0]["recompute"] == "none" and results[0]["loss_finite"] and "error" in results[1]
    assert [json.loads(line)["config"] for line in out.read_text().splitlines()] == ["--recompute none",
                                                                                    "--recompute bogus"]
    assert "FAILED" in capsys.readouterr().out


@pytest.mark.slow
def test_bench_train_step_profile_breaks_down_one_step(tmp_path):

    import bench_train_step
    import step_profile

    result = bench_train_step.main(["--smoke", "--recompute", "none", "--attn_backend", "reference", "--profile"])
    prof = result["profile"]
    assert prof["wall_s"] > 0 and prof["kernel_s"] > 0 and prof["top_kernels"]
    assert abs(sum(prof["categories_s"].values()) - prof["kernel_s"]) < 1e-9
    assert step_profile.categorize("nvjet_tst_128x256_64x4_1x2_h_bz_coopA_TNT") == "gemm"
    assert step_profile.categorize("flash_bwd_dq_dk_dv_loop_seqk_parallel_kernel") == "attention"
    assert step_profile.categorize("triton_red_fused__to_copy_add_mean_mul_pow_rsqrt_0") == "compiled_elementwise"
    assert step_profile.categorize("void at::native::(anonymous namespace)::fused_adam_kernel") == "optimizer"
    assert step_profile.categorize("some_unknown_kernel") == "other"


def test_step_profile_counts_only_gpu_time_on_cuda():
    """Host-side runtime calls (cudaDeviceSynchronize: CPU time, no device time) are not kernels."""
    from types import SimpleNamespace

    import step_profile

    sync = SimpleNamespace(self_device_time_total=0, self_cpu_time_total=1_000_000)
    kernel = SimpleNamespace(self_device_time_total=250, self_cpu_time_total=0)
    assert step_profile._self_time_us(sync, cuda=True) == 0.0
    assert step_profile._self_time_us(kernel, cuda=True) == 250.0
    assert step_profile._self_time_us(sync, cuda=False) == 1_000_000.0


def test_micro_step_profiler_writes_rank0_tables(tmp_path, monkeypatch):

    import step_profile

    out = tmp_path / "prof.txt"
    monkeypatch.setenv("BENCH_PROFILE_MICRO_STEPS", "1:3")
    monkeypatch.setenv("BENCH_PROFILE_OUT", str(out))
    x = torch.randn(64, 64)
    for rank in (1, 0):  # only rank 0 writes
        prof = step_profile.MicroStepProfiler.from_env(rank)
        for i in range(4):
            prof.before(i)
            x = (x @ x).tanh()
            prof.after(i)
        assert out.exists() == (rank == 0)
    text = out.read_text()
    assert "micro-steps 1..2, sorted by self_cpu_time_total" in text and "aten::mm" in text
    monkeypatch.delenv("BENCH_PROFILE_MICRO_STEPS")
    idle = step_profile.MicroStepProfiler.from_env(0)
    idle.before(0), idle.after(0)
    assert idle.prof is None


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_padded_batches_use_the_sdpa_kernels_the_environment_allows(family, monkeypatch):
    """Both models' padded path (no cu_seq_lens_q) runs under padded_sdpa_context: cuDNN alone has no
    CPU kernel, so the forward fails; math alone gives the unrestricted logits."""
    from longalign.ops import varlen_attention as attention

    torch.manual_seed(0)
    model = FAMILIES[family]().eval()
    ids = torch.randint(0, 128, (2, 9))
    with torch.no_grad():
        want = model(input_ids=ids).logits
        monkeypatch.setenv(attention.SDPA_ENV_VAR, "math")
        torch.testing.assert_close(model(input_ids=ids).logits, want)
        monkeypatch.setenv(attention.SDPA_ENV_VAR, "cudnn")
        with pytest.raises(RuntimeError):
            model(input_ids=ids)


def forward_with_kernel_refs(policy, monkeypatch):
    """Loss of one packed forward under `policy`, and weak references to every tensor the attention
    kernel took or returned (reference backend)."""
    import weakref

    refs, kernel = [], attention._reference

    def watched(q, k, v, *args, **kwargs):
        out = kernel(q, k, v, *args, **kwargs)
        refs.extend(weakref.ref(t) for t in (q, k, v, out))
        return out

    monkeypatch.setattr(attention, "_reference", watched)
    monkeypatch.setenv(attention.ENV_VAR, "reference")
    torch.manual_seed(0)
    model = llama().train()
    apply_recompute(model, policy)
    return model(**pack()).loss, refs


def test_offload_keeps_no_attention_tensor_alive_after_the_forward(monkeypatch):
    """selective keeps the kernel's q, k, v and output where they are (on the GPU); offload keeps only
    their host copies, so after the forward none of them is alive."""
    import gc

    loss, refs = forward_with_kernel_refs("selective", monkeypatch)
    gc.collect()
    assert refs and all(r() is not None for r in refs)
    loss, refs = forward_with_kernel_refs("offload", monkeypatch)
    gc.collect()
    assert refs and all(r() is None for r in refs)
    loss.backward()


def test_offload_packs_what_selective_keeps(monkeypatch):
    """Per layer call the host copies are the layer input and the fused kernel's q, k, v, out, lse:
    longalign.train.speed.memory_model's `selective` bytes, each tensor once (the replayed output is the kernel's)."""
    import longalign.modeling.packed_attention as packed_attention
    import longalign.ops.recompute as recompute
    from longalign.modeling.shape import ModelShape
    from longalign.train.speed.memory_model import layer_activation_bytes
    from helpers.flash_like import flash_like

    monkeypatch.setattr(packed_attention, "varlen_attention", flash_like)
    host_bytes: dict[int, int] = {}
    pack_one = recompute._LayerOffload.pack

    counted: set[int] = set()

    def counting_once(self, t):
        packed = pack_one(self, t)
        if id(packed) not in counted:
            counted.add(id(packed))
            host_bytes[id(self)] = host_bytes.get(id(self), 0) + packed.host.untyped_storage().nbytes()
        return packed

    monkeypatch.setattr(recompute._LayerOffload, "pack", counting_once)
    torch.manual_seed(0)
    model = llama().train()
    apply_recompute(model, "offload")
    model(**pack()).loss.backward()
    want = layer_activation_bytes(ModelShape.from_config(model.config), sum(LENGTHS), 4)["selective"]
    assert list(host_bytes.values()) == [want] * LAYERS


def test_offload_prefetches_the_layer_before(monkeypatch):
    """In the backward, unpacking a layer's tensors first fetches the previous layer's copies; those
    are then used (not fetched again)."""
    import longalign.ops.recompute as recompute

    served = []
    unpack_one = recompute._LayerOffload.unpack

    def watching(self, packed):
        served.append(packed.fetched is not None)
        return unpack_one(self, packed)

    monkeypatch.setattr(recompute._LayerOffload, "unpack", watching)
    grads_and_calls("llama", "offload", monkeypatch)
    assert any(served) and not all(served)  # the last layer's own copies are not prefetched


@pytest.mark.parametrize("broken", ["zeroed_copy", "swapped_prefetch"])
def test_offload_gradient_check_catches_a_broken_offload(broken, monkeypatch):
    """The equality check used above fails for a wrong offload: host copies that come back zeroed,
    or a prefetch that hands a tensor another same-shaped tensor's copy (q for k, ...)."""
    import longalign.ops.recompute as recompute

    want, _ = grads_and_calls("llama", None, monkeypatch)
    if broken == "zeroed_copy":
        monkeypatch.setattr(recompute, "_to_device", lambda host, device: torch.zeros_like(host))
        monkeypatch.setattr(recompute._LayerOffload, "prefetch", lambda self: None)
    else:
        def swapped(self):
            self.prefetched = True
            items = [packed for packed in (ref() for ref in self.items) if packed is not None]
            for packed, other in zip(items, items[1:] + items[:1]):
                if packed.host.shape == other.host.shape:
                    packed.fetched = other.host.clone()

        monkeypatch.setattr(recompute._LayerOffload, "prefetch", swapped)
    got, _ = grads_and_calls("llama", "offload", monkeypatch)
    with pytest.raises(AssertionError):
        assert_close(got, want)
