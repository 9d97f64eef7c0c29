#!/bin/bash
# Long and lean on one GPU (BENCHMARKS.md §13), in one device call of <= 10 minutes:
#
#   bash bench/device/long_lean.sh                       # every stage, raw JSON in $OUT
#   STAGES="policies peers" bash bench/device/long_lean.sh   # some stages (a second call)
#   (with FlashAttention-4: carry .fa4a in a first call, then `source bench/device/fa4_install.sh;`
#    before this in the second, as in BENCHMARKS §4; without it the automatic backend is used)
#
# The stages exact and ladder need DeepSpeed (its offloaded checkpoints); the lent image has none.
# Carry its wheels (made here: DS_BUILD_OPS=0 pip wheel --no-deps --no-build-isolation
# deepspeed==<lock> -w .whl_ds, plus `pip download --only-binary=:all:` of its dependencies at the
# lock's versions for cp312 manylinux) and start the command with
#   python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl_ds/*.whl && export PYTHONPATH=/tmp/site
# Without DeepSpeed those two stages are skipped with a line that says so.
#
# Stages, most important first, each within its own start budget (the bench scripts skip, and
# record as skipped, what would start after it):
#   exact     the long-context path (TiledMLP + DeepSpeed's offloaded checkpoints + the chunked
#             loss) against plain full recompute on one 64k pack (both fit): loss, gradient norms
#             and their relative difference; also the 64k rung of the ladder.
#   ladder    the same configuration at 128k -> 2M tokens in powers of two, stopping at the first
#             out-of-memory (GPU, or host memory for the offloaded checkpoints); one timed step
#             beyond 256k (the check's short step has run the kernels first).
#   policies  64k packs, compiled layers: --recompute offload vs selective vs full, and offload:12.
#   peers     project-defaults (the corrected memory model's choice) beside the peer rows of
#             bench/bench_peers.py that this machine can run (FlashAttention-4 / Liger if present).
#   gpu_tests the offload policy on the GPU kernels against no recompute, bf16 (test_recompute.py).
#   bandwidth pinned host <-> device copy bandwidth (what the offload policy's copies ride on).
set -u
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PY=${PY:-python3} PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
STAGES=${STAGES:-"gpu_tests bandwidth exact ladder policies peers"}
mkdir -p "$OUT"
has() { $PY -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('$1') is None)" 2>/dev/null; }
$PY -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__, torch.cuda.get_device_name(0))" | tee "$OUT/versions.txt"
nvidia-smi --query-gpu=name,memory.total --format=csv >> "$OUT/versions.txt" 2>&1
FA4=no; has flash_attn.cute && FA4=yes
LIGER=no; has liger_kernel && LIGER=yes
echo "flash_attn_cute=$FA4 liger=$LIGER stages=$STAGES" | tee -a "$OUT/versions.txt"
DEEPSPEED=no; has deepspeed && DEEPSPEED=yes
echo "deepspeed=$DEEPSPEED" | tee -a "$OUT/versions.txt"
ALST="--recompute full --tiled_mlp --offload_checkpoints"
for stage in $STAGES; do
    start=$SECONDS
    if [ $DEEPSPEED = no ] && { [ "$stage" = exact ] || [ "$stage" = ladder ]; }; then
        echo "== $stage: skipped, no deepspeed (carry its wheels: see this script's header)" | tee -a "$OUT/stages.txt"
        continue
    fi
    case $stage in
    gpu_tests)
        $PY -m pytest -q -x tests/ops/test_recompute.py -k cuda_bf16 2>&1 | tail -15 | tee "$OUT/gpu_tests.log" ;;
    bandwidth)
        $PY - "$OUT/bandwidth.json" <<'EOF'
import json, sys, time, torch
n = 1 << 30  # 1 GiB
dev, host = torch.empty(n, dtype=torch.uint8, device="cuda"), torch.empty(n, dtype=torch.uint8, pin_memory=True)
out = {}
for name, dst, src in (("device_to_host_gib_s", host, dev), ("host_to_device_gib_s", dev, host)):
    dst.copy_(src, non_blocking=True); torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(5):
        dst.copy_(src, non_blocking=True)
    torch.cuda.synchronize()
    out[name] = 5 / (time.perf_counter() - t)
print(json.dumps(out)); json.dump(out, open(sys.argv[1], "w"))
EOF
        ;;
    exact)
        $PY bench/bench_long_context.py --lengths 65536 --configs "$ALST" --verify_tokens 65536 \
            --budget_s "${EXACT_BUDGET_S:-30}" --out "$OUT/long_exact_64k.jsonl" ;;
    ladder)
        $PY bench/bench_long_context.py --lengths 131072,262144,524288,1048576,2097152 --configs "$ALST" \
            --long_warmup 0 --long_steps 1 --budget_s "${LADDER_BUDGET_S:-230}" --out "$OUT/long_ladder.jsonl" ;;
    policies)
        $PY bench/bench_train_step.py --sweep "--recompute offload --compile" "--recompute selective --compile" \
            "--recompute full --compile" "--recompute offload:12 --compile" \
            --sweep_budget_s "${POLICIES_BUDGET_S:-110}" --out "$OUT/policies_64k.jsonl" ;;
    peers)
        if [ $FA4 = yes ]; then
            peers="project-defaults project-fa4-offload-compile project-fa4-none-compile project-fa4-full-compile"
            [ $LIGER = yes ] && peers="$peers stock-fa4-gc-liger+kwargs"
            peers="$peers stock-fa4-gc+kwargs"
        else
            peers="project-defaults project-flex-full stock-flex-gc"
            [ $LIGER = yes ] && peers="$peers stock-flex-gc-liger"
        fi
        $PY bench/bench_peers.py --only $peers --budget_s "${PEERS_BUDGET_S:-100}" --out "$OUT/peers.json" ;;
    *) echo "unknown stage $stage (gpu_tests bandwidth exact ladder policies peers)" >&2; exit 2 ;;
    esac
    echo "== $stage: $((SECONDS - start)) s" | tee -a "$OUT/stages.txt"
done
ls -la "$OUT"
