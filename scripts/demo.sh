#!/usr/bin/env bash
# The tiny offline demo (`make demo`): the whole LongAlign recipe on generated data, on CPU, and a
# held-out measure of what the model learned.
#   demo data -> pre_tokenize.py -> sort_and_group.py -> the model training starts from (DEMO_BASE: a
#   pretrained base with its context raised to the demo's length; default: a tiny random Llama) ->
#   its held-out retrieval -> train.py (packing + loss weighting) -> held-out retrieval of the trained
#   model -> needle test -> a summary table (summary.md / summary.json).
# Environment (all optional):
#   OUT=data/demo         where everything goes (each output is replaced whole on a re-run)
#   DEMO_STEPS=...        training steps (default below)
#   DEMO_LOG_STEPS=10     log the loss every this many steps
#   DEMO_LR=...           peak learning rate (cosine decay after DEMO_WARMUP steps)
#   DEMO_EVAL_PER_TASK=20 held-out retrieval examples per task (needle, key-value)
#   DEMO_EVAL_SHORT=20    held-out short-task rounds scored
#   DEMO_NUM_LONG, DEMO_NUM_SHORT, DEMO_LONG_WORDS="MIN MAX", DEMO_MIX  the demo data
#                         (longalign/demo/data.py; defaults below, chosen in BENCHMARKS.md section 12)
#   DEMO_BASE=DIR         the pretrained base to align (default models/tiny-base, made by python -m
#                         longalign.demo.pretrain); "" : a random-init tiny Llama and a BPE of DEMO_VOCAB
#   DEMO_CONTEXT=...      the longest query in tokens (default 4x the base's context; 2048 from random weights)
#   DEMO_TRAIN_DEVICE=--use_cpu train.py's device flag ("" lets it use a GPU)
#   HAYSTACK=DIR          needle-test essays (*.txt); default: the demo's own held-out filler text
#   PY=.venv/bin/python
set -euo pipefail
cd "$(dirname "$0")/.."
export PY=${PY:-.venv/bin/python}
OUT=${OUT:-data/demo}
DEMO_BASE=${DEMO_BASE-models/tiny-base}  # the shipped pretrained base; DEMO_BASE="" starts from random weights
DEMO_TRAIN_DEVICE=${DEMO_TRAIN_DEVICE---use_cpu}
DEMO_LOG_STEPS=${DEMO_LOG_STEPS:-10}
DEMO_WARMUP=${DEMO_WARMUP:-20}
DEMO_EVAL_PER_TASK=${DEMO_EVAL_PER_TASK:-20}
DEMO_EVAL_SHORT=${DEMO_EVAL_SHORT:-20}
DEMO_NUM_LONG=${DEMO_NUM_LONG:-1200}
if [ -n "$DEMO_BASE" ]; then  # LongAlign's order: align a pretrained base (longalign/demo/, DESIGN.md §10)
    CONTEXT_TOKENS=${DEMO_CONTEXT:-1024}  # the demo's longest context (4x the base's): held-out queries are sized to it
    DEMO_STEPS=${DEMO_STEPS:-3000}
    DEMO_LR=${DEMO_LR:-1e-3}
    DEMO_NUM_SHORT=${DEMO_NUM_SHORT:-6000}
    DEMO_LONG_WORDS=${DEMO_LONG_WORDS:-30 440}  # filler words per long example (~2.2 tokens each at vocab 512)
    DEMO_MIX=${DEMO_MIX:-few_words}             # short chats: copy 4-16 distinct filler words, again, count them
