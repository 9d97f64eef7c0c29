"""Every training script (scripts/*.sh but demo.sh) launches train.py with arguments its parser accepts.

Each script runs under bash with stub `deepspeed`, `torchrun` and `nvidia-smi` executables first on
PATH; the stub launcher records its arguments, which are then parsed by train.py's parser.
"""
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

import train
from helpers.script_stubs import launch, write_stub

SCRIPTS = sorted(p for p in (REPO / "scripts").glob("*.sh") if p.name != "demo.sh" and not p.name.startswith("_"))
PAPER = {"learning_rate": 2e-5, "lr_scheduler_type": "cosine", "warmup_steps": 0.03, "adam_beta1": 0.9,
         "adam_beta2": 0.95, "weight_decay": 0.0, "num_train_epochs": 2.0, "bf16": True,
         "gradient_checkpointing": True, "per_device_train_batch_size": 1}


@pytest.fixture
def stub_bin(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for launcher in ("deepspeed", "torchrun"):
        write_stub(bin_dir / launcher, f'echo {launcher} > "$ARGS_OUT"; printf "%s\\n" "$@" >> "$ARGS_OUT"\n')
    write_stub(bin_dir / "nvidia-smi", 'echo "GPU 0: stub"; echo "GPU 1: stub"; echo "GPU 2: stub"\n')
    return bin_dir


def test_there_are_the_five_paper_scripts():
    assert {p.name for p in SCRIPTS} >= {"chatglm_pack.sh", "chatglm_sort.sh", "llama_pack.sh",
                                         "llama_sort.sh", "llama_sort_13b.sh"}


@pytest.mark.distributed
@pytest.mark.subprocess
@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_script_arguments_parse_against_train_py(script, stub_bin, tmp_path):
    text = script.read_text()
    assert text.splitlines()[1].startswith("# ") and len(text.splitlines()[1]) > 20  # says what it reproduces
    words = launch(script, stub_bin, tmp_path)
    assert words[0] in ("deepspeed", "torchrun")
    assert words[words.index("--num_gpus") + 1] == "3"  # GPU count from nvidia-smi -L
    train_args = words[words.index("train.py") + 1:]
    namespace, unknown = train.build_parser().parse_known_args(train_args)
    assert unknown == [], f"{script.name}: train.py does not accept {unknown}"
    ns = vars(namespace)
    for key, value in PAPER.items():
        assert ns[key] == value, (script.name, key, ns[key])
    method = ns["batch_method"]
    assert method == ("pack" if "pack" in script.stem else "sort")
    assert ns["gradient_accumulation_steps"] == (1 if method == "pack" else 12)
    assert ns["pack_loss"] is (method == "pack")
    assert (REPO / ns["deepspeed"]).is_file()
    family = "chatglm" if script.stem.startswith("chatglm") else "llama"
    assert f"/{family}/" in ns["train_file"]
    train.resolve_loss_reduction(method, ns["pack_loss"], ns["loss_reduction"])


@pytest.mark.distributed
@pytest.mark.subprocess
def test_environment_overrides_defaults(stub_bin, tmp_path):
    words = launch(REPO / "scripts" / "llama_pack.sh", stub_bin, tmp_path, NUM_GPUS="8", MODEL="/m",
                   DATA="/d", OUT="/o", DS_CONFIG="ds_config/stage3_no_offload.json")
    args = words[words.index("train.py") + 1:]
    pairs = {args[i]: args[i + 1] for i in range(len(args) - 1) if args[i].startswith("--")}
    assert words[words.index("--num_gpus") + 1] == "8"
    assert (pairs["--model_name_or_path"], pairs["--train_file"], pairs["--output_dir"]) == ("/m", "/d", "/o")
    assert pairs["--deepspeed"] == "ds_config/stage3_no_offload.json"


def test_ds_configs_are_filled_by_the_trainer():
    import json
    names = sorted(f.stem for f in (REPO / "ds_config").glob("*.json"))
    assert {"stage1", "stage2", "stage3", "stage3_no_offload"} <= set(names)
    for name in names:
        config = json.loads((REPO / "ds_config" / f"{name}.json").read_text())
        assert config["train_micro_batch_size_per_gpu"] == "auto" and config["gradient_accumulation_steps"] == "auto"
        zero = config["zero_optimization"]
        assert zero["stage"] == int(name[5])
        offloaded = "offload_param" in zero and "offload_optimizer" in zero
        assert offloaded == (name == "stage3")
        # Offload needs DeepSpeed's CPU Adam (the paper's set-up); without offload the Trainer's
        # own torch AdamW (same betas / eps / weight decay) runs, with no op to JIT-compile.
        assert ("optimizer" in config) == offloaded
        if offloaded:
            assert config["optimizer"]["params"]["lr"] == "auto"


def test_tuned_zero3_configs_differ_from_the_default_only_in_bucket_and_persistence_sizes():
    """The configs behind BENCHMARKS.md §5's tuned rows: same ZeRO-3, bigger communication buckets
    (and, _tuned, matrices under 1.2e7 elements kept gathered)."""
    import json
    base = json.loads((REPO / "ds_config" / "stage3_no_offload.json").read_text())
    tuned = {"reduce_bucket_size", "stage3_prefetch_bucket_size", "stage3_param_persistence_threshold"}
    for name, changed, added in (
            ("stage3_no_offload_buckets", {"reduce_bucket_size", "stage3_prefetch_bucket_size"}, set()),
            ("stage3_no_offload_tuned", tuned, set()),
            ("stage3_no_offload_leaf", tuned, {"stage3_module_granularity_threshold"})):
        config = json.loads((REPO / "ds_config" / f"{name}.json").read_text())
        zero, zero_base = config.pop("zero_optimization"), base["zero_optimization"]
        assert config == {k: v for k, v in base.items() if k != "zero_optimization"}
        assert {k for k in zero_base if zero[k] != zero_base[k]} == changed
        assert set(zero) - set(zero_base) == added and set(zero_base) <= set(zero)


@pytest.mark.distributed
@pytest.mark.subprocess
@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_paper_exact_launches_the_same_flags_plus_paper_exact(script, stub_bin, tmp_path):
    """PAPER_EXACT=1: the paper's command line word for word, plus --paper_exact (train.py then keeps
    transformers' gradient checkpointing and compiles nothing); by default train.py's speed settings
    apply (no speed flag on the command line: they are chosen at start from the GPU)."""
    default = launch(script, stub_bin, tmp_path)
    exact = launch(script, stub_bin, tmp_path, PAPER_EXACT="1")
    assert "--paper_exact" not in default and exact == default + ["--paper_exact"]
    assert launch(script, stub_bin, tmp_path, PAPER_EXACT="0") == default
    train_args = exact[exact.index("train.py") + 1:]
    namespace, unknown = train.build_parser().parse_known_args(train_args)
    assert unknown == [] and namespace.gradient_checkpointing is True
    request = train.speed_request(namespace)
    assert request.paper_exact and (request.recompute, request.compile_layers, request.liger) == (None, None, False)
    with pytest.raises(ValueError, match="paper_exact"):
        train.speed_request(train.build_parser().parse_known_args(train_args + ["--recompute", "selective"])[0])
