#!/usr/bin/env bash
# Needle test of a (tiny) model end to end, offline: prompts -> predictions -> match scores -> heatmap.
#   bash Needle_test/demo.sh MODEL_DIR [OUT_DIR]
# HAYSTACK (default ../shared/data/haystack, else Needle_test/PaulGrahamEssays) holds the *.txt essays;
# MAX_NEW_TOKENS (default 64) bounds each answer (the needle is about 20 words); NEEDLE_MAX_LEN
# (default 2048) is the longest context, in tokens.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
MODEL=${1:?usage: bash Needle_test/demo.sh MODEL_DIR [OUT_DIR]}
OUT=$(realpath -m "${2:-outputs/needle_demo}")
HAYSTACK=${HAYSTACK:-../shared/data/haystack}
[ -d "$HAYSTACK" ] || HAYSTACK=Needle_test/PaulGrahamEssays
HAYSTACK=$(realpath -m "$HAYSTACK")
MODEL=$(realpath -m "$MODEL")
mkdir -p "$OUT"
NEEDLE='"\nThe best thing to do in San Francisco is eat a sandwich and sit in Dolores Park on a sunny day.\n"'
cat > "$OUT/config-prompt.yaml" <<YAML
prompt:
  needle: $NEEDLE
  haystack_dir: "$HAYSTACK"
  retrieval_question: "What is the best thing to do in San Francisco? Here is the most relevant sentence in the context:"
context: {min_len: 256, max_len: ${NEEDLE_MAX_LEN:-2048}, count: 4, list: null}
document_depth: {min_percent: 0, max_percent: 100, count: 5, interval_type: linear, list: null}
tokenizer: {model_name: "$MODEL"}
final_context_buffer: 100
save_dir: prompts
YAML
cat > "$OUT/config-pred.yaml" <<YAML
model: {model: "$MODEL", chat_format: null, dtype: auto}
generation: {max_new_tokens: ${MAX_NEW_TOKENS:-64}, temperature: 0.1, seed: 42}
prompt_dir: prompts
save_file: pred/preds.jsonl
YAML
cat > "$OUT/config-eval.yaml" <<YAML
pred_file: pred/preds.jsonl
save_dir: results
scorer: match
key_facts: ["eat a sandwich", "Dolores Park", "sunny day"]
YAML
$PY Needle_test/prompt.py --config "$OUT/config-prompt.yaml"
$PY Needle_test/pred.py --config "$OUT/config-pred.yaml"
$PY Needle_test/eval.py --config "$OUT/config-eval.yaml"
$PY Needle_test/vis.py --config "$OUT/config-eval.yaml" --title "Needle test: $(basename "$MODEL")"