else  # from random weights, the settings of BENCHMARKS §11b
    CONTEXT_TOKENS=${DEMO_CONTEXT:-2048}
    DEMO_STEPS=${DEMO_STEPS:-2600}
    DEMO_LR=${DEMO_LR:-3e-3}
    DEMO_NUM_SHORT=${DEMO_NUM_SHORT:-12000}     # short chats: about half the tokens, where copying is learned
    DEMO_LONG_WORDS=${DEMO_LONG_WORDS:-50 720}  # filler words per long example: ~150 to ~2300 tokens
    DEMO_VOCAB=${DEMO_VOCAB:-384}               # a small BPE: the copy forms within the budget (section 11)
    DEMO_MIX=${DEMO_MIX:-few_words}             # short chats: copy 4-16 distinct filler words, again, count them
fi
ANSWER_ROOM=256                   # tokens of an example beyond its query: template + answer
MAX_LENGTH=$((CONTEXT_TOKENS + ANSWER_ROOM))  # tokens per example and per pack
RAW=$OUT/raw
DATA=$OUT/llama/10k
HAYSTACK=${HAYSTACK:-$RAW/haystack}
TIMES=$OUT/stage_times.tsv
LOGS=$OUT/logs
STATS=()
STAGE_NAME=""
STAGE_START=0

stage() {  # stage NAME: close the previous stage's timing, open this one
    stage_done
    STAGE_NAME=$1
    STAGE_START=$SECONDS
    echo; echo "=== [demo] $* ==="
}

stage_done() {
    if [ -n "$STAGE_NAME" ]; then
        printf '%s\t%s\n' "$STAGE_NAME" "$((SECONDS - STAGE_START))" >> "$TIMES.tmp"
    fi
    STAGE_NAME=""
}

replace_dir() {  # replace_dir NEW FINAL: swap NEW in for FINAL, keeping FINAL until NEW is in place
    local old="$2.old.$$"
    rm -rf "$old"
    if [ -e "$2" ]; then mv "$2" "$old"; fi
    mv "$1" "$2"
    rm -rf "$old"
}

logged() {  # logged NAME CMD...: CMD's output to $LOGS/NAME.log, its progress bars (stderr) on screen
    local log="$LOGS/$1.log"
    shift
    if ! "$@" > "$log"; then
        echo "[demo] FAILED: $* (log: $log)" >&2
        tail -n 20 "$log" >&2
        exit 1
    fi
    local last
    last=$(tail -n 1 "$log" | cut -c1-240)
    [ "${#last}" -gt 2 ] || last="done"  # a closing brace of a printed stats object says nothing
    echo "[demo] $last (log: $log)"
}

mkdir -p "$OUT" "$LOGS"
rm -f "$TIMES.tmp"

stage data "1/8 demo data -> $RAW"
if [ -n "$DEMO_BASE" ]; then TOKENIZER_FLAGS=(--tokenizer_from "$DEMO_BASE"); else TOKENIZER_FLAGS=(--vocab_size "$DEMO_VOCAB"); fi
read -r LONG_MIN LONG_MAX <<< "$DEMO_LONG_WORDS"
logged data $PY -m longalign.demo.data --out "$RAW" --num_long "$DEMO_NUM_LONG" --num_short "$DEMO_NUM_SHORT" \
    --long_words "$LONG_MIN" "$LONG_MAX" "${TOKENIZER_FLAGS[@]}" --mix "$DEMO_MIX"
STATS+=("$RAW/stats.json")

stage pre_tokenize "2/8 pre_tokenize (llama template) -> $DATA"
logged pre_tokenize $PY pre_tokenize.py --model llama --tokenizer "$RAW/tokenizer" \
    --long "$RAW/long.jsonl" --short "$RAW/sharegpt.jsonl" \
    --datanum 10k --max_length "$MAX_LENGTH" --output_dir "$DATA" --overwrite_output_dir  # a re-run replaces its sort/, pack/ too
STATS+=("$DATA/stats.json")

stage sort_and_group "3/8 sort_and_group (group size 1) -> $DATA/sort, $DATA/pack"
logged sort_and_group $PY sort_and_group.py --train_file "$DATA" --group_size 1 --max_length "$MAX_LENGTH"
STATS+=("$DATA/sort/stats.json" "$DATA/pack/stats.json")

