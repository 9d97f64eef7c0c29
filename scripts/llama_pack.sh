#!/usr/bin/env bash
# LongAlign-7B-64k recipe (paper §3.2, "packing + loss weighting"):
# Llama-2-7B-64k on LongAlign-10k + ShareGPT, packed 64k batches with the 1/N_k loss (--pack_loss).
# Needs DATA from pre_tokenize.py and `sort_and_group.py --train_file DATA --group_size NUM_GPUS`
# (train.py stops with a clear error otherwise). Shared settings and overrides: scripts/_launch.sh,
# e.g. NUM_GPUS=4 OUT=/tmp/run bash scripts/llama_pack.sh --max_steps 20
MODEL=${MODEL:-THUDM/LongAlign-7B-64k-base}
DATA=${DATA:-./data/llama/10k}
OUT=${OUT:-./output/llama_pack}
GRAD_ACCUM=${GRAD_ACCUM:-1}
BATCH_ARGS=(--batch_method pack --pack_loss)
source "$(dirname "$0")/_launch.sh" "$@"
