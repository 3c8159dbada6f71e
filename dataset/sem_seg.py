"""Semantic / part segmentation sources of the ReasonSeg recipe, in their original layouts.

    ade20k/images/training/*.jpg, ade20k/annotations/training/*.png      labels 0 = other, k = class k-1
    coco/train2017/*.jpg, cocostuff/train2017/*.png                      labels 0..181, 255 = unlabelled
    mapillary/config_v2.0.json, mapillary/training/images/*.jpg,
        mapillary/training/v2.0/labels/*.png                             labels = index into config "labels"
    vlpart/pascal_part/train.json (COCO format, "obj:part" categories),
        vlpart/pascal_part/VOCdevkit/VOC2010/JPEGImages/
    vlpart/paco/annotations/paco_lvis_v1_train.json (COCO format), images under coco/ (file_name has train2017/)

Class names: ADE20K's 150 and COCO-Stuff's 182 names ship in dataset/classes/ (the original reads
the ADE20K list from a file its repository lacks). Ignored pixels (255): ADE20K "other", COCO-Stuff
classes whose name contains "-" (the merged "x-other"-style stuff classes, as the original),
Mapillary's "unlabeled".

Each sample draws a mode: true premise (0.85: present classes, one [SEG] each), false-premise
denial (0.07: absent classes, plain denials) or correction (0.08: absent classes, a correction that
names a present class). A class mask keeps the label map's ignore pixels as 255.
"""
from __future__ import annotations

import glob
import json
import os
from typing import Callable, Sequence

import numpy as np

from .class_names import ade20k_class_names, cocostuff_class_names
from .coco_masks import decode_segmentation
from .image_io import DataError, SkipItem, read_image_rgb, read_label_map, require_path
from .sample import IGNORE_LABEL, RawSample, choice, sample_without_replacement
from .templates import Templates, positive_answer

SEM_SEG_DATASETS = ("ade20k", "cocostuff", "pascal_part", "paco_lvis", "mapillary")
MODE_RATES = (("true_premise", 0.85), ("false_premise_denial", 0.07), ("false_premise_correction", 0.08))


def draw_mode(rng: np.random.Generator) -> str:
    u, acc = rng.random(), 0.0
    for mode, p in MODE_RATES:
        acc += p
        if u < acc:
            return mode
    return MODE_RATES[0][0]


def part_name(category: str, rng: np.random.Generator) -> str:
    """"dog:head" -> "dog head" or "the head of the dog"; LVIS-style "_(sense)" suffixes and "_" dropped."""
    def clean(s: str) -> str:
        return s.split("_(")[0].replace("_", " ").strip()

    if ":" in category:
        obj, part = (clean(x) for x in category.split(":", 1))
        return f"{obj} {part}" if rng.random() < 0.5 else f"the {part} of the {obj}"
    return clean(category)


def _conversations(rng, templates: Templates, mode: str, names_present: list[str], names_absent: list[str],
                   masks_present: list[np.ndarray], k: int):
    questions, answers, masks, exists, sentences = [], [], [], [], []
    if mode == "true_premise" or not names_absent:
        idx = sample_without_replacement(rng, list(range(len(names_present))), k)
        for i in idx:
            name = names_present[i]
            questions.append([choice(rng, templates.short_question).format(class_name=name)])
            answers.append([positive_answer(rng, templates, name, masks_present[i])])
            masks.append(masks_present[i])
            exists.append(True)
            sentences.append(name)
        return questions, answers, masks, exists, sentences, "true_premise"
    for name in sample_without_replacement(rng, names_absent, k):
        questions.append([choice(rng, templates.short_question).format(class_name=name)])
        if mode == "false_premise_denial":
            answers.append([choice(rng, templates.neg_answer).format(class_name=name)])
        else:
            answers.append([choice(rng, templates.correct_answer).format(class_name=name,
                                                                         gt_name=choice(rng, names_present))])
        exists.append(False)
        sentences.append(name)
    return questions, answers, masks, exists, sentences, mode


