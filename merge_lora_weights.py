"""Merge a train_sesame.py DeepSpeed checkpoint into a model in the released layout.

    python merge_lora_weights.py --ckpt_dir runs/sesame/ckpt_model --save_path runs/sesame/hf_model

The result loads with test_sesame.py / demo.py (`--pretrained_model_path`), model.builder.load_pretrained
and the original SESAME code. The checkpoint directory describes its own network
(sesame_config.json + tokenizer/), so no base model is needed. Steps: training/merge.py.
"""
from __future__ import annotations

import argparse
import sys

import torch

from training.merge import merge_checkpoint
from utils.errors import add_debug_flag, run_main

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def main(argv=None) -> str:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--ckpt_dir", required=True, help="a ckpt_model or ckpt_model_best directory of a run")
    p.add_argument("--save_path", required=True, help="output directory (released layout)")
    p.add_argument("--tag", default=None, help="checkpoint tag (global_stepN); default: the 'latest' file")
    p.add_argument("--dtype", default="bf16", choices=sorted(DTYPES), help="weights dtype written (releases: bf16)")
    p.add_argument("--safe_serialization", action="store_true", help="safetensors instead of pytorch_model*.bin")
    p.add_argument("--vision_tower", default=None,
                   help="CLIP hub id or path to name in config.json (default: the one trained with)")
    add_debug_flag(p)
    args = p.parse_args(argv)
    out = merge_checkpoint(args.ckpt_dir, args.save_path, tag=args.tag, dtype=DTYPES[args.dtype],
                           safe_serialization=args.safe_serialization, vision_tower=args.vision_tower)
    print(f"merged model written to {out}")
    return out


if __name__ == "__main__":
    sys.exit(run_main(main))
