"""ReasonSeg (LISA's reasoning segmentation set, with SESAME's false-premise augmentation).

    reason_seg/ReasonSeg/{train,val,test}/<name>.jpg + <name>.json
    json: "text": [query, ...]  (1-5 phrasings in train; text[0] is the one evaluated)
          "is_sentence": bool  (long instruction vs short noun phrase)
          "shapes": [{"label", "points": [[x, y], ...]}, ...]   (labelme polygons)
          "false_premise_QA": [[query, is_sentence, answer], ...]  (FP-Aug version only; optional)
    Files are UTF-8, or cp1252 (some are; read as the original does).

Mask rule: "flag" shapes are skipped; polygons are filled (with a 1-pixel outline, integer
vertices) from the largest area to the smallest, value 255 if the label contains "ignore", else 1.
"""
from __future__ import annotations

import glob
import json
import os
from dataclasses import dataclass

import cv2
import numpy as np

from .image_io import SkipItem, read_image_rgb, require_path
from .sample import IGNORE_LABEL, RawSample, choice, sample_without_replacement
from .templates import SEG, Templates

TRUE_PREMISE_RATE = 0.85  # else a false-premise query with its provided correction (when the image has one)


@dataclass
class ReasonSegAnnotation:
    mask: np.ndarray  # (H, W) uint8: 0, 1, 255 = ignore
    texts: list[str]
    is_sentence: bool
    false_premise_qa: list[tuple[str, bool, str]]  # (query, is_sentence, answer)
    shapes: list[dict]  # the labelme shapes the mask was drawn from


def _polygon_mask(points, height: int, width: int, value: int) -> np.ndarray:
    pts = np.asarray(points, dtype=np.float64).astype(np.int32).reshape(1, -1, 2)
    m = np.zeros((height, width), np.uint8)
    cv2.polylines(m, pts, True, value, 1)
    cv2.fillPoly(m, pts, value)
    return m


def reason_seg_mask(shapes, height: int, width: int) -> np.ndarray:
    polys = []
    for s in shapes:
        label = str(s["label"])
        if label.lower() == "flag":
            continue
        pts = s["points"]
        if len(pts) < 3 or any(len(p) != 2 for p in pts):
            raise ValueError(f"shape {label!r} needs at least 3 [x, y] points")
        value = IGNORE_LABEL if "ignore" in label.lower() else 1
        polys.append((int(_polygon_mask(pts, height, width, 1).sum()), pts, value))
    mask = np.zeros((height, width), np.uint8)
    for _, pts, value in sorted(polys, key=lambda p: -p[0]):  # largest first: small shapes stay on top
        pts_i = np.asarray(pts, dtype=np.float64).astype(np.int32).reshape(1, -1, 2)
        cv2.polylines(mask, pts_i, True, value, 1)
        cv2.fillPoly(mask, pts_i, value)
    return mask


def read_json_text(path: str):
    """A JSON file read as UTF-8 (a BOM is allowed), or as cp1252 when it is not UTF-8: some
    ReasonSeg files are cp1252, and the original falls back to that encoding too."""
    with open(path, "rb") as f:
        data = f.read()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError:
        try:
            text = data.decode("cp1252")
        except UnicodeDecodeError as e:
            raise ValueError(f"neither UTF-8 nor cp1252 text ({e})") from None
    return json.loads(text)