class LabelMapSource:
    """Sources whose ground truth is a per-pixel class map (ADE20K, COCO-Stuff, Mapillary)."""

    def __init__(self, name: str, pairs: list[tuple[str, str]], class_names: list[str],
                 to_class_ids: Callable[[np.ndarray], np.ndarray], templates: Templates, num_classes_per_sample: int,
                 ignored_names: frozenset[str] = frozenset()):
        if not pairs:
            raise ValueError(f"dataset {name!r}: no images found")
        self.name, self.pairs, self.class_names = name, pairs, class_names
        self.to_class_ids, self.templates, self.k = to_class_ids, templates, num_classes_per_sample
        self.ignored_names = ignored_names  # never offered as absent classes either

    def __len__(self) -> int:
        return len(self.pairs)

    def sample(self, rng: np.random.Generator) -> RawSample:
        image_path, label_path = choice(rng, self.pairs)
        image = read_image_rgb(image_path, self.name)
        label = self.to_class_ids(read_label_map(label_path, self.name))
        if label.shape != image.shape[:2]:
            raise SkipItem(self.name, label_path, "size_mismatch",
                           f"label map is {label.shape[0]}x{label.shape[1]}, image {image.shape[0]}x{image.shape[1]}")
        present = [int(c) for c in np.unique(label) if c != IGNORE_LABEL and c < len(self.class_names)]
        if not present:
            raise SkipItem(self.name, label_path, "no_class", "no labelled class in the image")
        ignore = label == IGNORE_LABEL
        masks = []
        for c in present:
            m = (label == c).astype(np.uint8)
            m[ignore] = IGNORE_LABEL
            masks.append(m)
        names = [self.class_names[c] for c in present]
        taken = set(names) | self.ignored_names
        absent = [n for n in self.class_names if n not in taken]
        q, a, m, e, s, mode = _conversations(rng, self.templates, draw_mode(rng), names, absent, masks, self.k)
        return RawSample(self.name, image_path, image, q, a, m, e, s, meta={"mode": mode, "label_path": label_path})


def ade20k_source(dataset_dir: str, templates: Templates, k: int) -> LabelMapSource:
    root = require_path(os.path.join(dataset_dir, "ade20k"), "ade20k", "folder")
    images = sorted(glob.glob(os.path.join(require_path(os.path.join(root, "images", "training"), "ade20k", "folder"),
                                           "*.jpg")))
    label_dir = require_path(os.path.join(root, "annotations", "training"), "ade20k", "folder")
    pairs = [(p, os.path.join(label_dir, os.path.splitext(os.path.basename(p))[0] + ".png")) for p in images]

    def to_ids(label: np.ndarray) -> np.ndarray:
        out = label.astype(np.int32) - 1  # 0 ("other") -> -1 -> ignore
        out[(label == 0) | (label == 255)] = IGNORE_LABEL
        return out

    return LabelMapSource("ade20k", pairs, ade20k_class_names(), to_ids, templates, k)


def cocostuff_source(dataset_dir: str, templates: Templates, k: int) -> LabelMapSource:
    label_dir = require_path(os.path.join(dataset_dir, "cocostuff", "train2017"), "cocostuff", "folder")
    image_dir = require_path(os.path.join(dataset_dir, "coco", "train2017"), "cocostuff", "image folder")
    labels = sorted(glob.glob(os.path.join(label_dir, "*.png")))
    pairs = [(os.path.join(image_dir, os.path.splitext(os.path.basename(p))[0] + ".jpg"), p) for p in labels]
    names = cocostuff_class_names()
    merged = np.array(["-" in n for n in names] + [True] * (256 - len(names)))

    def to_ids(label: np.ndarray) -> np.ndarray:
        out = label.astype(np.int32)
        out[merged[np.clip(label, 0, 255)]] = IGNORE_LABEL
        return out

    return LabelMapSource("cocostuff", pairs, names, to_ids, templates, k, frozenset(n for n in names if "-" in n))


def mapillary_source(dataset_dir: str, templates: Templates, k: int) -> LabelMapSource:
    root = require_path(os.path.join(dataset_dir, "mapillary"), "mapillary", "folder")
    cfg_path = require_path(os.path.join(root, "config_v2.0.json"), "mapillary")
    with open(cfg_path) as f:
        try:
            labels = json.load(f)["labels"]
            names = [str(x["readable"]).lower() for x in labels]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise DataError(f"{cfg_path} (dataset mapillary): expected {{'labels': [{{'readable': ...}}, ...]}} "
                            f"({type(e).__name__}: {e})") from None
    image_dir = require_path(os.path.join(root, "training", "images"), "mapillary", "folder")
    label_dir = require_path(os.path.join(root, "training", "v2.0", "labels"), "mapillary", "folder")
    images = sorted(glob.glob(os.path.join(image_dir, "*.jpg")))
    pairs = [(p, os.path.join(label_dir, os.path.splitext(os.path.basename(p))[0] + ".png")) for p in images]
    unlabeled = np.array([n == "unlabeled" for n in names] + [True] * (65536 - len(names)))

    def to_ids(label: np.ndarray) -> np.ndarray:
        out = label.astype(np.int32)
        out[unlabeled[label.astype(np.int64)]] = IGNORE_LABEL
        return out

    return LabelMapSource("mapillary", pairs, names, to_ids, templates, k, frozenset({"unlabeled"}))


