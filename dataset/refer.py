"""A REFER-style reader for the referring-expression datasets as they sit on disk.

    refer_seg/<dataset>/refs(<splitBy>).p   pickled list of refs (read with the restricted unpickler)
    refer_seg/<dataset>/instances.json      COCO-style images / annotations / categories

A ref: ref_id, ann_id (int, or a list of ids; -1 means "no object"), image_id, category_id,
split ("train", "val", "test", "testA", "testB"), sentences [{sent, sent_id, tokens, ...}].
Sentences may carry `is_false_premise` + `gt_sent` (FP-RefCOCO*) or `exist` (R-RefCOCO*).
Masks: every COCO segmentation form (dataset/coco_masks.py), OR-ed over a list of ann_ids.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Optional, Union

import numpy as np

from .coco_masks import decode_rles, segmentation_rles
from .image_io import DataError, SkipItem, require_path
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
    """ann_id as a list; an empty list means "no object" (any -1 in it, or -1 itself)."""
    ids = ref["ann_id"]
    ids = list(ids) if isinstance(ids, (list, tuple)) else [ids]
    if any(int(i) == -1 for i in ids):
        return []
    return [int(i) for i in ids]


def in_split(ref_split: str, split: str) -> bool:
    """The REFER API's split selection: "test" takes every ref whose split contains "test" (testA and
    testB on RefCOCO/+), "testA"/"testB"/"testC" also take the combined "testAB"-style splits,
    anything else must match exactly."""
    if split == "test":
        return "test" in ref_split
    if split in ("testA", "testB", "testC"):
        return ref_split.startswith("test") and split[-1] in ref_split[4:]
    return ref_split == split


@dataclass(frozen=True)
class ReferImage:
    image_id: int
    file_name: str
    height: int
    width: int


@dataclass(frozen=True)
class BadRef:
    """A ref that cannot be used: where it is and why."""
    ref_id: Union[int, str]  # "#<position in the file>" when the ref has no usable ref_id
    split: Optional[str]
    image_id: Optional[int]  # when it names an image of instances.json
    queries: int  # how many sentences it holds (0 when they cannot be read)
    problem: str


def _positive_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def read_instances(path: str, dataset: str) -> tuple[dict[int, ReferImage], dict[int, dict], dict[int, str]]:
    """images, annotations (by id) and category names of an instances.json. DataError (one line
    naming the file, the dataset and the field) for anything malformed."""
    where = f"{path} (dataset {dataset})"
    with open(path, "rb") as f:
        try:
            instances = json.loads(f.read())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise DataError(f"{where}: not valid JSON ({e})") from None
    if not isinstance(instances, dict):
        raise DataError(f"{where}: expected a JSON object with 'images' and 'annotations'")
    for key in ("images", "annotations"):
        if not isinstance(instances.get(key), list):
            raise DataError(f"{where}: missing list {key!r}")
    images = {}
    for i, im in enumerate(instances["images"]):
        if not isinstance(im, dict):
            raise DataError(f"{where}: images[{i}] is not an object")
        label = f"images[{i}]" + (f" (id {im['id']})" if "id" in im else "")
        for key in ("id", "file_name", "height", "width"):
            if key not in im:
                raise DataError(f"{where}: {label} has no {key!r}")
        if not isinstance(im["id"], int) or not isinstance(im["file_name"], str):
            raise DataError(f"{where}: {label}: 'id' must be an integer and 'file_name' a string")
        if not (_positive_int(im["height"]) and _positive_int(im["width"])):
            raise DataError(f"{where}: {label}: 'height' and 'width' must be positive integers, "
                            f"got {im['height']!r} and {im['width']!r}")
        images[im["id"]] = ReferImage(im["id"], im["file_name"], im["height"], im["width"])
    anns = {}
    for i, ann in enumerate(instances["annotations"]):
        if not isinstance(ann, dict) or not isinstance(ann.get("id"), int):
            raise DataError(f"{where}: annotations[{i}] has no integer 'id'")
        anns[ann["id"]] = ann
    categories = {}
    for i, cat in enumerate(instances.get("categories") or []):
        if not isinstance(cat, dict) or not isinstance(cat.get("id"), int) or "name" not in cat:
            raise DataError(f"{where}: categories[{i}] needs an integer 'id' and a 'name'")
        categories[cat["id"]] = str(cat["name"])
    return images, anns, categories


class ReferData:
    """One referring dataset: refs, annotations and images, indexed. Refs that cannot be used are
    kept aside in `bad_refs` (training counts them, evaluation stops on them or counts them)."""

    def __init__(self, dataset_dir: str, dataset: str, split_by: Optional[str] = None):
        if dataset not in REFER_DATASETS:
            raise ValueError(f"unknown referring dataset {dataset!r}; known: {', '.join(REFER_DATASETS)}")
        self.dataset = dataset
        self.split_by = split_by or default_split_by(dataset)
        root = os.path.join(dataset_dir, "refer_seg", dataset)
        require_path(root, dataset, "folder")
        self.refs_path = require_path(os.path.join(root, f"refs({self.split_by}).p"), dataset)
        self.instances_path = require_path(os.path.join(root, "instances.json"), dataset)
        self.image_dir = require_path(image_folder(dataset_dir, dataset), dataset, "image folder")

        refs = safe_load_path(self.refs_path)
        if not isinstance(refs, list):
            raise DataError(f"{self.refs_path} (dataset {dataset}): expected a list of refs, got {type(refs).__name__}")
        self.images, self.anns, self.categories = read_instances(self.instances_path, dataset)
        self.refs: list[dict] = []
        self.bad_refs: list[BadRef] = []
        for position, ref in enumerate(refs):
            problem = self._ref_problem(ref)
            if problem is None:
                self.refs.append(ref)
                continue
            fields = ref if isinstance(ref, dict) else {}
            ref_id, split, sentences = fields.get("ref_id"), fields.get("split"), fields.get("sentences")
            image_id = fields.get("image_id")
            self.bad_refs.append(BadRef(ref_id if isinstance(ref_id, int) else f"#{position}",
                                        split if isinstance(split, str) else None,
                                        image_id if isinstance(image_id, int) and image_id in self.images else None,
                                        len(sentences) if isinstance(sentences, list) else 0, problem))

    def _ref_problem(self, ref) -> Optional[str]:
        """Why a ref cannot be used, or None."""
        if not isinstance(ref, dict):
            return f"a ref must be a dict, got {type(ref).__name__}"
        for key in ("ref_id", "ann_id", "image_id", "split", "sentences"):
            if key not in ref:
                return f"no {key!r}"
        if not isinstance(ref["ref_id"], int) or not isinstance(ref["split"], str):
            return "'ref_id' must be an integer and 'split' a string"
        if ref["image_id"] not in self.images:
            return f"image_id {ref['image_id']!r} is not in {self.instances_path}"
        ids = ref["ann_id"] if isinstance(ref["ann_id"], (list, tuple)) else [ref["ann_id"]]
        if not ids or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
            return f"ann_id must be an integer or a non-empty list of integers, got {ref['ann_id']!r}"
        if not isinstance(ref["sentences"], list):
            return "'sentences' is not a list"
        for i, sent in enumerate(ref["sentences"]):
            if not isinstance(sent, dict) or not isinstance(sent.get("sent"), str):
                return f"sentence {i} has no text 'sent'"
        return None

    def splits(self) -> list[str]:
        return sorted({ref["split"] for ref in self.refs})

    def refs_by_image(self, split: str) -> dict[int, list[dict]]:
        """image_id -> refs of `split` (selected as the REFER API does, see `in_split`), images in
        first-seen order (stable)."""
        out: dict[int, list[dict]] = {}
        for ref in self.refs:
            if in_split(ref["split"], split):
                out.setdefault(ref["image_id"], []).append(ref)
        if not out and not self.bad_refs_of(split):
            raise ValueError(f"dataset {self.dataset!r} ({self.refs_path}) has no split {split!r}; "
                             f"it has: {', '.join(self.splits())}")
        return out

    def bad_refs_of(self, split: str) -> list[BadRef]:
        """Unusable refs that belong to `split`, or whose split cannot be told."""
        return [b for b in self.bad_refs if b.split is None or in_split(b.split, split)]

    def image_path(self, image_id: int) -> str:
        return os.path.join(self.image_dir, self.images[image_id].file_name)

    def sentence_id(self, ref: dict, index: int) -> int:
        """The sentence's `sent_id` from the refs file (its position in the ref when it has none)."""
        sent_id = ref["sentences"][index].get("sent_id")
        return sent_id if isinstance(sent_id, int) and not isinstance(sent_id, bool) else index

    def ref_rles(self, ref: dict) -> list[dict]:
        """The parts of every annotation of the ref, as RLEs ([] for ann_id -1). Raises SkipItem
        naming the annotation file and the annotation / ref id when one cannot be read."""
        im = self.images[ref["image_id"]]
        rles: list[dict] = []
        for ann_id in ann_ids_of(ref):
            ann = self.anns.get(ann_id)
            if ann is None:
                raise SkipItem(self.dataset, self.refs_path, "unknown_annotation",
                               f"ref {ref['ref_id']} names annotation {ann_id}, which instances.json does not hold")
            if "segmentation" not in ann:
                raise SkipItem(self.dataset, self.instances_path, "bad_annotation",
                               f"annotation {ann_id} (ref {ref['ref_id']}) has no 'segmentation'")
            try:
                rles += segmentation_rles(ann["segmentation"], im.height, im.width)
            except (ValueError, TypeError) as e:
                raise SkipItem(self.dataset, self.instances_path, "bad_annotation",
                               f"annotation {ann_id} (ref {ref['ref_id']}): {e}") from None
        return rles

    def ref_mask(self, ref: dict) -> np.ndarray:
        """(H, W) uint8 0/1: the union of the ref's annotations (empty for ann_id -1). Raises SkipItem."""
        im = self.images[ref["image_id"]]
        return decode_rles(self.ref_rles(ref), im.height, im.width)
