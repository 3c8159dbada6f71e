"""Which object each CLIP patch shows: labels for the patches of CLIP's input (shortest-side resize
and centre crop, as LLaVA preprocesses), from a Shapes world's masks and manifest."""
from __future__ import annotations

import json
import os

import numpy as np
import torch

from model.transforms import ClipTransform
from utils.errors import InputError

from ..coco_masks import decode_segmentation
from ..image_io import read_image_rgb
from .scene import COLORS, KINDS
from .world import image_dir

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


class PatchLabelled(torch.utils.data.Dataset):
    """CLIP pixels and (num_patches, 2) kind / colour labels (0 = background, else index + 1) of the
    images of one split. `splits` builds them, reading the world's files once."""

    def __init__(self, dataset_dir: str, records: list[dict], annotations: dict[int, list[dict]], image_size: int,
                 patch: int):
        self.dataset_dir, self.records, self.annotations = dataset_dir, records, annotations
        self.image_size, self.patch = image_size, patch
        self.transform = ClipTransform(image_size)

    @classmethod
    def splits(cls, dataset_dir: str, names: tuple[str, ...], image_size: int,
               patch: int) -> dict[str, PatchLabelled]:
        manifest = os.path.join(dataset_dir, "shapes_manifest.json")
        if not os.path.isfile(manifest):
            raise InputError(f"--dataset_dir {dataset_dir}: no shapes_manifest.json (write a world with "
                             "python -m dataset.shapes DIR)")
        with open(manifest) as f:
            records = json.load(f)["images"]
        with open(os.path.join(dataset_dir, "refer_seg", "fprefcoco", "instances.json")) as f:
            annotations: dict[int, list[dict]] = {}
            for ann in json.load(f)["annotations"]:
                annotations.setdefault(ann["image_id"], []).append(ann)
        return {name: cls(dataset_dir, [r for r in records if r["split"] == name], annotations, image_size, patch)
                for name in names}

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int):
        rec = self.records[i]
        pixels = self.transform(read_image_rgb(os.path.join(image_dir(self.dataset_dir), rec["file_name"]),
                                               "shapes world"))
        labels = patch_labels(rec, self.annotations.get(rec["image_id"], []), self.image_size, self.patch)
        return pixels, torch.from_numpy(labels + 1)
