#!/usr/bin/env bash
# Evaluate a checkpoint on the original's six datasets (val split) over every visible GPU, then print
# the metrics of each. Interrupted runs resume where they stopped: rerun the same command.
#
#   bash eval_sesame.sh [MODEL] [DATASET_DIR] [OUT_DIR]
#
# Environment (all optional):
#   DATASETS="refcoco refcoco+ refcocog fprefcoco fprefcoco+ fprefcocog"   what to evaluate; add
#            R-refcoco R-refcoco+ R-refcocog ReasonSeg when wanted, or set WITH_EXTRA=1 for all of them
#   SPLIT=val   GPUS=0,1,...(default: all visible; GPUS=cpu, or no GPU visible: one CPU process)
#   PYTHON=python   EXTRA_ARGS="--use_sasp ..." (passed through to test_sesame.py)
set -euo pipefail
cd "$(dirname "$0")"

MODEL=${1:-tsunghanwu/SESAME}
DATASET_DIR=${2:-./data}
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
    echo "no GPU visible: evaluating on the CPU in one process (slow for a 7B model)" >&2
    GPUS=cpu
  else
    GPUS=$(seq -s, 0 $((N - 1)))
  fi
fi
if [ "$GPUS" = cpu ]; then
  WORLD=1
  RUN=(--device cpu --world_size 1)
else
  WORLD=$(echo "$GPUS" | tr ',' '\n' | grep -c .)
  RUN=(--launch --world_size "$WORLD" --gpus "$GPUS")
fi

for ds in $DATASETS; do
  echo "=== $ds ($SPLIT) on $([ "$GPUS" = cpu ] && echo "the CPU" || echo "GPUs $GPUS") ==="
  # one process per GPU, each with its own progress bar (queries/s); then the metrics of all shards
  # shellcheck disable=SC2086
  "$PYTHON" test_sesame.py --cmd inference "${RUN[@]}" \
    --pretrained_model_path "$MODEL" --val_dataset "$ds" --split "$SPLIT" \
    --dataset_dir "$DATASET_DIR" --vis_save_path "$OUT_DIR" ${EXTRA_ARGS:-}
done

echo "=== summary ==="
for ds in $DATASETS; do
  "$PYTHON" test_sesame.py --cmd metrics --val_dataset "$ds" --split "$SPLIT" --vis_save_path "$OUT_DIR" \
    --world_size "$WORLD" | head -n -1
done
