#!/bin/bash
# On one GPU, two phases:
#   1. pretrain several tiny bases (longalign.demo.pretrain) side by side;
#   2. unless SKIP_DEMO is set, run the demo (scripts/demo.sh, training on the GPU) on the base that
#      copies best (held-out copy exact, then recall), once per DEMO_VARIANTS entry, side by side;
#      with DEMO_EACH=1, the first DEMO_VARIANTS entry on every base instead, and on each
#      EXTRA_BASES entry ("name:dir;name2:dir2", e.g. shipped:models/tiny-base).
# Summaries, stats and the bases (weights included) land in $OUT.
#   CONFIGS="name:--flag v --flag v;name2:..." DEMO_VARIANTS="d1:DEMO_STEPS=600 DEMO_LR=1e-3;d2:..." \
#     [SKIP_DEMO=1] [PRETRAIN_TIMEOUT=300] [DEMO_TIMEOUT=300] bash bench/device/demo_base_search.sh
# With datasets carried as wheels (.whl), first:
#   python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
set -u
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PY=${PY:-python3} OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
export TOKENIZERS_PARALLELISM=true PYTHONUNBUFFERED=1
WORK=${WORK:-/tmp/search}
mkdir -p "$WORK" "$OUT"
$PY -c "import torch, transformers, datasets; print('torch', torch.__version__, 'transformers', transformers.__version__, 'datasets', datasets.__version__, torch.cuda.get_device_name())"

pretrain_one() {  # pretrain_one NAME FLAGS...
    local name=$1; shift
    mkdir -p "$WORK/$name"
    timeout "${PRETRAIN_TIMEOUT:-300}" $PY -m longalign.demo.pretrain --out "$WORK/$name/base" "$@" \
        > "$WORK/$name/pretrain.log" 2>&1 || { echo "$name: pretrain failed"; tail -5 "$WORK/$name/pretrain.log"; return; }
    $PY - "$name" "$WORK/$name/base/stats.json" <<'EOF'
import json, sys
s = json.load(open(sys.argv[2]))
probes = [e["copy_token_accuracy"] for e in s["loss_log"] if "copy_token_accuracy" in e]
print("==", sys.argv[1], {k: v["exact"] for k, v in s["held_out"].items()}, "steps", s["steps_trained"],
      "train s", s["train_seconds"], "data s", s["data_seconds"], "loss", [e["loss"] for e in s["loss_log"] if "loss" in e][-1],
      "copy acc", probes)
EOF
}

demo_one() {  # demo_one BASE NAME ENV...
    local base=$1 name=$2; shift 2
    env "$@" OUT="$WORK/demo_$name" DEMO_BASE="$base" DEMO_TRAIN_DEVICE="${DEMO_TRAIN_DEVICE---compile_layers false}" \
        timeout "${DEMO_TIMEOUT:-300}" bash scripts/demo.sh > "$WORK/demo_$name.log" 2>&1 \
        || { echo "demo $name failed"; tail -8 "$WORK/demo_$name.log"; }
    echo "== demo $name ($*)"
    grep -E "^\| " "$WORK/demo_$name.log" | tail -20
}

IFS=';' read -ra ITEMS <<< "$CONFIGS"
for item in "${ITEMS[@]}"; do
    pretrain_one "${item%%:*}" ${item#*:} > "$WORK/${item%%:*}.out" 2>&1 &
done
wait
for item in "${ITEMS[@]}"; do cat "$WORK/${item%%:*}.out"; done

BEST=$($PY - "$WORK" <<'EOF'
import json, pathlib, sys
scores = []
for stats in pathlib.Path(sys.argv[1]).glob("*/base/stats.json"):
    held = json.loads(stats.read_text())["held_out"]
    scores.append((held["copy"]["exact"], held["recall"]["exact"], stats.parent.parent.name))
print(max(scores)[2] if scores else "")
EOF
)
echo "best base: ${BEST:-none}"
if [ -z "${SKIP_DEMO:-}" ] && [ -n "${DEMO_EACH:-}" ]; then
    IFS=';' read -ra VARIANTS <<< "${DEMO_VARIANTS:-default:DEMO_LOG_STEPS=10}"
    IFS=';' read -ra EXTRA <<< "${EXTRA_BASES:-}"
    BASES=()
    for item in "${ITEMS[@]}"; do [ -d "$WORK/${item%%:*}/base" ] && BASES+=("${item%%:*}:$WORK/${item%%:*}/base"); done
    for item in "${EXTRA[@]}"; do BASES+=("${item%%:*}:$(realpath "${item#*:}")"); done
    for item in "${BASES[@]}"; do
        demo_one "${item#*:}" "${item%%:*}" ${VARIANTS[0]#*:} > "$WORK/demo_${item%%:*}.out" 2>&1 &
    done
    wait
    for item in "${BASES[@]}"; do cat "$WORK/demo_${item%%:*}.out"; done
elif [ -z "${SKIP_DEMO:-}" ] && [ -n "$BEST" ]; then
    IFS=';' read -ra VARIANTS <<< "${DEMO_VARIANTS:-default:DEMO_LOG_STEPS=10}"
    for item in "${VARIANTS[@]}"; do
        demo_one "$WORK/$BEST/base" "${item%%:*}" ${item#*:} > "$WORK/demo_${item%%:*}.out" 2>&1 &
    done
    wait
    for item in "${VARIANTS[@]}"; do cat "$WORK/demo_${item%%:*}.out"; done
fi

cd "$WORK" && tar czf "$OUT/results.tgz" */base/stats.json */base/README.md *.log */pretrain.log \
    demo_*/summary.* demo_*/eval demo_*/needle/results demo_*/stage_times.tsv demo_*/model/trainer_state.json 2>/dev/null
for item in "${ITEMS[@]}"; do
    name=${item%%:*}
    [ -d "$WORK/$name/base" ] && tar czf "$OUT/base_$name.tgz" -C "$WORK/$name" base
done
ls -la "$OUT"
