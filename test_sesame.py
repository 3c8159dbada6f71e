"""Evaluate SESAME / READ on (FP-/R-)RefCOCO(+/g) and ReasonSeg: sharded, resumable inference, then metrics.

    python test_sesame.py --cmd inference --val_dataset fprefcoco --pretrained_model_path tsunghanwu/SESAME \\
        --dataset_dir ./dataset --vis_save_path ./inference_dir [--process_num p --world_size w | --world_size w --launch]
    python test_sesame.py --cmd metrics --val_dataset fprefcoco --vis_save_path ./inference_dir

Inference writes one JSON line per query to {vis_save_path}/{dataset}_{split}/shard_{p}_of_{w}.jsonl
(see utils/records.py) and can be stopped and restarted at any time. `--launch` starts all w shards
as processes, one per GPU, then computes the metrics. Metrics: utils/metrics.py.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections import deque
from contextlib import contextmanager
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Optional, Sequence

import numpy as np
import torch

DATASETS = ("refcoco", "refcoco+", "refcocog", "fprefcoco", "fprefcoco+", "fprefcocog",
            "R-refcoco", "R-refcoco+", "R-refcocog", "ReasonSeg")
SPLITS = ("val", "test", "testA", "testB")
PRECISIONS = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def build_parser() -> argparse.ArgumentParser:
    from model.sasp import add_sasp_arguments

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--cmd", choices=("inference", "metrics"), default="inference")
    p.add_argument("--process_num", type=int, default=0, help="this process's shard")
    p.add_argument("--world_size", type=int, default=None,
                   help="number of shards (inference: default 1; metrics: default the one on disk)")
    p.add_argument("--launch", action="store_true",
                   help="start all --world_size shards as processes (one GPU each, see --gpus), then run metrics")
    p.add_argument("--gpus", default=None, help="comma-separated GPU ids for --launch (default: all visible)")
    p.add_argument("--pretrained_model_path", default="tsunghanwu/SESAME")
    p.add_argument("--vision_tower", default=None, help="CLIP tower overriding the checkpoint's config.json")
    p.add_argument("--val_dataset", choices=DATASETS, default="fprefcoco")
    p.add_argument("--split", choices=SPLITS, default="val")
    p.add_argument("--dataset_dir", default="./dataset")
    p.add_argument("--vis_save_path", default="./inference_dir")
    p.add_argument("--model_max_length", type=int, default=512,
                   help="longest text prompt in tokens (image patches not counted); longer prompts are an error")
    p.add_argument("--max_new_tokens", type=int, default=512)
    p.add_argument("--seed", type=int, default=0, help="seeds the question-template choice of the eval set")
    p.add_argument("--conv_type", choices=("llava_v1", "vicuna_v1"), default="vicuna_v1",
                   help="system prompt: vicuna_v1 is what the original evaluation used (its published numbers), "
                        "llava_v1 what training used")
    p.add_argument("--reason_seg_template", choices=("lisa", "sesame"), default="lisa",
                   help="ReasonSeg question wording: LISA's fixed prompts (what READ reports) or SESAME's templates")
    p.add_argument("--precision", choices=tuple(PRECISIONS), default="bf16")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--queries_per_batch", type=int, default=256, help="queries decoded together (KV memory grows with it)")
    p.add_argument("--slots_per_group", type=int, default=8, help="queries of one image sharing one cached prefix")
    p.add_argument("--cuda_graphs", action="store_true",
                   help="replay decode steps as captured CUDA graphs (faster steps, but each new step shape "
                        "costs a capture; measured slower overall at the default batch)")
    p.add_argument("--compile_sam", action="store_true",
                   help="torch.compile SAM's image encoder: about 2x faster per image after a one-time compile "
                        "of about a minute, so only worth it for long runs")
    p.add_argument("--num_workers", type=int, default=4, help="image loading / preprocessing threads (0: inline)")
    p.add_argument("--limit_images", type=int, default=0, help="evaluate only the first N images (0: all)")
    p.add_argument("--visualize", action="store_true",
                   help="save mask overlays (and SasP maps/points for READ) under {dataset}_{split}/vis/")
    p.add_argument("--allow_partial", action="store_true", help="metrics over shards that are not finished")
    p.add_argument("--no_progress", action="store_true")
    add_sasp_arguments(p)
    return p


# --- model and data --------------------------------------------------------------------------
def load_model(args):
    """LoadedSesame with the SasP settings the flags ask for (READ checkpoints bring their own)."""
    from model.builder import load_pretrained
    from model.sasp import sasp_config_from_args

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    loaded = load_pretrained(args.pretrained_model_path, vision_tower=args.vision_tower,
                             dtype=PRECISIONS[args.precision], device=device)
    # SasP has no weights: switching it on or changing its knobs after loading is exact.
    loaded.model.config.sasp = sasp_config_from_args(args, loaded.model.config.sasp)
    return loaded


def load_eval_images(args):
    from dataset.eval_sets import build_eval_dataset

    kwargs = {"question_style": args.reason_seg_template} if args.val_dataset == "ReasonSeg" else {}
    images = build_eval_dataset(args.val_dataset, args.dataset_dir, split=args.split, seed=args.seed, **kwargs)
    if args.limit_images:
        images = images[:args.limit_images]
    return images


def check_unique_keys(images) -> None:
    seen = {}
    for im in images:
        for q in im.queries:
            key = (int(im.image_id), int(q.ref_id), int(q.sent_id))
            if key in seen:
                raise ValueError(f"query key (image_id, ref_id, sent_id) = {key} occurs twice ({seen[key]} and "
                                 f"{im.image_path}); records could not be resumed")
            seen[key] = im.image_path


def read_rgb(path: str) -> np.ndarray:
    """The dataset reader's OpenCV decode; here an unreadable image stops the run (resume loses nothing)."""
    from dataset.image_io import SkipItem, read_image_rgb

    try:
        return read_image_rgb(path, "evaluation")
    except SkipItem as e:
        no_file = e.reason == "file not found"
        raise FileNotFoundError(f"cannot read image {path}" + (" (no such file)" if no_file else "")) from None


