#!/usr/bin/env bash
# Device check (issue 5): the paper's four recipes, unchanged but for the model and the data, under
# DeepSpeed ZeRO-3 on small random-init models, 20 optimizer steps each.
#   NUM_GPUS=2 bash bench/scripts_smoke.sh        # logs in $WORK/log_<script>.txt
#   NNODES=1 NODE_RANK=0 MASTER_ADDR=127.0.0.1 NUM_GPUS=2 bash bench/scripts_smoke.sh   # the same through
#       the multi-node launcher form (DeepSpeed --no_ssh, one launcher per node; scripts/_launch.sh)
# Data: the embedded demo set (pre_tokenize -> sort_and_group --group_size NUM_GPUS). Models: random
# init, hidden 512, 4 layers (longalign.demo.tiny_model). DS_CONFIG defaults to ZeRO-3 without offload
# (the offload config needs DeepSpeed's CPU Adam op built).
set -euo pipefail
cd "$(dirname "$0")/.."
NUM_GPUS=${NUM_GPUS:-$(nvidia-smi -L | wc -l)}
WORK=${WORK:-/tmp/scripts_smoke}
PY=${PY:-python3}
STEPS=${STEPS:-20}
MAXLEN=8192
$PY -m longalign.demo.data --out "$WORK/raw"
for fam in llama chatglm; do
  $PY pre_tokenize.py --model $fam --tokenizer "$WORK/raw/tokenizer" --long "$WORK/raw/long.jsonl" \
      --short "$WORK/raw/sharegpt.jsonl" --datanum 10k --max_length $MAXLEN --output_dir "$WORK/$fam" \
      --overwrite_output_dir
  $PY sort_and_group.py --train_file "$WORK/$fam" --group_size "$NUM_GPUS" --max_length $MAXLEN
  $PY -m longalign.demo.tiny_model --family $fam --tokenizer "$WORK/raw/tokenizer" --out "$WORK/model_$fam" \
      --hidden 512 --layers 4 --heads 8 --kv_heads 2 --intermediate 1024 --max_positions $MAXLEN
done
for script in llama_pack llama_sort chatglm_pack chatglm_sort; do
  fam=${script%%_*}
  NUM_GPUS=$NUM_GPUS MODEL="$WORK/model_$fam" DATA="$WORK/$fam" OUT="$WORK/out_$script" \
  DS_CONFIG=${DS_CONFIG:-ds_config/stage3_no_offload.json} \
      bash scripts/$script.sh --max_steps "$STEPS" --save_strategy no --overwrite_output_dir 2>&1 | tee "$WORK/log_$script.txt"
done
