#!/usr/bin/env bash
# The tiny offline demo (`make demo`): the whole recipe on the embedded default data.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=${OUT:-data/demo}
$PY -m longalign.demo_data --out "$OUT/raw"
$PY pre_tokenize.py --model llama --tokenizer "$OUT/raw/tokenizer" \
    --long "$OUT/raw/long.jsonl" --short "$OUT/raw/sharegpt.jsonl" \
    --datanum 10k --max_length 8192 --output_dir "$OUT/llama/10k"
