"""The sharded, resumable evaluation runner: one shard of an evaluation set through a predictor.

Images are decoded and preprocessed by loader threads (evaluation/loading.py) while the predictor's
backend works on earlier ones; each batch's records (RLE, JSON, fsync) are written by one
background thread while the next batch runs (evaluation/records.py). A killed run is resumed by
running it again: queries already on disk are skipped, and an image with any query left is
answered whole again (its queries are always decoded together; only the missing records are
written), so a resumed run gives what an uninterrupted one gives, up to the batch dependence of
low-precision arithmetic noted in the README.
"""
from __future__ import annotations

import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
import torch

from engine.plan import batch_images
from model.predictor import SesamePredictor

from .loading import ImageLoader, prefetched
from .records import QueryRecord, ShardWriter, shard_items, shard_path
from .shard_scores import write_shard_scores


@dataclass
class EvalRun:
    """Which shard of which set, and where its records go."""

    dataset: str
    split: str
    vis_save_path: str
    process_num: int = 0
    world_size: int = 1
    num_workers: int = 4  # image loading threads (0: in the main thread)
    visualize: bool = False  # mask overlays (and SasP maps) under {dataset}_{split}/vis/
    progress: bool = True

    @property
    def shard_file(self) -> str:
        return shard_path(self.vis_save_path, self.dataset, self.split, self.process_num, self.world_size)


def check_unique_keys(images) -> None:
    seen = {}
    for im in images:
        for q in im.queries:
            key = (int(im.image_id), int(q.ref_id), int(q.sent_id))
            if key in seen:
                raise ValueError(f"query key (image_id, ref_id, sent_id) = {key} occurs twice ({seen[key]} and "
                                 f"{im.image_path}); records could not be resumed")
            seen[key] = im.image_path


@contextmanager
def quick_gil_handoff(seconds: float = 0.0005):
    """The main thread issues every GPU kernel, one Python call each; with loader and record threads
    busy it waits for the GIL up to Python's switch interval (5 ms by default) each time it asks.
    A shorter interval for the run (restored after) keeps the GPU fed (benchmarks/RESULTS.md)."""
    old = sys.getswitchinterval()
    sys.setswitchinterval(min(old, seconds))
    try:
        yield
    finally:
        sys.setswitchinterval(old)


def _record(predictor: SesamePredictor, image, query, gt_rles, prediction) -> QueryRecord:
    from utils.mask_io import encode_optional

    answer = predictor.answer_of(query.question, prediction)
    if prediction.rles is not None:  # made by the backend: the first mask's, when it has pixels
        pred_mask = prediction.rles[0] if answer.see else None
    else:
        pred_mask = encode_optional(answer.masks[0].numpy() if answer.num_seg else None)
    return QueryRecord(
        image_id=int(image.image_id), ref_id=int(query.ref_id), sent_id=int(query.sent_id), image_path=image.image_path,
        sentence=query.sentence, question=query.question, answer=answer.text, gt_exists=bool(query.gt_exists),
        pred_exists=bool(answer.see), pred_mask=pred_mask, gt_mask=gt_rles[0], gt_ignore=gt_rles[1],
        height=int(image.height), width=int(image.width), gt_sent=query.gt_sent, num_seg=answer.num_seg,
        extra=dict(query.extra))


def _visualize(out_dir: str, record: QueryRecord, prediction, rgb: np.ndarray) -> None:
    from utils.visualize import write_query_outputs

    directory = os.path.join(out_dir, "vis", f"{record.image_id}_{record.ref_id}_{record.sent_id}")
    os.makedirs(directory, exist_ok=True)
    write_query_outputs(directory, rgb, prediction.masks.numpy(), record.answer)
    if prediction.sasp is not None:
        from utils.visualize_sasp import save_sasp_pngs

        save_sasp_pngs(directory, rgb, prediction.sasp, prediction.masks.numpy())


