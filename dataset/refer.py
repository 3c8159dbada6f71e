"""A REFER-style reader for the referring-expression datasets as they sit on disk.

    refer_seg/<dataset>/refs(<splitBy>).p   pickled list of refs (read with the restricted unpickler)
    refer_seg/<dataset>/instances.json      COCO-style images / annotations / categories

A ref: ref_id, ann_id (int, or a list of ids; -1 means "no object"), image_id, category_id,
split ("train", "val", "test", "testA", "testB"), sentences [{sent, sent_id, tokens, ...}].
Sentences may carry `is_false_premise` + `gt_sent` (FP-RefCOCO*) or `exist` (R-RefCOCO*).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Optional

import numpy as np
from pycocotools import mask as mask_utils

from .image_io import SkipItem, require_path
from .safe_pickle import safe_load_path

REFER_DATASETS = ("refclef", "refcoco", "refcoco+", "refcocog", "fprefcoco", "fprefcoco+", "fprefcocog",
                  "R-refcoco", "R-refcoco+", "R-refcocog")
FALSE_PREMISE_DATASETS = ("fprefcoco", "fprefcoco+", "fprefcocog")


def default_split_by(dataset: str) -> str:
    """The refs file the original reads for each dataset. The `*_exclude_unified` files drop training
    refs whose images occur in another RefCOCO variant's val/test, so the mixed training set does not
    see evaluation images; they also carry the val split used for evaluation."""
    if dataset == "refclef":
        return "unc"
    if dataset in ("refcocog", "R-refcocog"):
        return "umd_exclude_unified"
    if dataset in FALSE_PREMISE_DATASETS:
        return "berkeley_exclude_unified"
    if dataset in ("refcoco", "refcoco+", "R-refcoco", "R-refcoco+"):
        return "unc_exclude_unified"
    raise ValueError(f"unknown referring dataset {dataset!r}; known: {', '.join(REFER_DATASETS)}")


def image_folder(dataset_dir: str, dataset: str) -> str:
    if dataset == "refclef":
        return os.path.join(dataset_dir, "refer_seg", "images", "saiapr_tc-12")
    return os.path.join(dataset_dir, "refer_seg", "images", "mscoco", "images", "train2014")


def sentence_exists(sentence: dict) -> bool:
    """The original's existence rule: `not is_false_premise` if present, else `exist`, else True."""
    if "is_false_premise" in sentence:
        return not bool(sentence["is_false_premise"])
    if "exist" in sentence:
        return bool(sentence["exist"])
    return True


def ann_ids_of(ref: dict) -> list[int]:
    """ann_id as a list; an empty list means "no object" (any -1 in it)."""
    ids = ref["ann_id"]
    ids = list(ids) if isinstance(ids, (list, tuple)) else [ids]
    if any(int(i) == -1 for i in ids):
        return []
    return [int(i) for i in ids]


def decode_segmentation(segm, height: int, width: int) -> np.ndarray:
    """COCO polygons (list of flat xy lists), uncompressed RLE (counts list) or compressed RLE
    (counts str/bytes) -> (H, W) uint8 0/1."""
    if isinstance(segm, list):
        if not segm:
            return np.zeros((height, width), np.uint8)
        polys = [p for p in segm if len(p) >= 6]
        if len(polys) != len(segm):
            raise ValueError("polygon with fewer than 3 points")
        rle = mask_utils.merge(mask_utils.frPyObjects(polys, height, width))
    elif isinstance(segm, dict) and "counts" in segm and "size" in segm:
        if [int(s) for s in segm["size"]] != [height, width]:
            raise ValueError(f"RLE size {segm['size']} differs from image size {[height, width]}")
        rle = mask_utils.frPyObjects(segm, height, width) if isinstance(segm["counts"], list) else segm
    else:
        raise ValueError(f"unrecognised segmentation of type {type(segm).__name__}")
    m = mask_utils.decode(rle)
    if m.ndim == 3:
        m = m.max(axis=2)
    return (m > 0).astype(np.uint8)


