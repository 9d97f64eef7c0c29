# Shared launcher of the paper's recipes (sourced by scripts/{chatglm,llama}_*.sh, not run alone).
# The caller sets MODEL, DATA, OUT, GRAD_ACCUM and BATCH_ARGS (the batching flags); everything
# here is the paper's common setting: DeepSpeed ZeRO-3 with CPU offload, bf16, gradient
# checkpointing, 2 epochs, lr 2e-5 cosine with 3% warm-up, Adam betas (0.9, 0.95), no weight
# decay, per-device batch 1. Every default can be overridden from the environment; the caller's
# extra arguments go on to train.py (e.g. --max_steps 20, --recompute selective).
# Speed: by default train.py picks its fastest settings that fit the GPU (recompute policy by memory,
# compiled layers; logged at start, longalign/train/speed/memory_model.py); PAPER_EXACT=1 adds --paper_exact,
# which runs exactly the flags below (transformers' gradient checkpointing, no compile).
# SP=N (pack scripts): each pack is split over N GPUs (DeepSpeed Ulysses, train.py
# --sequence_parallel_size) and the gradient accumulation is multiplied by N, so a step still
# trains NUM_GPUS x GRAD_ACCUM packs; build them with sort_and_group.py --group_size NUM_GPUS/N
# and the longer --max_length (e.g. 262144) that SP makes room for.
# Several nodes (README "Several nodes"), through DeepSpeed's own launcher:
#   HOSTFILE=path            DeepSpeed's --hostfile ("HOST slots=N" lines): run once, on one node; it
#                            starts every host over ssh (pdsh). The world size is the sum of the slots.
#   NNODES=M NODE_RANK=R MASTER_ADDR=A [MASTER_PORT=P]   one launcher per node (Slurm, Kubernetes):
#                            run on every node with its own R; NUM_GPUS (the same on every node) per node.
# Before anything starts, longalign/train/launch.py counts the world size W (NUM_GPUS, the slots, or
# NNODES x NUM_GPUS) and stops unless the data's group_size (DATA/<sort|pack>/stats.json) is a multiple
# of W / SP, naming both and the sort_and_group.py command that fixes it. PORT is MASTER_PORT's old name.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}  # runs longalign/train/launch.py (standard library only)
if [ -z "${HOSTFILE:-}" ]; then NUM_GPUS=${NUM_GPUS:-$(nvidia-smi -L | wc -l)}; fi
DS_CONFIG=${DS_CONFIG:-ds_config/stage3.json}
EPOCHS=${EPOCHS:-2}
LR=${LR:-2e-5}
SAVE_STEPS=${SAVE_STEPS:-100}
MASTER_PORT=${MASTER_PORT:-${PORT:-29500}}
SPEED_ARGS=()
if [ "${PAPER_EXACT:-0}" = 1 ]; then SPEED_ARGS=(--paper_exact); fi
SP=${SP:-1}
PER_DEVICE_BATCH=1
METHOD=""
for i in "${!BATCH_ARGS[@]}"; do
    if [ "${BATCH_ARGS[$i]}" = --batch_method ]; then METHOD=${BATCH_ARGS[$((i + 1))]}; fi
done
NODE_HOSTFILE=""  # NNODES form: DeepSpeed's --no_ssh reads the node list from a hostfile written here
if [ -n "${NNODES:-}" ]; then
    NODE_HOSTFILE=$(mktemp "${TMPDIR:-/tmp}/longalign_hostfile.XXXXXX")
    trap 'rm -f "$NODE_HOSTFILE"' EXIT
fi
LAUNCHER_LINES=$("$PY" -m longalign.train.launch --train_file "$DATA" --batch_method "$METHOD" \
    --sequence_parallel_size "$SP" --per_device_batch "$PER_DEVICE_BATCH" --num_gpus "${NUM_GPUS:-}" \
    --hostfile "${HOSTFILE:-}" --nnodes "${NNODES:-}" --node_rank "${NODE_RANK:-}" \
    --master_addr "${MASTER_ADDR:-}" --master_port "$MASTER_PORT" --node_hostfile "$NODE_HOSTFILE")
mapfile -t LAUNCHER <<< "$LAUNCHER_LINES"

"${LAUNCHER[@]}" train.py \
    --model_name_or_path "$MODEL" \
    --train_file "$DATA" \
    --output_dir "$OUT" \
    "${BATCH_ARGS[@]}" \
    --deepspeed "$DS_CONFIG" \
    --bf16 \
    --gradient_checkpointing \
    --num_train_epochs "$EPOCHS" \
    --per_device_train_batch_size "$PER_DEVICE_BATCH" \
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
