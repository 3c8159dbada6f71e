#!/usr/bin/env bash
# DeepSpeed checkpoint of train_sesame.py -> merged model in the released layout.
# Usage: bash merge_lora_weight.sh [CKPT_DIR] [SAVE_PATH] [extra flags of merge_lora_weights.py]
#   CKPT_DIR   default ./runs/$EXP_NAME/ckpt_model (or ckpt_model_best); EXP_NAME default sesame_bun
#   SAVE_PATH  default ./runs/$EXP_NAME/hf_model
# (The original converted with zero_to_fp32.py into a temporary .bin first; this does it in one pass.)
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)

EXP_NAME=${EXP_NAME:-sesame_bun}
CKPT_DIR=${1:-./runs/$EXP_NAME/ckpt_model}
SAVE_PATH=${2:-./runs/$EXP_NAME/hf_model}
shift $(( $# < 2 ? $# : 2 ))
PYTHON=${PYTHON:-python}

"$PYTHON" "$HERE/merge_lora_weights.py" --ckpt_dir "$CKPT_DIR" --save_path "$SAVE_PATH" "$@"
