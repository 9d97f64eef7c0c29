#!/usr/bin/env bash
# Sorted-batching ablation (paper §3.2, "sorted batching") for ChatGLM3-6B-64k:
# the same data in length-sorted groups, per-device batch 1, gradient accumulation 12.
# Needs DATA from pre_tokenize.py and `sort_and_group.py --train_file DATA --group_size NUM_GPUS`
# (train.py stops with a clear error otherwise). Shared settings and overrides: scripts/_launch.sh,
# e.g. NUM_GPUS=4 OUT=/tmp/run bash scripts/chatglm_sort.sh --max_steps 20
MODEL=${MODEL:-THUDM/LongAlign-6B-64k-base}
DATA=${DATA:-./data/chatglm/10k}
OUT=${OUT:-./output/chatglm_sort}
GRAD_ACCUM=${GRAD_ACCUM:-12}
BATCH_ARGS=(--batch_method sort)
source "$(dirname "$0")/_launch.sh" "$@"
