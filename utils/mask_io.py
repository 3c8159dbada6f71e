"""Binary masks <-> COCO run-length encoding (pycocotools), as JSON-friendly dicts.

An RLE here is {"size": [H, W], "counts": "<compressed string>"}: what pycocotools writes, with
the counts decoded to str so it fits in a JSON line.
"""
from __future__ import annotations

from typing import Optional

import numpy as np
from pycocotools import mask as coco_mask


def encode_rle(mask: np.ndarray) -> dict:
    """(H, W) bool/0-1 array -> {"size": [H, W], "counts": str}."""
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"encode_rle expects an (H, W) mask, got shape {mask.shape}")
    rle = coco_mask.encode(np.asfortranarray(mask.astype(np.uint8) != 0, dtype=np.uint8))
    return {"size": [int(rle["size"][0]), int(rle["size"][1])], "counts": rle["counts"].decode("ascii")}


def _coco(rle: dict, where: str) -> dict:
    if not isinstance(rle, dict) or "size" not in rle or "counts" not in rle:
        raise ValueError(f"{where}: not an RLE dict with 'size' and 'counts': {str(rle)[:80]}")
    counts = rle["counts"]
    return {"size": [int(rle["size"][0]), int(rle["size"][1])],
            "counts": counts.encode("ascii") if isinstance(counts, str) else counts}


def decode_rle(rle: dict, where: str = "mask") -> np.ndarray:
    """RLE dict -> (H, W) bool array."""
    return coco_mask.decode(_coco(rle, where)).astype(bool)


def rle_area(rle: dict, where: str = "mask") -> int:
    return int(coco_mask.area(_coco(rle, where)))


def rle_intersection_union(pred: Optional[dict], gt: Optional[dict], ignore: Optional[dict],
                           size: tuple[int, int], where: str = "mask") -> tuple[int, int]:
    """Foreground intersection and union of RLE masks (None = empty) of one (H, W) image, the pixels of
    `ignore` left out of both: what `utils.metrics.intersection_union` gives for the decoded masks,
    computed on the runs themselves (about 40x faster than decoding a 640 x 480 pair)."""
    h, w = int(size[0]), int(size[1])
    masks = {}
    for name, rle in (("pred_mask", pred), ("gt_mask", gt), ("gt_ignore", ignore)):
        if rle is not None:
            coco = _coco(rle, f"{where} {name}")
            if tuple(coco["size"]) != (h, w):
                raise ValueError(f"{where} {name}: size {coco['size']} differs from the image's {[h, w]}")
            masks[name] = coco
    present = [masks[k] for k in ("pred_mask", "gt_mask") if k in masks]
    if not present:
        return 0, 0
    union = coco_mask.merge(present, intersect=False) if len(present) > 1 else present[0]
    inter = coco_mask.merge(present, intersect=True) if len(present) > 1 else None
    u = int(coco_mask.area(union))
    i = int(coco_mask.area(inter)) if inter is not None else 0
    if "gt_ignore" in masks:
        u -= int(coco_mask.area(coco_mask.merge([union, masks["gt_ignore"]], intersect=True)))
        if inter is not None:
            i -= int(coco_mask.area(coco_mask.merge([inter, masks["gt_ignore"]], intersect=True)))
    return i, u


def encode_optional(mask: Optional[np.ndarray]) -> Optional[dict]:
    """RLE of a mask with any pixel set, else None (keeps records small for the common empty case)."""
    if mask is None or not np.asarray(mask).any():
        return None
    return encode_rle(mask)


def resize_masks(masks: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(n, h, w) bool masks -> (n, H, W) by nearest-neighbour sampling: the masks of an image that was
    downscaled for the model, brought back to the image's own size."""
    import cv2

    height, width = int(size[0]), int(size[1])
    out = np.zeros((masks.shape[0], height, width), dtype=bool)
    for k, mask in enumerate(masks):
        out[k] = cv2.resize(mask.astype(np.uint8), (width, height), interpolation=cv2.INTER_NEAREST).astype(bool)
    return out