@dataclass
class PreparedImage:
    index: int
    clip_pixels: torch.Tensor
    sam: object  # model.transforms.SamInput
    gt_rles: list  # per pending query: (gt_mask RLE or None, gt_ignore RLE or None)
    rgb: Optional[np.ndarray]


def ground_truth_rles(image, query) -> tuple[Optional[dict], Optional[dict]]:
    """RLEs of a query's foreground (label 1; none for a false premise) and ignore pixels (255)."""
    from utils.mask_io import encode_optional

    gt = np.asarray(query.gt_mask)
    if gt.shape != (image.height, image.width):
        raise ValueError(f"{image.image_path} ref {query.ref_id} sent {query.sent_id}: gt_mask is {gt.shape}, "
                         f"image is {(image.height, image.width)}")
    return (encode_optional(gt == 1) if query.gt_exists else None), encode_optional(gt == 255)


class ImageFiles:
    """Decode, CLIP and SAM preprocessing and ground-truth RLEs of one pending image.
    pending: (EvalImage, queries still to run) per item."""

    def __init__(self, pending, clip_transform, sam_transform, keep_rgb: bool, pin: bool = False):
        self.pending, self.clip, self.sam, self.keep_rgb = pending, clip_transform, sam_transform, keep_rgb
        self.pin = pin  # page-locked pixels: the engine's host-to-GPU copies then run without blocking it

    def __len__(self) -> int:
        return len(self.pending)

    def __call__(self, i: int) -> PreparedImage:
        im, todo = self.pending[i]
        rgb = read_rgb(im.image_path)
        if rgb.shape[:2] != (im.height, im.width):
            raise ValueError(f"{im.image_path}: image is {rgb.shape[0]}x{rgb.shape[1]} but the annotation says "
                             f"{im.height}x{im.width}")
        clip, sam = self.clip(rgb), self.sam.resized(rgb)  # the engine normalises SAM's input on the GPU
        if self.pin:
            clip, sam = clip.pin_memory(), replace(sam, pixels=sam.pixels.pin_memory())
        return PreparedImage(i, clip, sam, [ground_truth_rles(im, q) for q in todo], rgb if self.keep_rgb else None)


