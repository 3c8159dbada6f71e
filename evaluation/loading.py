"""Images of an evaluation shard, decoded and preprocessed by loader threads ahead of the GPU."""
from __future__ import annotations

from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Callable, Iterator, Optional

import numpy as np

from model.predictor import ImageWork, SesamePredictor
from utils.mask_io import encode_optional


@dataclass
class LoadedImage:
    """One pending image of the shard, ready for the predictor."""

    index: int  # in the pending list
    work: Optional[ImageWork]  # None: the image could not be read and was skipped (and counted)
    gt_rles: list  # per pending query: (gt_mask RLE or None, gt_ignore RLE or None)
    rgb: Optional[np.ndarray]  # kept for --visualize


def ground_truth_rles(image, query) -> tuple[Optional[dict], Optional[dict]]:
    """RLEs of a query's foreground (label 1; none for a false premise) and ignore pixels (255)."""
    gt = np.asarray(query.gt_mask)
    if gt.shape != (image.height, image.width):
        raise ValueError(f"{image.image_path} ref {query.ref_id} sent {query.sent_id}: gt_mask is {gt.shape}, "
                         f"image is {(image.height, image.width)}")
    return (encode_optional(gt == 1) if query.gt_exists else None), encode_optional(gt == 255)


class ImageLoader:
    """Decode, CLIP and SAM preprocessing and ground-truth RLEs of one pending image.

    pending: (EvalImage, queries to run) per item; prompts: their token ids; read_rgb(image) -> uint8
    (H, W, 3) at the annotated size, or None for an image to skip (dataset.eval_sets.read_eval_image).
    SAM's input is only resized here (the engine normalises and pads it). `pin`: page-locked pixels,
    so that host-to-GPU copies run without blocking the engine; `defer`: only decoding happens here,
    both resizes are left to the backend's device (on a GPU run they would hold the GIL the engine's
    thread needs; model.predictor.RawImage)."""

    def __init__(self, pending, prompts, predictor: SesamePredictor, read_rgb: Callable[[object], Optional[np.ndarray]],
                 keep_rgb: bool, pin: bool = False, defer: bool = False):
        self.pending, self.prompts, self.predictor, self.read_rgb = pending, prompts, predictor, read_rgb
        self.keep_rgb, self.pin, self.defer = keep_rgb, pin, defer

    def __len__(self) -> int:
        return len(self.pending)

    def __call__(self, i: int) -> LoadedImage:
        im, todo = self.pending[i]
        rgb = self.read_rgb(im)
        if rgb is None:
            return LoadedImage(i, None, [], None)
        # for a GPU model only the decoding happens here; the resizes run there (model.predictor.RawImage)
        work = self.predictor.prepare(rgb, self.prompts[i], resize_only=True, defer=self.defer)
        if self.pin and work.raw is not None:
            work = replace(work, raw=replace(work.raw, rgb=work.raw.rgb.pin_memory()))
        elif self.pin:
            work = replace(work, clip_pixels=work.clip_pixels.pin_memory(), sam_pixels=work.sam_pixels.pin_memory())
        # queries sharing a mask (a ref's sentences, an image's false premises) share its RLEs: each
        # distinct mask is decoded and encoded once (pycocotools holds the GIL the engine's thread needs)
        keys = [(id(q.gt_mask_source), bool(q.gt_exists)) for q in todo]
        rles: dict = {}
        for key, q in zip(keys, todo):
            if key not in rles:
                rles[key] = ground_truth_rles(im, q)
        return LoadedImage(i, work, [rles[key] for key in keys], rgb if self.keep_rgb else None)


def prefetched(fn: Callable[[int], object], count: int, workers: int, lookahead: int) -> Iterator:
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