def load_reason_seg_annotation(json_path: str, height: int, width: int,
                               source: str = "ReasonSeg") -> ReasonSegAnnotation:
    """Parse one ReasonSeg json. Raises SkipItem if missing or malformed."""
    try:
        anno = read_json_text(json_path)
        if not isinstance(anno, dict):
            raise ValueError("expected a JSON object")
        texts = anno["text"]
        texts = [texts] if isinstance(texts, str) else list(texts)
        if not texts or not all(isinstance(t, str) and t.strip() for t in texts):
            raise ValueError("'text' must hold at least one non-empty string")
        mask = reason_seg_mask(anno["shapes"], height, width)
        fp = []
        for item in anno.get("false_premise_QA") or []:
            if not (isinstance(item, (list, tuple)) and len(item) == 3 and isinstance(item[0], str)
                    and isinstance(item[2], str)):
                raise ValueError(f"false_premise_QA entries must be [query, is_sentence, answer], got {item!r}")
            if SEG in item[2]:
                raise ValueError("a false-premise answer must not contain [SEG]")
            fp.append((item[0], bool(item[1]), item[2]))
        return ReasonSegAnnotation(mask, texts, bool(anno.get("is_sentence", False)), fp, list(anno["shapes"]))
    except FileNotFoundError:
        raise SkipItem(source, json_path, "annotation_missing", "annotation json missing") from None
    except KeyError as e:
        raise SkipItem(source, json_path, "bad_annotation", f"malformed annotation (no {e.args[0]!r})") from None
    except (OSError, ValueError, TypeError) as e:
        raise SkipItem(source, json_path, "bad_annotation", f"malformed annotation ({type(e).__name__}: {e})") from None


def reason_seg_images(dataset_dir: str, name: str, split: str) -> list[str]:
    folder = require_path(os.path.join(dataset_dir, "reason_seg", name, split), f"{name}|{split}", "folder")
    return sorted(glob.glob(os.path.join(folder, "*.jpg")))


def reason_question(rng: np.random.Generator, templates: Templates, text: str, is_sentence: bool,
                    lower: bool = True) -> str:
    """A templated question as the original words it: a sentence as written, a short phrase
    lower-cased (`lower=False`: as written, as the original does for false-premise phrases)."""
    if is_sentence:
        return choice(rng, templates.long_question).format(sent=text)
    return choice(rng, templates.short_question).format(class_name=text.lower() if lower else text)


def parse_reason_seg_data(spec: str) -> tuple[str, list[str]]:
    """"ReasonSeg|train" or "ReasonSeg|train_val" -> ("ReasonSeg", ["train"] / ["train", "val"])."""
    parts = spec.split("|")
    if len(parts) != 2 or not parts[0] or not parts[1]:
        raise ValueError(f"reason_seg_data must look like 'ReasonSeg|train' (splits joined by '_'), got {spec!r}")
    return parts[0], parts[1].split("_")


class ReasonSegSource:
    def __init__(self, name: str, dataset_dir: str, reason_seg_data: str, templates: Templates,
                 num_classes_per_sample: int = 3):
        self.name = name
        self.templates = templates
        self.num_classes_per_sample = num_classes_per_sample
        ds, splits = parse_reason_seg_data(reason_seg_data)
        self.images: list[str] = []
        for split in splits:
            self.images += reason_seg_images(dataset_dir, ds, split)
        if not self.images:
            raise ValueError(f"{reason_seg_data}: no .jpg images under {os.path.join(dataset_dir, 'reason_seg', ds)}")

    def __len__(self) -> int:
        return len(self.images)

    def sample(self, rng: np.random.Generator) -> RawSample:
        path = choice(rng, self.images)
        image = read_image_rgb(path, self.name)
        anno = load_reason_seg_annotation(os.path.splitext(path)[0] + ".json", *image.shape[:2], source=self.name)
        true_premise = rng.random() < TRUE_PREMISE_RATE or not anno.false_premise_qa
        k = self.num_classes_per_sample
        questions, answers, masks, exists, sentences = [], [], [], [], []
        if true_premise:
            for text in sample_without_replacement(rng, anno.texts, k):
                questions.append([reason_question(rng, self.templates, text, anno.is_sentence)])
                answers.append([choice(rng, self.templates.long_answer)])
                masks.append(anno.mask)
                exists.append(True)
                sentences.append(text)
        else:
            for query, is_sentence, answer in sample_without_replacement(rng, anno.false_premise_qa, k):
                questions.append([reason_question(rng, self.templates, query, is_sentence, lower=False)])
                answers.append([answer])
                exists.append(False)
                sentences.append(query)
        return RawSample(self.name, path, image, questions, answers, masks, exists, sentences,
                         meta={"mode": "true_premise" if true_premise else "false_premise_correction"})