def prefetched(fn, count: int, workers: int, lookahead: int):
    """fn(0), fn(1), ... in order, computed `lookahead` items ahead by `workers` threads.

    Threads, not processes: decoding and resizing run in OpenCV / Pillow / numpy code that releases
    the GIL, and nothing has to go through shared memory (a 1024^2 SAM input is 12 MB, more than a
    container's default /dev/shm holds a few of)."""
    if workers <= 0:
        for i in range(count):
            yield fn(i)
        return
    pool = ThreadPoolExecutor(workers, thread_name_prefix="eval-loader")
    futures: deque = deque()
    try:
        for i in range(count):
            futures.append(pool.submit(fn, i))
            if len(futures) > lookahead:
                yield futures.popleft().result()
        while futures:
            yield futures.popleft().result()
    finally:
        for f in futures:
            f.cancel()
        pool.shutdown(wait=True)


# --- inference -------------------------------------------------------------------------------
@contextmanager
def quick_gil_handoff(seconds: float = 0.0005):
    """The main thread issues every GPU kernel, one Python call each; with loader and record threads
    busy it waits for the GIL up to Python's switch interval (5 ms by default) each time it asks.
    A shorter interval for the run (restored after) keeps the GPU fed; measured on an H200:
    116-119 vs 108-120 queries/s (benchmarks/RESULTS.md)."""
    old = sys.getswitchinterval()
    sys.setswitchinterval(min(old, seconds))
    try:
        yield
    finally:
        sys.setswitchinterval(old)


def _record(image, query, gt_rles, pred, tokenizer, special_ids):
    from utils.mask_io import encode_optional
    from utils.records import QueryRecord

    ids = [t for t in pred.output_ids if t != special_ids.eos]
    first = pred.masks[0].numpy() if pred.masks.shape[0] else None
    return QueryRecord(
        image_id=int(image.image_id), ref_id=int(query.ref_id), sent_id=int(query.sent_id), image_path=image.image_path,
        sentence=query.sentence, question=query.question,
        answer=tokenizer.decode(ids, skip_special_tokens=True).strip(),
        gt_exists=bool(query.gt_exists), pred_exists=bool(pred.exists), pred_mask=encode_optional(first),
        gt_mask=gt_rles[0], gt_ignore=gt_rles[1], height=int(image.height), width=int(image.width),
        gt_sent=query.gt_sent, num_seg=sum(t == special_ids.seg for t in pred.output_ids), extra=dict(query.extra))


def _visualize(out_dir: str, image, query, pred, rgb: np.ndarray, answer: str) -> None:
    from utils.visualize import write_query_outputs

    directory = os.path.join(out_dir, "vis", f"{image.image_id}_{query.ref_id}_{query.sent_id}")
    os.makedirs(directory, exist_ok=True)
    write_query_outputs(directory, rgb, pred.masks.numpy(), answer)
    if getattr(pred, "sasp", None) is not None:
        from utils.visualize_sasp import save_sasp_pngs

        save_sasp_pngs(directory, rgb, pred.sasp, pred.masks.numpy())


