#!/usr/bin/env bash
# Evaluate a checkpoint on the original's six datasets (val split) over every visible GPU, then print
# the metrics of each. Interrupted runs resume where they stopped: rerun the same command.
#
#   bash eval_sesame.sh [MODEL] [DATASET_DIR] [OUT_DIR]
#
# Environment (all optional):
#   DATASETS="refcoco refcoco+ refcocog fprefcoco fprefcoco+ fprefcocog"   what to evaluate; add
#            R-refcoco R-refcoco+ R-refcocog ReasonSeg when wanted, or set WITH_EXTRA=1 for all of them
#   SPLIT=val   GPUS=0,1,...(default: all)   PYTHON=python   EXTRA_ARGS="--use_sasp ..." (passed through)
set -euo pipefail
cd "$(dirname "$0")"

MODEL=${1:-tsunghanwu/SESAME}
DATASET_DIR=${2:-./dataset}
OUT_DIR=${3:-./inference_dir}
PYTHON=${PYTHON:-python}
SPLIT=${SPLIT:-val}
DATASETS=${DATASETS:-"refcoco refcoco+ refcocog fprefcoco fprefcoco+ fprefcocog"}
if [ "${WITH_EXTRA:-0}" = "1" ]; then
  DATASETS="$DATASETS R-refcoco R-refcoco+ R-refcocog ReasonSeg"
fi

if [ -z "${GPUS:-}" ]; then
  N=$("$PYTHON" -c "import torch; print(torch.cuda.device_count())")
  if [ "$N" -lt 1 ]; then
    echo "no GPU visible; set GPUS, or run test_sesame.py --device cpu for a CPU run" >&2
    exit 1
  fi
  GPUS=$(seq -s, 0 $((N - 1)))
fi
WORLD=$(echo "$GPUS" | tr ',' '\n' | grep -c .)

for ds in $DATASETS; do
  echo "=== $ds ($SPLIT) on GPUs $GPUS ==="
  # one process per GPU, each with its own progress bar (queries/s); then the metrics of all shards
  # shellcheck disable=SC2086
  "$PYTHON" test_sesame.py --cmd inference --launch --world_size "$WORLD" --gpus "$GPUS" \
    --pretrained_model_path "$MODEL" --val_dataset "$ds" --split "$SPLIT" \
    --dataset_dir "$DATASET_DIR" --vis_save_path "$OUT_DIR" ${EXTRA_ARGS:-}
done

echo "=== summary ==="
for ds in $DATASETS; do
  "$PYTHON" test_sesame.py --cmd metrics --val_dataset "$ds" --split "$SPLIT" --vis_save_path "$OUT_DIR" \
    --world_size "$WORLD" | head -n -1
done
