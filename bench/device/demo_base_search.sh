#!/bin/bash
# On one GPU: pretrain several tiny bases (longalign.demo.pretrain) in parallel, then run the demo
# (scripts/demo.sh, training on the GPU) on each; summaries and bases land in $OUT.
#   CONFIGS="name:--flag v --flag v;name2:..." DEMO_ENV="DEMO_STEPS=600 ..." [SKIP_DEMO=1] bash bench/device/demo_base_search.sh
set -u
export PYTHONPATH=$PWD PY=${PY:-python3} OMP_NUM_THREADS=${OMP_NUM_THREADS:-4} TOKENIZERS_PARALLELISM=true
WORK=${WORK:-/tmp/search}
mkdir -p "$WORK" "$OUT"
$PY -c "import torch, transformers, datasets; print('torch', torch.__version__, 'transformers', transformers.__version__, 'datasets', datasets.__version__)"
run_one() {  # run_one NAME FLAGS...
    local name=$1; shift
    local dir=$WORK/$name
    mkdir -p "$dir"
    timeout "${PRETRAIN_TIMEOUT:-300}" $PY -m longalign.demo.pretrain --out "$dir/base" "$@" > "$dir/pretrain.log" 2>&1 \
        || { echo "$name: pretrain failed"; tail -5 "$dir/pretrain.log"; return; }
    if [ -n "${SKIP_DEMO:-}" ]; then
        echo "== $name"; $PY -c "import json,sys; s=json.load(open(sys.argv[1])); print({k: v['exact'] for k, v in s['held_out'].items()}, 'steps', s['steps_trained'], 'pretrain s', s['train_seconds'], 'data s', s['data_seconds'], 'loss', s['loss_log'][-1]['loss'])" "$dir/base/stats.json"
        return
    fi
    env $DEMO_ENV OUT="$dir/demo" DEMO_BASE="$dir/base" DEMO_TRAIN_DEVICE="${DEMO_TRAIN_DEVICE---compile_layers false}" \
        timeout "${DEMO_TIMEOUT:-400}" bash scripts/demo.sh > "$dir/demo.log" 2>&1 || { echo "$name: demo failed"; tail -5 "$dir/demo.log"; }
    echo "== $name"; $PY -c "import json,sys; s=json.load(open(sys.argv[1])); print({k: v['exact'] for k, v in s['held_out'].items()}, 'pretrain s', s['train_seconds'], 'loss', s['loss_log'][-1]['loss'])" "$dir/base/stats.json"
    tail -22 "$dir/demo.log" | grep -E "^\| (train|held-out|needle test|tokens|training)" 
}
IFS=';' read -ra ITEMS <<< "$CONFIGS"
for item in "${ITEMS[@]}"; do
    name=${item%%:*}; flags=${item#*:}
    run_one "$name" $flags > "$WORK/$name.out" 2>&1 &
done
wait
for item in "${ITEMS[@]}"; do cat "$WORK/${item%%:*}.out"; done
cd "$WORK" && tar czf "$OUT/results.tgz" --exclude='*.safetensors' --exclude='*.arrow' --exclude='model*' --exclude=raw */base/stats.json */base/README.md */*.log */demo/summary.* */demo/eval */demo/needle/results 2>/dev/null
for item in "${ITEMS[@]}"; do name=${item%%:*}; tar czf "$OUT/base_$name.tgz" -C "$WORK/$name" base 2>/dev/null; done
ls -la "$OUT"