def run_inference(args, loaded, images, engine_hook=None, timer=None) -> dict:
    """Evaluate this process's shard of `images`, appending records; returns counts.
    engine_hook / timer: passed to the engine (tests force tokens; the benchmark splits time by stage)."""
    from model.conversation import build_prompt, tokenize_with_image
    from model.inference import BatchedInference, EngineConfig, ImageWork, batch_images
    from utils.records import ShardWriter, shard_items, shard_path

    world_size = args.world_size or 1
    check_unique_keys(images)
    shard = shard_items(images, args.process_num, world_size)
    path = shard_path(args.vis_save_path, args.val_dataset, args.split, args.process_num, world_size)
    model, tokenizer, ids = loaded.model, loaded.tokenizer, loaded.token_ids
    torch.manual_seed(args.seed)

    with ShardWriter(path) as writer, quick_gil_handoff():
        pending = []  # (image, queries not yet recorded)
        for im in shard:
            todo = [q for q in im.queries if (int(im.image_id), int(q.ref_id), int(q.sent_id)) not in writer.done]
            if todo:
                pending.append((im, todo))
        total = sum(len(t) for _, t in pending)
        already = sum(len(im.queries) for im in shard) - total
        prompts = []
        for im, todo in pending:
            row = []
            for q in todo:
                prompt = tokenize_with_image(build_prompt(q.question, template=args.conv_type,
                                                          use_mm_start_end=model.config.use_mm_start_end), tokenizer)
                if len(prompt) - 1 > args.model_max_length:
                    raise ValueError(f"{im.image_path} sent {q.sent_id}: prompt has {len(prompt) - 1} text tokens, "
                                     f"more than --model_max_length {args.model_max_length}")
                row.append(prompt)
            prompts.append(row)

        engine = BatchedInference(model, EngineConfig(max_new_tokens=args.max_new_tokens, eos_token_id=ids.eos,
                                                      pad_token_id=ids.pad, slots_per_group=args.slots_per_group,
                                                      cuda_graphs=args.cuda_graphs,
                                                      compile_sam=args.compile_sam),
                                  logits_hook=engine_hook, timer=timer)
        files = ImageFiles(pending, loaded.clip_transform, loaded.sam_transform, args.visualize,
                           pin=model.device.type == "cuda")
        per_image = max(1.0, total / max(1, len(pending)))
        lookahead = int(min(256, max(2 * args.num_workers, 2 * args.queries_per_batch / per_image + 1)))
        loader = prefetched(files, len(files), args.num_workers, lookahead)
        progress = None
        if not args.no_progress:
            from tqdm import tqdm

            progress = tqdm(total=total, unit="q", dynamic_ncols=True, position=args.process_num,
                            desc=f"{args.val_dataset} {args.split} {args.process_num}/{world_size}")
        out_dir = os.path.dirname(path)

        def save(batch, predictions) -> int:
            records = []
            for item, preds in zip(batch, predictions):
                im, todo = pending[item.index]
                for q, gt_rles, pred in zip(todo, item.gt_rles, preds):
                    rec = _record(im, q, gt_rles, pred, tokenizer, ids)
                    records.append(rec)
                    if args.visualize:
                        _visualize(out_dir, im, q, pred, item.rgb, rec.answer)
            writer.write(records)
            if progress is not None:
                progress.update(len(records))
            return len(records)

        # Records (RLE, JSON, fsync) of batch k are written by one background thread while the GPU
        # runs batch k+1: in input order, at most one batch in flight, its errors raised here.
        start, done_now = time.perf_counter(), 0
        waited = {"loader": 0.0, "records": 0.0}  # main-thread time spent waiting, for benchmarks
        saver = ThreadPoolExecutor(1, thread_name_prefix="eval-records")
        saving = None
        # batches are planned from the query counts, before any image is loaded, so that the engine
        # can take each batch's images as they arrive (its encoders start on the first few)
        plan = batch_images(range(len(pending)), lambda i: len(pending[i][1]), args.queries_per_batch)

        def arriving(count: int, batch: list):
            for _ in range(count):
                t0 = time.perf_counter()
                item = next(loader)
                waited["loader"] += time.perf_counter() - t0
                batch.append(item)
                yield ImageWork(item.clip_pixels, item.sam.pixels, item.sam.resized_size, item.sam.original_size,
                                prompts[item.index])

        try:
            for indices in plan:
                batch: list = []
                predictions = engine.run(arriving(len(indices), batch))
                t0 = time.perf_counter()
                if saving is not None:
                    done_now += saving.result()
                waited["records"] += time.perf_counter() - t0
                saving = saver.submit(save, batch, predictions)
            t0 = time.perf_counter()
            if saving is not None:
                done_now += saving.result()
            waited["records"] += time.perf_counter() - t0
        finally:
            saver.shutdown(wait=True)  # a batch being written is finished, never torn
        if progress is not None:
            progress.close()
        seconds = time.perf_counter() - start
        writer.mark_complete(len(shard), sum(len(im.queries) for im in shard))
    return {"shard": path, "queries_run": done_now, "queries_skipped": already, "seconds": seconds,
            "queries_per_s": done_now / seconds if seconds > 0 else None,
            "decode_graphs": {"captures": engine.graph_captures, "failed": engine.graph_failure},
            "waited_s": waited}