if [ -n "$DEMO_BASE" ]; then
    stage model_init "4/8 the pretrained base ($DEMO_BASE), context raised to $MAX_LENGTH -> $OUT/model_init"
    logged model_init $PY -m longalign.demo.base --base "$DEMO_BASE" --out "$OUT/model_init" --max_positions "$MAX_LENGTH"
else
    stage model_init "4/8 tiny random llama -> $OUT/model_init"
    logged model_init $PY -m longalign.demo.tiny_model --family llama --tokenizer "$RAW/tokenizer" --out "$OUT/model_init" \
        --max_positions "$MAX_LENGTH" --tie_embeddings
fi
STATS+=("$OUT/model_init/stats.json")

stage eval_base "5/8 held-out retrieval, the model before training -> $OUT/eval/base.json"
logged eval_base $PY -m longalign.demo.evaluation --model "$OUT/model_init" --raw "$RAW" --out "$OUT/eval/base.json" \
    --context_tokens "$CONTEXT_TOKENS" --per_task "$DEMO_EVAL_PER_TASK" --short_examples "$DEMO_EVAL_SHORT"
STATS+=("$OUT/eval/base.json")

stage train "6/8 train.py --batch_method pack --pack_loss, $DEMO_STEPS steps -> $OUT/model"
rm -rf "$OUT/.model.tmp"
logged train $PY train.py --model_name_or_path "$OUT/model_init" --train_file "$DATA" --output_dir "$OUT/.model.tmp" \
    --batch_method pack --pack_loss $DEMO_TRAIN_DEVICE --per_device_train_batch_size 1 \
    --gradient_accumulation_steps 1 --max_steps "$DEMO_STEPS" --learning_rate "$DEMO_LR" \
    --lr_scheduler_type cosine --warmup_steps "$DEMO_WARMUP" --logging_steps "$DEMO_LOG_STEPS" \
    --adam_beta2 0.95 --weight_decay 0 --save_strategy no --seed 0 --progress bar
replace_dir "$OUT/.model.tmp" "$OUT/model"
STATS+=("$OUT/model/trainer_state.json")
$PY -m longalign.demo.report --loss "$OUT/model/trainer_state.json"
echo "[demo] trained model saved to $OUT/model"

stage eval_trained "7/8 held-out retrieval, trained model -> $OUT/eval/trained.json"
logged eval_trained $PY -m longalign.demo.evaluation --model "$OUT/model" --raw "$RAW" --out "$OUT/eval/trained.json" \
    --context_tokens "$CONTEXT_TOKENS" --per_task "$DEMO_EVAL_PER_TASK" --short_examples "$DEMO_EVAL_SHORT"
STATS+=("$OUT/eval/trained.json")

stage needle "8/8 needle test of the trained model (haystack $HAYSTACK) -> $OUT/needle"
rm -rf "$OUT/.needle.tmp"
export HAYSTACK
export NEEDLE_MAX_LEN=$CONTEXT_TOKENS
logged needle bash Needle_test/demo.sh "$OUT/model" "$OUT/.needle.tmp"
replace_dir "$OUT/.needle.tmp" "$OUT/needle"
STATS+=("$OUT/needle/prompts/stats.json" "$OUT/needle/pred/preds.jsonl.stats.json"
        "$OUT/needle/results/summary_match.json")
stage_done
mv "$TIMES.tmp" "$TIMES"

echo; echo "=== [demo] done in ${SECONDS} s ==="
for path in "${STATS[@]}"; do
    [ -f "$path" ] || { echo "[demo] ERROR: missing $path" >&2; exit 1; }
    echo "[demo] stats: $path"
done
$PY -m longalign.demo.report --out "$OUT" --times "$TIMES"
echo "[demo] trained model: $OUT/model"
echo "[demo] summary: $OUT/summary.md, $OUT/summary.json"
echo "[demo] heatmap: $OUT/needle/results/heatmap_match.png"
