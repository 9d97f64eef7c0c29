# Shared launcher of the paper's recipes (sourced by scripts/{chatglm,llama}_*.sh, not run alone).
# The caller sets MODEL, DATA, OUT, GRAD_ACCUM and BATCH_ARGS (the batching flags); everything
# here is the paper's common setting: DeepSpeed ZeRO-3 with CPU offload, bf16, gradient
# checkpointing, 2 epochs, lr 2e-5 cosine with 3% warm-up, Adam betas (0.9, 0.95), no weight
# decay, per-device batch 1. Every default can be overridden from the environment; the caller's
# extra arguments go on to train.py (e.g. --max_steps 20, --recompute selective).
# Speed: by default train.py picks its fastest settings that fit the GPU (recompute policy by memory,
# compiled layers; logged at start, longalign/performance.py); PAPER_EXACT=1 adds --paper_exact,
# which runs exactly the flags below (transformers' gradient checkpointing, no compile).
# SP=N (pack scripts): each pack is split over N GPUs (DeepSpeed Ulysses, train.py
# --sequence_parallel_size) and the gradient accumulation is multiplied by N, so a step still
# trains NUM_GPUS x GRAD_ACCUM packs; build them with sort_and_group.py --group_size NUM_GPUS/N
# and the longer --max_length (e.g. 262144) that SP makes room for.
set -euo pipefail
cd "$(dirname "$0")/.."
NUM_GPUS=${NUM_GPUS:-$(nvidia-smi -L | wc -l)}
DS_CONFIG=${DS_CONFIG:-ds_config/stage3.json}
EPOCHS=${EPOCHS:-2}
LR=${LR:-2e-5}
SAVE_STEPS=${SAVE_STEPS:-100}
PORT=${PORT:-29500}
SPEED_ARGS=()
if [ "${PAPER_EXACT:-0}" = 1 ]; then SPEED_ARGS=(--paper_exact); fi
SP=${SP:-1}

deepspeed --num_gpus "$NUM_GPUS" --master_port "$PORT" train.py \
    --model_name_or_path "$MODEL" \
    --train_file "$DATA" \
    --output_dir "$OUT" \
    "${BATCH_ARGS[@]}" \
    --deepspeed "$DS_CONFIG" \
    --bf16 \
    --gradient_checkpointing \
    --num_train_epochs "$EPOCHS" \
    --per_device_train_batch_size 1 \
    --gradient_accumulation_steps "$((GRAD_ACCUM * SP))" \
    --sequence_parallel_size "$SP" \
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
    ${SPEED_ARGS[@]+"${SPEED_ARGS[@]}"} \
    "$@"