class CocoPartSource:
    """Instance-annotated part datasets in COCO format (PASCAL-Part, PACO-LVIS)."""

    def __init__(self, name: str, json_path: str, image_dir: str, templates: Templates, num_classes_per_sample: int):
        self.name, self.image_dir, self.templates, self.k = name, image_dir, templates, num_classes_per_sample
        self.json_path = json_path
        with open(json_path) as f:
            try:
                data = json.load(f)
            except json.JSONDecodeError as e:
                raise DataError(f"{json_path} (dataset {name}): not valid JSON ({e})") from None
        try:
            self.images = {int(im["id"]): im for im in data["images"]}
            self.categories = {int(c["id"]): str(c["name"]) for c in data["categories"]}
            anns = data["annotations"]
            missing = next((im for im in self.images.values() if "file_name" not in im), None)
        except (KeyError, TypeError, ValueError) as e:
            problem = f"missing field {e.args[0]!r}" if isinstance(e, KeyError) else str(e)
            raise DataError(f"{json_path} (dataset {name}): not a COCO-format file ({problem})") from None
        if missing is not None:
            raise DataError(f"{json_path} (dataset {name}): image {missing['id']} has no 'file_name'")
        self.anns_by_image: dict[int, list[dict]] = {}
        for a in anns:
            if isinstance(a, dict) and int(a.get("image_id", -1)) in self.images:
                self.anns_by_image.setdefault(int(a["image_id"]), []).append(a)
        self.image_ids = sorted(self.anns_by_image)
        if not self.image_ids:
            raise ValueError(f"{json_path}: no annotated images")

    def __len__(self) -> int:
        return len(self.image_ids)

    def sample(self, rng: np.random.Generator) -> RawSample:
        image_id = choice(rng, self.image_ids)
        info = self.images[image_id]
        path = os.path.join(self.image_dir, info["file_name"])
        image = read_image_rgb(path, self.name)
        h, w = image.shape[:2]
        by_cat: dict[int, np.ndarray] = {}
        for a in self.anns_by_image[image_id]:
            try:
                cat = int(a["category_id"])
                m = decode_segmentation(a["segmentation"], h, w)
            except (KeyError, TypeError, ValueError) as e:
                problem = f"no {e.args[0]!r}" if isinstance(e, KeyError) else str(e)
                raise SkipItem(self.name, self.json_path, "bad_annotation",
                               f"annotation {a.get('id')} (image {image_id}): {problem}") from None
            if cat not in self.categories:
                raise SkipItem(self.name, self.json_path, "bad_annotation",
                               f"annotation {a.get('id')} (image {image_id}): unknown category {cat}")
            by_cat[cat] = by_cat.get(cat, np.zeros((h, w), np.uint8)) | m
        cats = sorted(by_cat)
        names = [part_name(self.categories[c], rng) for c in cats]
        absent = [part_name(n, rng) for c, n in sorted(self.categories.items()) if c not in by_cat]
        q, a, m, e, s, mode = _conversations(rng, self.templates, draw_mode(rng), names, absent,
                                             [by_cat[c] for c in cats], self.k)
        return RawSample(self.name, path, image, q, a, m, e, s, meta={"mode": mode, "image_id": image_id})


def pascal_part_source(dataset_dir: str, templates: Templates, k: int) -> CocoPartSource:
    root = os.path.join(dataset_dir, "vlpart", "pascal_part")
    json_path = require_path(os.path.join(root, "train.json"), "pascal_part")
    image_dir = require_path(os.path.join(root, "VOCdevkit", "VOC2010", "JPEGImages"), "pascal_part", "image folder")
    return CocoPartSource("pascal_part", json_path, image_dir, templates, k)


def paco_lvis_source(dataset_dir: str, templates: Templates, k: int) -> CocoPartSource:
    json_path = require_path(os.path.join(dataset_dir, "vlpart", "paco", "annotations", "paco_lvis_v1_train.json"),
                             "paco_lvis")
    image_dir = require_path(os.path.join(dataset_dir, "coco"), "paco_lvis", "image folder")
    return CocoPartSource("paco_lvis", json_path, image_dir, templates, k)


_BUILDERS = {"ade20k": ade20k_source, "cocostuff": cocostuff_source, "mapillary": mapillary_source,
             "pascal_part": pascal_part_source, "paco_lvis": paco_lvis_source}


class SemSegSource:
    """The `sem_seg` entry of HybridDataset: a source picked uniformly, then one of its images."""

    def __init__(self, name: str, dataset_dir: str, sem_seg_data: Sequence[str], templates: Templates,
                 num_classes_per_sample: int = 3):
        unknown = [d for d in sem_seg_data if d not in _BUILDERS]
        if unknown or not sem_seg_data:
            raise ValueError(f"unknown semantic-segmentation dataset(s) {unknown}; "
                             f"known: {', '.join(SEM_SEG_DATASETS)}")
        self.name = name
        self.sources = [_BUILDERS[d](dataset_dir, templates, num_classes_per_sample) for d in sem_seg_data]

    def __len__(self) -> int:
        return sum(len(s) for s in self.sources)

    def sample(self, rng: np.random.Generator) -> RawSample:
        return choice(rng, self.sources).sample(rng)
