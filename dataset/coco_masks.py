"""COCO segmentations to binary masks: the one decoder that training and evaluation share.

Every form a COCO-style `segmentation` takes (all those the original reads, and the rest):
    []                                        no object: an empty mask
    [[x1, y1, x2, y2, ...], ...]              polygons (pycocotools.frPyObjects); a part with fewer
                                              than 3 points covers nothing
    {"size": [h, w], "counts": "<str>"}       compressed RLE (str or bytes)
    {"size": [h, w], "counts": [n0, n1, ...]} uncompressed RLE (how `iscrowd` annotations are stored)
    [rle, rle, ...]                           a list of RLE dicts of either kind
Parts are OR-ed into one 0/1 mask (the original summed them, so an overlap became 2).

RLEs from files are checked before pycocotools sees them: their size must be the image's and their
runs must cover exactly height x width pixels (pycocotools does not check a short one and returns
uninitialised memory for the rest).
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
from pycocotools import mask as mask_utils


def compressed_rle_total(counts: bytes) -> int:
    """Sum of the runs of a compressed COCO RLE string (its LEB128-like encoding). ValueError if
    the string is not one."""
    runs: list[int] = []
    p = 0
    while p < len(counts):
        x, k, more = 0, 0, True
        while more:
            if p >= len(counts):
                raise ValueError("compressed RLE counts end in the middle of a number")
            c = counts[p] - 48
            if not 0 <= c < 64:
                raise ValueError(f"compressed RLE counts hold an invalid character {chr(counts[p])!r}")
            x |= (c & 0x1F) << (5 * k)
            more = bool(c & 0x20)
            p += 1
            k += 1
            if not more and c & 0x10:
                x |= -1 << (5 * k)
        if len(runs) > 2:
            x += runs[-2]
        if x < 0:
            raise ValueError("compressed RLE counts decode to a negative run")
        runs.append(x)
    return sum(runs)


def _rle(part: dict, height: int, width: int) -> dict:
    size, counts = part.get("size"), part.get("counts")
    if not (isinstance(size, (list, tuple)) and len(size) == 2):
        raise ValueError(f"RLE without a [height, width] 'size' (keys: {sorted(part)})")
    if [int(size[0]), int(size[1])] != [height, width]:
        raise ValueError(f"RLE size {list(size)} differs from the image size {[height, width]}")
    if isinstance(counts, list):
        if not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in counts):
            raise ValueError("uncompressed RLE counts must be non-negative integers")
        if sum(counts) != height * width:
            raise ValueError(f"uncompressed RLE runs cover {sum(counts)} pixels, not {height}x{width}")
        return mask_utils.frPyObjects({"size": [height, width], "counts": counts}, height, width)
    if isinstance(counts, str):
        try:
            counts = counts.encode("ascii")
        except UnicodeEncodeError:
            raise ValueError("compressed RLE counts hold non-ASCII characters") from None
    if not isinstance(counts, bytes):
        raise ValueError(f"RLE counts must be a string or a list of integers, got {type(counts).__name__}")
    total = compressed_rle_total(counts)
    if total != height * width:
        raise ValueError(f"compressed RLE runs cover {total} pixels, not {height}x{width}")
    return {"size": [height, width], "counts": counts}


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def segmentation_rles(segm, height: int, width: int) -> list[dict]:
    """The parts of a COCO segmentation as compressed RLEs (counts as bytes), checked.
    [] for an empty segmentation. ValueError saying what is wrong otherwise."""
    if isinstance(segm, dict):
        return [_rle(segm, height, width)]
    if not isinstance(segm, list):
        raise ValueError(f"segmentation must be polygons, an RLE dict or a list of RLE dicts, "
                         f"got {type(segm).__name__}")
    if all(isinstance(p, dict) for p in segm):
        return [_rle(p, height, width) for p in segm]
    if not all(isinstance(p, list) for p in segm):
        raise ValueError("segmentation mixes polygons and RLE dicts")
    polygons = []
    for i, p in enumerate(segm):
        if not all(_number(v) for v in p):
            raise ValueError(f"polygon {i} holds something other than finite numbers")
        if len(p) >= 6:  # fewer than 3 points enclose nothing (and 4 numbers would read as a box)
            polygons.append([float(v) for v in p])
    return mask_utils.frPyObjects(polygons, height, width) if polygons else []


def decode_rles(rles: Sequence[dict], height: int, width: int) -> np.ndarray:
    """(H, W) uint8 0/1: the union of the RLEs (zeros when there are none)."""
    if not rles:
        return np.zeros((height, width), np.uint8)
    return np.ascontiguousarray(mask_utils.decode(list(rles)).max(axis=2))


def union_rle(rles: Sequence[dict]) -> list[dict]:
    """The parts merged into one RLE (a list of at most one), to keep many masks small in memory."""
    return [mask_utils.merge(list(rles), intersect=False)] if len(rles) > 1 else list(rles)


def decode_segmentation(segm, height: int, width: int) -> np.ndarray:
    """Any COCO segmentation form (module docstring) -> (H, W) uint8 0/1, the union of its parts."""
    return decode_rles(segmentation_rles(segm, height, width), height, width)