# --- metrics ---------------------------------------------------------------------------------
def run_metrics(args) -> dict:
    from utils.metrics import evaluate_records, format_table
    from utils.records import merge_shards, shard_dir

    directory = shard_dir(args.vis_save_path, args.val_dataset, args.split)
    merged = merge_shards(directory, args.world_size)
    if merged.incomplete and not args.allow_partial:
        raise RuntimeError(f"shards not finished: {', '.join(merged.incomplete)} (resume --cmd inference, "
                           "or pass --allow_partial)")
    groups = evaluate_records(merged.records, args.val_dataset)
    result = {"dataset": args.val_dataset, "split": args.split, "world_size": merged.world_size,
              "complete": not merged.incomplete, "metrics": groups}
    with open(os.path.join(directory, "metrics.json"), "w", encoding="utf-8") as f:
        json.dump(result, f, indent=2)
    print(format_table({f"{args.val_dataset} {args.split}": groups}))
    print(json.dumps(result))
    return result


# --- one command, all GPUs -------------------------------------------------------------------
def launch(args, argv: Sequence[str]) -> int:
    world_size = args.world_size or 1
    if args.gpus is not None:
        gpus = [g.strip() for g in args.gpus.split(",") if g.strip()]
    elif os.environ.get("CUDA_VISIBLE_DEVICES", "").strip():  # keep the caller's restriction
        gpus = [g.strip() for g in os.environ["CUDA_VISIBLE_DEVICES"].split(",") if g.strip()]
    else:
        gpus = [str(i) for i in range(torch.cuda.device_count())]
    child_argv = [a for a in argv if a != "--launch"]
    procs = []
    for k in range(world_size):
        env = dict(os.environ)
        if gpus:
            env["CUDA_VISIBLE_DEVICES"] = gpus[k % len(gpus)]
        cmd = [sys.executable, os.path.abspath(__file__), *child_argv, "--cmd", "inference",
               "--process_num", str(k), "--world_size", str(world_size)]
        procs.append(subprocess.Popen(cmd, env=env))
    failed = [k for k, p in enumerate(procs) if p.wait() != 0]
    if failed:
        print(f"shards {failed} failed; rerun the same command to resume them", file=sys.stderr)
        return 1
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    if args.world_size is not None and args.world_size < 1:
        raise SystemExit(f"--world_size must be >= 1, got {args.world_size}")
    if args.max_new_tokens < 1 or args.queries_per_batch < 1 or args.limit_images < 0:
        raise SystemExit("--max_new_tokens and --queries_per_batch must be >= 1, --limit_images >= 0")
    if args.cmd == "metrics":
        run_metrics(args)
        return 0
    if args.launch:
        rc = launch(args, argv)
        if rc == 0:
            run_metrics(args)
        return rc
    images = load_eval_images(args)
    loaded = load_model(args)
    summary = run_inference(args, loaded, images)
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
