#!/usr/bin/env bash
# The tiny offline demo (`make demo`): the whole LongAlign recipe on the embedded default data, on CPU.
#   demo data -> pre_tokenize.py -> sort_and_group.py -> tiny random model -> train.py (packing +
#   loss weighting) -> needle test of the trained model -> heatmap PNG.
# Environment (all optional):
#   OUT=data/demo       where everything goes (each output is replaced whole on a re-run)
#   DEMO_STEPS=80       training steps (the packed demo set is ~37 packs: 80 steps ~ 2 epochs)
#   DEMO_LOG_STEPS=5    log the loss every this many steps
#   DEMO_LR=3e-3        peak learning rate (cosine decay after DEMO_WARMUP=5 steps)
#   HAYSTACK=../shared/data/haystack  needle-test essays (*.txt); if absent, the demo's own text
#   PY=.venv/bin/python
set -euo pipefail
cd "$(dirname "$0")/.."
export PY=${PY:-.venv/bin/python}
OUT=${OUT:-data/demo}
DEMO_STEPS=${DEMO_STEPS:-80}
DEMO_LOG_STEPS=${DEMO_LOG_STEPS:-5}
DEMO_LR=${DEMO_LR:-3e-3}
DEMO_WARMUP=${DEMO_WARMUP:-5}
MAX_LENGTH=8192  # tokens per example and per pack: the demo's "long" context
HAYSTACK=${HAYSTACK:-../shared/data/haystack}
RAW=$OUT/raw
DATA=$OUT/llama/10k
STATS=()

stage() { echo; echo "=== [demo] $* ==="; }

replace_dir() {  # replace_dir NEW FINAL: swap NEW in for FINAL, keeping FINAL until NEW is in place
    local old="$2.old.$$"
    rm -rf "$old"
    if [ -e "$2" ]; then mv "$2" "$old"; fi
    mv "$1" "$2"
    rm -rf "$old"
}

stage "1/6 demo data + tokenizer -> $RAW"
$PY -m longalign.demo_data --out "$RAW"
STATS+=("$RAW/stats.json")

stage "2/6 pre_tokenize (llama template) -> $DATA"
$PY pre_tokenize.py --model llama --tokenizer "$RAW/tokenizer" \
    --long "$RAW/long.jsonl" --short "$RAW/sharegpt.jsonl" \
    --datanum 10k --max_length "$MAX_LENGTH" --output_dir "$DATA" --overwrite_output_dir  # a re-run replaces its sort/, pack/ too
STATS+=("$DATA/stats.json")

stage "3/6 sort_and_group (group size 1) -> $DATA/sort, $DATA/pack"
$PY sort_and_group.py --train_file "$DATA" --group_size 1 --max_length "$MAX_LENGTH"
STATS+=("$DATA/sort/stats.json" "$DATA/pack/stats.json")

stage "4/6 tiny random llama -> $OUT/model_init"
$PY -m longalign.tiny_model --family llama --tokenizer "$RAW/tokenizer" --out "$OUT/model_init" \
    --max_positions "$MAX_LENGTH"
STATS+=("$OUT/model_init/stats.json")

stage "5/6 train.py --batch_method pack --pack_loss, $DEMO_STEPS steps on CPU -> $OUT/model"
rm -rf "$OUT/.model.tmp"
$PY train.py --model_name_or_path "$OUT/model_init" --train_file "$DATA" --output_dir "$OUT/.model.tmp" \
    --batch_method pack --pack_loss --use_cpu --per_device_train_batch_size 1 \
    --gradient_accumulation_steps 1 --max_steps "$DEMO_STEPS" --learning_rate "$DEMO_LR" \
    --lr_scheduler_type cosine --warmup_steps "$DEMO_WARMUP" --logging_steps "$DEMO_LOG_STEPS" \
    --save_strategy no --seed 0 --disable_tqdm true
replace_dir "$OUT/.model.tmp" "$OUT/model"
STATS+=("$OUT/model/trainer_state.json")
$PY - "$OUT/model/trainer_state.json" <<'PY'
import json, sys
losses = [(e["step"], e["loss"]) for e in json.load(open(sys.argv[1]))["log_history"] if "loss" in e]
if not losses:
    sys.exit(f"[demo] no training loss logged in {sys.argv[1]}")
(s0, l0), (s1, l1) = losses[0], losses[-1]
print(f"[demo] loss: first logged {l0:.3f} (step {s0}) -> last logged {l1:.3f} (step {s1})")
PY
echo "[demo] trained model saved to $OUT/model"

if [ ! -d "$HAYSTACK" ]; then
    HAYSTACK=$OUT/haystack
    echo "[demo] no haystack essays found; using the demo's own long documents -> $HAYSTACK"
    rm -rf "$OUT/.haystack.tmp" && mkdir -p "$OUT/.haystack.tmp"
    $PY - "$RAW/long.jsonl" "$OUT/.haystack.tmp" <<'PY'
import json, sys
for i, line in enumerate(open(sys.argv[1], encoding="utf-8")):
    text = json.loads(line)["messages"][0]["content"]
    open(f"{sys.argv[2]}/doc{i:04d}.txt", "w", encoding="utf-8").write(text)
PY
    replace_dir "$OUT/.haystack.tmp" "$HAYSTACK"
fi

stage "6/6 needle test of the trained model (haystack $HAYSTACK) -> $OUT/needle"
rm -rf "$OUT/.needle.tmp"
HAYSTACK=$HAYSTACK bash Needle_test/demo.sh "$OUT/model" "$OUT/.needle.tmp"
replace_dir "$OUT/.needle.tmp" "$OUT/needle"
STATS+=("$OUT/needle/prompts/stats.json" "$OUT/needle/pred/preds.jsonl.stats.json"
        "$OUT/needle/results/summary_match.json")

stage "done in ${SECONDS} s"
for path in "${STATS[@]}"; do
    [ -f "$path" ] || { echo "[demo] ERROR: missing $path" >&2; exit 1; }
    echo "[demo] stats: $path"
done
echo "[demo] trained model: $OUT/model"
echo "[demo] heatmap: $OUT/needle/results/heatmap_match.png"
