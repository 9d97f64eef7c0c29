#!/usr/bin/env bash
# LongAlign-7B-64k recipe (paper §3.2, "packing + loss weighting"):
# Llama-2-7B-64k on LongAlign-10k + ShareGPT, packed 64k batches with the 1/N_k loss (--pack_loss).
# Needs <DATA> from pre_tokenize.py and, for sort/pack, `sort_and_group.py --train_file <DATA>
# --group_size <NUM_GPUS x per-device batch>` (train.py stops with a clear error otherwise).
# Every default below can be overridden from the environment, e.g. NUM_GPUS=4 OUT=/tmp/run scripts/llama_pack.sh;
# extra arguments are passed on to train.py (e.g. --max_steps 20).
set -euo pipefail
cd "$(dirname "$0")/.."
NUM_GPUS=${NUM_GPUS:-$(nvidia-smi -L | wc -l)}
MODEL=${MODEL:-THUDM/LongAlign-7B-64k-base}
DATA=${DATA:-./data/llama/10k}
OUT=${OUT:-./output/llama_pack}
DS_CONFIG=${DS_CONFIG:-ds_config/stage3.json}
EPOCHS=${EPOCHS:-2}
LR=${LR:-2e-5}
GRAD_ACCUM=${GRAD_ACCUM:-1}
SAVE_STEPS=${SAVE_STEPS:-100}
PORT=${PORT:-29500}

deepspeed --num_gpus "$NUM_GPUS" --master_port "$PORT" train.py \
    --model_name_or_path "$MODEL" \
    --train_file "$DATA" \
    --output_dir "$OUT" \
    --batch_method pack --pack_loss \
    --deepspeed "$DS_CONFIG" \
    --bf16 \
    --gradient_checkpointing \
    --num_train_epochs "$EPOCHS" \
    --per_device_train_batch_size 1 \
    --gradient_accumulation_steps "$GRAD_ACCUM" \
    --learning_rate "$LR" \
    --lr_scheduler_type cosine \
    --warmup_steps 0.03 \
    --adam_beta1 0.9 \
    --adam_beta2 0.95 \
    --weight_decay 0 \
    --logging_steps 1 \
    --save_strategy steps \
    --save_steps "$SAVE_STEPS" \
    --save_total_limit 2 \
    --report_to "${REPORT_TO:-none}" \
    "$@"
