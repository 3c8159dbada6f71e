#!/usr/bin/env bash
# SESAME training, the original's usage:
#   bash train_sesame.sh {ReferSeg|ReasonSeg} [GPUS] [MASTER_PORT] [extra train_sesame.py flags...]
#   e.g. bash train_sesame.sh ReferSeg localhost:0,1,2,3,4,5,6,7 15990
# GPUS is a DeepSpeed --include string (localhost:0,1 ...; node1:0,1@node2:0,1 with HOSTFILE set).
# Settings come from the environment (defaults = the original script):
#   VERSION (liuhaotian/llava-v1.5-7b), VISION_PRETRAINED (./checkpoints/sam_vit_h_4b8939.pth; set it
#   empty when VERSION is a released SESAME/READ checkpoint), DATASET_DIR (./data), EXP_NAME
#   (sesame_bun), BATCH_SIZE (12), GRAD_ACCUMULATION_STEPS (1), NUM_CLASSES_PER_SAMPLE (3),
#   HOSTFILE (multi-node), DRY_RUN=1 (print the command instead of running it).
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)

RECIPE=${1:-}
GPUS=${2:-localhost:0,1,2,3,4,5,6,7}
MASTER_PORT=${3:-15990}
shift $(( $# < 3 ? $# : 3 ))

VERSION=${VERSION:-liuhaotian/llava-v1.5-7b}
VISION_PRETRAINED=${VISION_PRETRAINED-./checkpoints/sam_vit_h_4b8939.pth}
DATASET_DIR=${DATASET_DIR:-./data}
EXP_NAME=${EXP_NAME:-sesame_bun}
BATCH_SIZE=${BATCH_SIZE:-12}
GRAD_ACCUMULATION_STEPS=${GRAD_ACCUMULATION_STEPS:-1}
NUM_CLASSES_PER_SAMPLE=${NUM_CLASSES_PER_SAMPLE:-3}
SAM_URL=https://dl.fbaipublicfiles.com/segment_anything/sam_vit_h_4b8939.pth

case "$RECIPE" in
  ReferSeg)   # SESAME: RefCOCO* : FP-RefCOCO* : LLaVA-Instruct-150k : R-RefCOCO* = 12:2:2:1
    DATASET="refer_seg||correct_refer_seg||vqa||neg_refer_seg"
    SAMPLE_RATES="12,2,2,1" ;;
  ReasonSeg)  # the ReasonSeg mixture (sem-seg sources, refer sets, VQA, FP-augmented ReasonSeg)
    DATASET="sem_seg||refer_seg||correct_refer_seg||vqa||neg_refer_seg||reason_seg"
    SAMPLE_RATES="10,10,2,3,1,1" ;;
  *)
    echo "usage: bash train_sesame.sh {ReferSeg|ReasonSeg} [GPUS, e.g. localhost:0,1] [MASTER_PORT] [flags...]" >&2
    exit 2 ;;
esac

if [ -n "$VISION_PRETRAINED" ] && [ ! -f "$VISION_PRETRAINED" ]; then
  if [ "${DRY_RUN:-0}" = 1 ]; then
    echo "# would download $SAM_URL to $VISION_PRETRAINED" >&2
  else
    echo "SAM ViT-H weights not found at $VISION_PRETRAINED; downloading $SAM_URL" >&2
    mkdir -p "$(dirname "$VISION_PRETRAINED")"
    if ! { command -v wget >/dev/null && wget -q -O "$VISION_PRETRAINED.part" "$SAM_URL"; } &&
       ! { command -v curl >/dev/null && curl -fsSL -o "$VISION_PRETRAINED.part" "$SAM_URL"; }; then
      rm -f "$VISION_PRETRAINED.part"
      echo "could not download $SAM_URL: fetch it by hand and set VISION_PRETRAINED" >&2
      exit 1
    fi
    mv "$VISION_PRETRAINED.part" "$VISION_PRETRAINED"
  fi
fi

LAUNCH=(deepspeed)
if [ -n "${HOSTFILE:-}" ]; then LAUNCH+=(--hostfile "$HOSTFILE"); fi
LAUNCH+=(--include "$GPUS" --master_port="$MASTER_PORT")

ARGS=("$HERE/train_sesame.py"
  --version "$VERSION"
  --dataset_dir "$DATASET_DIR"
  --dataset "$DATASET"
  --sample_rates "$SAMPLE_RATES"
  --exp_name "$EXP_NAME"
  --batch_size "$BATCH_SIZE"
  --grad_accumulation_steps "$GRAD_ACCUMULATION_STEPS"
  --num_classes_per_sample "$NUM_CLASSES_PER_SAMPLE")
if [ -n "$VISION_PRETRAINED" ]; then ARGS+=(--vision_pretrained "$VISION_PRETRAINED"); fi

if [ "${DRY_RUN:-0}" = 1 ]; then
  printf '%q ' "${LAUNCH[@]}" "${ARGS[@]}" "$@"; echo
else
  exec "${LAUNCH[@]}" "${ARGS[@]}" "$@"
fi