@dataclass(frozen=True)
class ReferImage:
    image_id: int
    file_name: str
    height: int
    width: int


class ReferData:
    """One referring dataset: refs, annotations and images, indexed."""

    def __init__(self, dataset_dir: str, dataset: str, split_by: Optional[str] = None):
        if dataset not in REFER_DATASETS:
            raise ValueError(f"unknown referring dataset {dataset!r}; known: {', '.join(REFER_DATASETS)}")
        self.dataset = dataset
        self.split_by = split_by or default_split_by(dataset)
        root = os.path.join(dataset_dir, "refer_seg", dataset)
        require_path(root, dataset, "folder")
        refs_path = require_path(os.path.join(root, f"refs({self.split_by}).p"), dataset)
        inst_path = require_path(os.path.join(root, "instances.json"), dataset)
        self.image_dir = require_path(image_folder(dataset_dir, dataset), dataset, "image folder")

        refs = safe_load_path(refs_path)
        if not isinstance(refs, list):
            raise ValueError(f"{refs_path}: expected a list of refs, got {type(refs).__name__}")
        with open(inst_path) as f:
            try:
                instances = json.load(f)
            except json.JSONDecodeError as e:
                raise ValueError(f"{inst_path}: not valid JSON ({e})") from None
        for key in ("images", "annotations"):
            if key not in instances:
                raise ValueError(f"{inst_path}: missing key {key!r}")

        self.images = {int(im["id"]): ReferImage(int(im["id"]), im["file_name"], int(im["height"]), int(im["width"]))
                       for im in instances["images"]}
        self.anns = {int(a["id"]): a for a in instances["annotations"]}
        self.categories = {int(c["id"]): c["name"] for c in instances.get("categories", [])}
        self.malformed_refs = 0
        self.refs: list[dict] = []
        for ref in refs:
            if self._valid_ref(ref):
                self.refs.append(ref)
            else:
                self.malformed_refs += 1
        self.refs_by_split: dict[str, list[dict]] = {}
        for ref in self.refs:
            self.refs_by_split.setdefault(ref["split"], []).append(ref)

    def _valid_ref(self, ref) -> bool:
        try:
            return (isinstance(ref, dict) and int(ref["image_id"]) in self.images and isinstance(ref["split"], str)
                    and isinstance(ref["sentences"], list) and all("sent" in s for s in ref["sentences"])
                    and "ann_id" in ref and "ref_id" in ref)
        except (KeyError, TypeError, ValueError):
            return False

    def splits(self) -> list[str]:
        return sorted(self.refs_by_split)

    def refs_by_image(self, split: str) -> dict[int, list[dict]]:
        """image_id -> refs of that split, images in first-seen order (stable)."""
        if split not in self.refs_by_split:
            raise ValueError(f"dataset {self.dataset!r} (refs({self.split_by}).p) has no split {split!r}; "
                             f"it has: {', '.join(self.splits())}")
        out: dict[int, list[dict]] = {}
        for ref in self.refs_by_split[split]:
            out.setdefault(int(ref["image_id"]), []).append(ref)
        return out

    def image_path(self, image_id: int) -> str:
        return os.path.join(self.image_dir, self.images[image_id].file_name)

    def ref_mask(self, ref: dict) -> np.ndarray:
        """(H, W) uint8 0/1: the union of the ref's annotations (empty for ann_id -1).
        Raises SkipItem for a missing or malformed annotation."""
        im = self.images[int(ref["image_id"])]
        mask = np.zeros((im.height, im.width), np.uint8)
        for ann_id in ann_ids_of(ref):
            ann = self.anns.get(ann_id)
            if ann is None:
                raise SkipItem(self.dataset, self.image_path(im.image_id),
                               f"ref {ref['ref_id']}: unknown ann_id {ann_id}")
            try:
                mask |= decode_segmentation(ann["segmentation"], im.height, im.width)
            except (ValueError, TypeError, KeyError) as e:
                raise SkipItem(self.dataset, self.image_path(im.image_id),
                               f"ann {ann_id}: malformed segmentation ({e})") from None
        return mask
