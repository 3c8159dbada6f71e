"""Which object each CLIP patch shows: labels for the patches of CLIP's input (shortest-side resize
and centre crop, as LLaVA preprocesses), from a Shapes world's masks and manifest."""
from __future__ import annotations

import numpy as np

from ..coco_masks import decode_segmentation
from .scene import COLORS, KINDS

COLOR_NAMES = tuple(COLORS)


def patch_centres(height: int, width: int, image_size: int, patch: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel (x, y) in the original image under each patch centre, row-major over CLIP's crop."""
    scale = image_size / min(height, width)
    resized_h, resized_w = int(round(height * scale)), int(round(width * scale))
    top, left = (resized_h - image_size) // 2, (resized_w - image_size) // 2
    centres = (np.arange(image_size // patch) + 0.5) * patch
    xs = np.clip(((left + centres) / scale).astype(int), 0, width - 1)
    ys = np.clip(((top + centres) / scale).astype(int), 0, height - 1)
    gy, gx = np.meshgrid(ys, xs, indexing="ij")
    return gx.ravel(), gy.ravel()


def patch_labels(record: dict, annotations: list[dict], image_size: int, patch: int) -> np.ndarray:
    """(num_patches, 2) kind and colour index of the object under each patch centre; -1: background."""
    h, w = record["height"], record["width"]
    owner = np.zeros((h, w), np.int64)
    for ann in annotations:  # drawing order: a later object covers an earlier one
        owner[decode_segmentation(ann["segmentation"], h, w) > 0] = ann["id"]
    objects = {o["ann_id"]: o for o in record["objects"]}
    xs, ys = patch_centres(h, w, image_size, patch)
    labels = np.full((len(xs), 2), -1, np.int64)
    for j, ann_id in enumerate(owner[ys, xs]):
        if ann_id in objects:
            labels[j] = KINDS.index(objects[ann_id]["kind"]), COLOR_NAMES.index(objects[ann_id]["color"])
    return labels