def run_shard(run: EvalRun, predictor: SesamePredictor, images, read_rgb: Callable[[object], Optional[np.ndarray]],
              set_report=None) -> dict:
    """Evaluate this process's shard of `images` (dataset.eval_sets.EvalImage list), appending records
    to its shard file; returns counts and timings.

    read_rgb(image) -> uint8 (H, W, 3) RGB at the annotated size, or None when the image is skipped
    (dataset.eval_sets.read_eval_image, which counts it in `set_report`). set_report
    (dataset.eval_report.EvalSetReport): what the set holds; saved with the finished shard, for the
    metrics step."""
    check_unique_keys(images)
    shard = shard_items(images, run.process_num, run.world_size)
    model = predictor.model
    with ShardWriter(run.shard_file) as writer, quick_gil_handoff():
        pending, missing = [], []  # (image, all its queries), and per image which are not on disk
        for im in shard:
            left = [(int(im.image_id), int(q.ref_id), int(q.sent_id)) not in writer.done for q in im.queries]
            if any(left):
                pending.append((im, list(im.queries)))
                missing.append(left)
        total = sum(sum(m) for m in missing)
        already = sum(len(im.queries) for im in shard) - total
        prompts = [[predictor.prompt_ids(q.question) for q in todo] for _, todo in pending]
        on_gpu = model.device.type == "cuda"
        loader_fn = ImageLoader(pending, prompts, predictor, read_rgb, run.visualize, pin=on_gpu, defer=on_gpu)
        backend = predictor.backend
        per_image = max(1.0, sum(len(t) for _, t in pending) / max(1, len(pending)))
        lookahead = int(min(256, max(2 * run.num_workers, 2 * backend.queries_per_batch / per_image + 1)))
        loader = prefetched(loader_fn, len(loader_fn), run.num_workers, lookahead)
        progress = None
        if run.progress:
            from tqdm import tqdm

            progress = tqdm(total=total, unit="q", dynamic_ncols=True, position=run.process_num,
                            desc=f"{run.dataset} {run.split} {run.process_num}/{run.world_size}")
        out_dir = os.path.dirname(run.shard_file)

        def save(batch, predictions) -> int:
            records = []
            for item, preds in zip(batch, predictions):
                im, todo = pending[item.index]
                for q, wanted, gt_rles, pred in zip(todo, missing[item.index], item.gt_rles, preds):
                    if not wanted:  # on disk from before the restart; answered again only to keep the image whole
                        continue
                    record = _record(predictor, im, q, gt_rles, pred)
                    records.append(record)
                    if run.visualize:
                        _visualize(out_dir, record, pred, item.rgb)
            writer.write(records)
            if progress is not None:
                progress.update(len(records))
            return len(records)

        # Records of batch k are written by one background thread while batch k+1 runs: in input
        # order, at most one batch in flight, its errors raised here.
        start, done_now = time.perf_counter(), 0
        waited = {"loader": 0.0, "records": 0.0}  # main-thread time spent waiting, for benchmarks
        saver = ThreadPoolExecutor(1, thread_name_prefix="eval-records")
        saving = None
        # batches are planned from the query counts before any image is loaded, so that the backend
        # takes each batch's images as they arrive (the engine's encoders start on the first few)
        plan = batch_images(range(len(pending)), lambda i: len(pending[i][1]), lambda: backend.queries_per_batch,
                            backend.max_images_per_batch)

        def arriving(count: int, batch: list, pulled: list):
            for _ in range(count):
                t0 = time.perf_counter()
                item = next(loader)
                waited["loader"] += time.perf_counter() - t0
                pulled.append(item)
                if item.work is not None:  # None: unreadable, skipped and counted by read_rgb
                    batch.append(item)
                    yield item.work

        def smaller_runs(items: list, error: Exception) -> list:
            """The predictions of `items` after a run ran out of GPU memory: the backend takes less work
            per run, and the items go in runs of that size (each retried the same way). `error` comes
            without its traceback: the failed run's frames would keep its tensors alive."""
            if not backend.on_out_of_memory():
                raise error
            print(f"note: out of GPU memory; retrying with {backend.queries_per_batch} queries per batch "
                  "(no record lost)", file=sys.stderr, flush=True)
            out = []
            for part in batch_images(items, lambda it: len(it.work.prompts), backend.queries_per_batch,
                                     backend.max_images_per_batch):
                out += run_or_shrink(lambda: predictor.run([it.work for it in part]), part)
            return out

        def run_or_shrink(run_batch, items_of) -> list:
            """run_batch(), or, if it runs out of GPU memory, the same work in smaller runs."""
            try:
                return run_batch()
            except torch.cuda.OutOfMemoryError as e:
                error = e.with_traceback(None)
            return smaller_runs(items_of() if callable(items_of) else items_of, error)

        skipped_queries = 0
        try:
            for indices in plan:
                batch, pulled = [], []

                def all_of_batch(count=len(indices), batch=batch, pulled=pulled):
                    list(arriving(count - len(pulled), batch, pulled))  # the rest of this batch's images
                    return batch

                predictions = run_or_shrink(lambda: predictor.run(arriving(len(indices), batch, pulled)),
                                            all_of_batch)
                skipped_queries += sum(sum(missing[it.index]) for it in pulled if it.work is None)
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
        writer.mark_complete(len(shard), sum(len(im.queries) for im in shard) - skipped_queries,
                             set_report.as_dict() if set_report is not None else None)
    t0 = time.perf_counter()
    write_shard_scores(run.shard_file)  # here, in parallel over the workers, not in the metrics step
    scoring_seconds = time.perf_counter() - t0
    summary = {"shard": run.shard_file, "queries_run": done_now, "queries_skipped": already,
               "queries_unreadable": skipped_queries, "seconds": seconds,
               "queries_per_s": done_now / seconds if seconds > 0 else None, "waited_s": waited,
               "scoring_seconds": scoring_seconds}
    graphs: Optional[int] = getattr(backend, "graph_captures", None)
    if graphs is not None:
        summary["decode_graphs"] = {"captures": graphs, "failed": backend.graph_failure}
    return summary
