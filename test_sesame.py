"""Evaluate SESAME / READ on (FP-/R-)RefCOCO(+/g) and ReasonSeg: sharded, resumable inference, then metrics.

    python test_sesame.py --cmd inference --val_dataset fprefcoco --pretrained_model_path tsunghanwu/SESAME \\
        --dataset_dir ./data --vis_save_path ./inference_dir [--process_num p --world_size w | --world_size w --launch]
    python test_sesame.py --cmd metrics --val_dataset fprefcoco --vis_save_path ./inference_dir

Inference writes one JSON line per query to {vis_save_path}/{dataset}_{split}/shard_{p}_of_{w}.jsonl
(evaluation/records.py) and can be stopped and restarted at any time. `--launch` starts all w shards
as processes, one per GPU, then computes the metrics. Metrics: evaluation/metrics.py.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Optional, Sequence

DATASETS = ("refcoco", "refcoco+", "refcocog", "fprefcoco", "fprefcoco+", "fprefcocog",
            "R-refcoco", "R-refcoco+", "R-refcocog", "ReasonSeg")
SPLITS = ("val", "test", "testA", "testB")


def build_parser() -> argparse.ArgumentParser:
    from engine.build import add_predictor_arguments
    from engine.config import EngineConfig
    from utils.errors import add_debug_flag

    engine = EngineConfig()
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--cmd", choices=("inference", "metrics"), default="inference")
    p.add_argument("--process_num", type=int, default=0, help="this process's shard")
    p.add_argument("--world_size", type=int, default=None,
                   help="number of shards (inference: default 1; metrics: default the one on disk)")
    p.add_argument("--launch", action="store_true",
                   help="start all --world_size shards as processes (one GPU each, see --gpus), then run metrics")
    p.add_argument("--gpus", default=None, help="comma-separated GPU ids for --launch (default: all visible)")
    add_predictor_arguments(p)
    p.add_argument("--val_dataset", choices=DATASETS, default="fprefcoco")
    p.add_argument("--split", choices=SPLITS, default="val")
    p.add_argument("--dataset_dir", default="./data")
    p.add_argument("--vis_save_path", default="./inference_dir")
    p.add_argument("--model_max_length", type=int, default=512,
                   help="longest text prompt in tokens (image patches not counted); longer prompts are an error")
    p.add_argument("--seed", type=int, default=0, help="seeds the question-template choice of the eval set")
    p.add_argument("--reason_seg_template", choices=("lisa", "sesame"), default="lisa",
                   help="ReasonSeg question wording: LISA's fixed prompts (what READ reports) or SESAME's templates")
    p.add_argument("--queries_per_batch", type=int, default=None,
                   help="queries decoded together (KV memory grows with it); default: as many as free GPU memory "
                        "allows, up to 512")
    p.add_argument("--sam_batch", type=int, default=None, help="images per CLIP / SAM encoder call (default: from "
                   "free GPU memory, up to 8)")
    p.add_argument("--prefix_batch", type=int, default=None, help="images per LLM prefix pass (default: from free GPU "
                   "memory, up to 32)")
    p.add_argument("--slots_per_group", type=int, default=engine.slots_per_group,
                   help="queries of one image sharing one cached prefix")
    p.add_argument("--cuda_graphs", action="store_true",
                   help="replay decode steps as captured CUDA graphs (each new step shape costs a capture)")
    p.add_argument("--column_block", type=int, default=engine.column_block,
                   help="with --cuda_graphs: a step reads the KV cache in blocks of this many columns (larger: fewer "
                        "step shapes to capture, more masked columns read)")
    p.add_argument("--compile_sam", action="store_true",
                   help="torch.compile SAM's image encoder (a one-time compile of about a minute)")
    p.add_argument("--no_overlap_sam", action="store_true",
                   help="run SAM's image encoder on the main CUDA stream, not beside the LLM (for comparison)")
    p.add_argument("--num_workers", type=int, default=4, help="image loading / preprocessing threads (0: inline)")
    p.add_argument("--limit_images", type=int, default=0, help="evaluate only the first N images (0: all)")
    p.add_argument("--on_error", choices=("stop", "skip"), default="stop",
                   help="a ref, annotation or image that cannot be read: stop with one line naming it, or skip it and "
                        "count it (found / evaluated / skipped with reasons go to metrics.json)")
    p.add_argument("--visualize", action="store_true",
                   help="save mask overlays (and SasP maps/points for READ) under {dataset}_{split}/vis/")
    p.add_argument("--allow_partial", action="store_true", help="metrics over shards that are not finished")
    p.add_argument("--no_progress", action="store_true")
    add_debug_flag(p)
    return p


def engine_config(args):
    from engine.config import EngineConfig

    return EngineConfig(queries_per_batch=args.queries_per_batch, sam_batch=args.sam_batch,
                        prefix_batch=args.prefix_batch, slots_per_group=args.slots_per_group,
                        cuda_graphs=args.cuda_graphs, column_block=args.column_block, compile_sam=args.compile_sam,
                        overlap_sam=not args.no_overlap_sam)


def load_eval_images(args):
    """The evaluation set's images (the first --limit_images) and its EvalSetReport."""
    from dataset.eval_report import EvalSetReport
    from dataset.eval_sets import build_eval_dataset

    kwargs = {"question_style": args.reason_seg_template} if args.val_dataset == "ReasonSeg" else {}
    report = EvalSetReport()
    images = build_eval_dataset(args.val_dataset, args.dataset_dir, split=args.split, seed=args.seed,
                                on_error=args.on_error, report=report, **kwargs)
    print(report.summary(), file=sys.stderr)
    return (images[:args.limit_images] if args.limit_images else images), report


def image_reader(args, report):
    """read(image) -> RGB, or None for an image skipped under --on_error skip (counted in `report`)."""
    from dataset.eval_sets import read_eval_image

    return lambda image: read_eval_image(image, args.on_error, report)


def eval_run(args):
    from evaluation.runner import EvalRun

    return EvalRun(dataset=args.val_dataset, split=args.split, vis_save_path=args.vis_save_path,
                   process_num=args.process_num, world_size=args.world_size or 1, num_workers=args.num_workers,
                   visualize=args.visualize, progress=not args.no_progress)


def run_metrics(args) -> dict:
    from evaluation.report import write_metrics

    return write_metrics(args.vis_save_path, args.val_dataset, args.split, world_size=args.world_size,
                         allow_partial=args.allow_partial)


def main(argv: Optional[Sequence[str]] = None) -> int:
    from utils.errors import InputError

    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    if args.world_size is not None and args.world_size < 1:
        raise InputError(f"--world_size must be >= 1, got {args.world_size}")
    if args.limit_images < 0:
        raise InputError(f"--limit_images must be >= 0, got {args.limit_images}")
    try:
        engine_config(args)
    except ValueError as e:  # a batch size below 1
        raise InputError(str(e).replace("EngineConfig.", "--")) from None
    if args.cmd == "metrics":
        run_metrics(args)
        return 0
    if args.launch:
        from evaluation.launch import launch_shards, visible_gpus

        rc = launch_shards(os.path.abspath(__file__), argv, args.world_size or 1, visible_gpus(args.gpus))
        if rc == 0:
            run_metrics(args)
        return rc
    from engine.build import load_predictor
    from evaluation.runner import run_shard

    images, report = load_eval_images(args)
    predictor = load_predictor(args, config=engine_config(args), max_text_tokens=args.model_max_length)
    print(json.dumps(run_shard(eval_run(args), predictor, images, image_reader(args, report), report)))
    return 0


if __name__ == "__main__":
    from utils.errors import run_main

    sys.exit(run_main(main))
