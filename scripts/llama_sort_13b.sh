#!/usr/bin/env bash
# LongAlign-13B-64k setting: Llama-2-13B-64k with sorted batching
# (per-device batch 1, gradient accumulation 12; same data and hyper-parameters as the 7B).
# Needs DATA from pre_tokenize.py and `sort_and_group.py --train_file DATA --group_size NUM_GPUS`
# (train.py stops with a clear error otherwise). Shared settings and overrides: scripts/_launch.sh,
# e.g. NUM_GPUS=4 OUT=/tmp/run bash scripts/llama_sort_13b.sh --max_steps 20
MODEL=${MODEL:-THUDM/LongAlign-13B-64k-base}
DATA=${DATA:-./data/llama/10k}
OUT=${OUT:-./output/llama_sort_13b}
GRAD_ACCUM=${GRAD_ACCUM:-12}
BATCH_ARGS=(--batch_method sort)
source "$(dirname "$0")/_launch.sh" "$@"
