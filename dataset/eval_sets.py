"""Evaluation sets: one item per image with all its queries of the chosen split.

    build_eval_dataset(name, dataset_dir, split="val", seed=0, question_style=None, templates=None)

Names: refcoco, refcoco+, refcocog, fprefcoco, fprefcoco+, fprefcocog, R-refcoco, R-refcoco+,
R-refcocog (every sentence of every ref of the split; ref_id / sent_id as in the refs file) and
ReasonSeg (val / test: text[0] of each image, plus its first false-premise query when the json
has `false_premise_QA`).

Question wording: `question_style="sesame"` draws from the question templates (ours, or a JSON
override), `"lisa"` uses LISA's fixed prompts (what READ reports ReasonSeg with; the default for
ReasonSeg). Templates are drawn with an RNG seeded from (seed, dataset, image_id, ref_id, sent_id),
so a rerun, or any sharding of the images, gives the same question for the same sentence. (The
original drew them unseeded, so its numbers moved between runs.)

Ground-truth masks are decoded when `query.gt_mask` is read (from the annotation kept in the
query), so a whole split stays small in memory; blank for false premises; 255 = ignore (ReasonSeg).

`teacher_forced_samples(images, clip_transform, sam_transform)` turns evaluation queries into
training-format samples (a positive [SEG] answer for existing objects, a denial or correction
otherwise) for the teacher-forced validation in the training loop.
"""
from __future__ import annotations

import logging
import os
import zlib
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Optional, Sequence, Union

import numpy as np
import torch

from .image_io import SkipItem, SkipLog, image_size, read_image_rgb
from .reason_seg import load_reason_seg_annotation, reason_question, reason_seg_images, reason_seg_mask
from .refer import FALSE_PREMISE_DATASETS, REFER_DATASETS, ReferData, ann_ids_of, decode_segmentation, sentence_exists
from .sample import RawSample, Sample, choice, to_sample
from .templates import LISA_EVAL, Templates, resolve_templates
from model.transforms import SamInput

log = logging.getLogger(__name__)

EVAL_DATASETS = ("refcoco", "refcoco+", "refcocog", "fprefcoco", "fprefcoco+", "fprefcocog",
                 "R-refcoco", "R-refcoco+", "R-refcocog", "ReasonSeg")
QUESTION_STYLES = ("sesame", "lisa")


# --- ground-truth masks, decoded on access ---------------------------------------------------
@dataclass(frozen=True)
class BlankMask:
    height: int
    width: int

    def decode(self) -> np.ndarray:
        return np.zeros((self.height, self.width), np.uint8)


@dataclass(frozen=True)
class SegmentationMask:
    """The union of COCO segmentations (polygons / RLE) of one ref."""
    segmentations: tuple
    height: int
    width: int

    def decode(self) -> np.ndarray:
        m = np.zeros((self.height, self.width), np.uint8)
        for segm in self.segmentations:
            m |= decode_segmentation(segm, self.height, self.width)
        return m


@dataclass(frozen=True)
class PolygonLabelMask:
    """A ReasonSeg labelme shape list (value 1 targets, 255 ignore)."""
    shapes: tuple
    height: int
    width: int

    def decode(self) -> np.ndarray:
        return reason_seg_mask(list(self.shapes), self.height, self.width)


class _DecodedOnAccess:
    """Dataclass field that stores an array or a mask source and returns an array."""

    def __set_name__(self, owner, name):
        self.slot = "_" + name

    def __get__(self, obj, objtype=None):
        if obj is None:
            return self
        value = obj.__dict__[self.slot]
        return value if isinstance(value, np.ndarray) else value.decode()

    def __set__(self, obj, value):
        obj.__dict__[self.slot] = value


@dataclass
class EvalQuery:
    ref_id: int
    sent_id: int
    sentence: str  # the referring expression / ReasonSeg text as in the annotation
    question: str  # the full user turn, "<image>\n..." (templated, deterministic given the seed)
    gt_exists: bool
    gt_sent: Optional[str]  # FP-RefCOCO: the true expression to suggest; else None
    gt_mask: np.ndarray = field(default=_DecodedOnAccess(), repr=False, compare=False)  # (H, W) uint8; 255 = ignore
    extra: dict = field(default_factory=dict)  # is_sentence, question_style, answer (ReasonSeg false premise)

    def __post_init__(self) -> None:
        if isinstance(self.__dict__.get("_gt_mask"), _DecodedOnAccess):
            raise TypeError("EvalQuery needs gt_mask (an (H, W) uint8 array or a mask source with .decode())")


@dataclass
class EvalImage:
    image_path: str
    image_id: int
    height: int
    width: int
    queries: list[EvalQuery]
    dataset: str = ""
    split: str = ""
    extra: dict = field(default_factory=dict)


def stable_rng(seed: int, *keys: Union[int, str]) -> np.random.Generator:
    """An RNG that depends only on (seed, keys): strings through CRC32, ints masked non-negative."""
    entropy = [int(seed) & 0xFFFFFFFF]
    for k in keys:
        entropy.append(zlib.crc32(k.encode()) if isinstance(k, str) else int(k) & 0xFFFFFFFFFFFFFFFF)
    return np.random.default_rng(entropy)


def _question(style: str, templates: Templates, rng: np.random.Generator, text: str, is_sentence: bool) -> str:
    if style == "lisa":
        if is_sentence:
            return LISA_EVAL.long_question.format(sent=text.strip())
        return LISA_EVAL.short_question.format(class_name=text.strip().lower())
    return reason_question(rng, templates, text, is_sentence)


def _check_segmentation(segm, height: int, width: int) -> None:
    if isinstance(segm, list):
        if not all(isinstance(p, list) and len(p) >= 6 and len(p) % 2 == 0 for p in segm):
            raise ValueError("polygons must be lists of at least 3 x, y pairs")
    elif isinstance(segm, dict) and "counts" in segm and "size" in segm:
        if [int(s) for s in segm["size"]] != [height, width]:
            raise ValueError(f"RLE size {segm['size']} differs from image size {[height, width]}")
    else:
        raise ValueError(f"unrecognised segmentation of type {type(segm).__name__}")


def _refer_eval(name: str, dataset_dir: str, split: str, seed: int, style: str, templates: Templates,
                skip_log: SkipLog, split_by: Optional[str]) -> list[EvalImage]:
    data = ReferData(dataset_dir, name, split_by)
    if data.malformed_refs:
        skip_log.merge({name: data.malformed_refs})
    images = []
    for image_id, refs in data.refs_by_image(split).items():
        info = data.images[image_id]
        blank = BlankMask(info.height, info.width)
        queries = []
        for ref in refs:
            try:
                segms = []
                for ann_id in ann_ids_of(ref):
                    if ann_id not in data.anns:
                        raise ValueError(f"unknown ann_id {ann_id}")
                    _check_segmentation(data.anns[ann_id].get("segmentation"), info.height, info.width)
                    segms.append(data.anns[ann_id]["segmentation"])
            except (ValueError, TypeError) as e:
                skip_log.record(SkipItem(name, data.image_path(image_id), f"ref {ref['ref_id']}: {e}"))
                continue
            ref_mask = SegmentationMask(tuple(segms), info.height, info.width)
            for sent in ref["sentences"]:
                exists = sentence_exists(sent)
                rng = stable_rng(seed, name, image_id, int(ref["ref_id"]), int(sent.get("sent_id", -1)))
                text = str(sent["sent"])
                gt_sent = sent.get("gt_sent") if name in FALSE_PREMISE_DATASETS else None
                queries.append(EvalQuery(
                    ref_id=int(ref["ref_id"]), sent_id=int(sent.get("sent_id", -1)), sentence=text,
                    question=_question(style, templates, rng, text, False), gt_exists=exists,
                    gt_sent=None if gt_sent is None else str(gt_sent), gt_mask=ref_mask if exists else blank,
                    extra={"question_style": style, "is_sentence": False}))
        if queries:
            images.append(EvalImage(data.image_path(image_id), image_id, info.height, info.width, queries,
                                    dataset=name, split=split))
    return images


def _reason_seg_eval(name: str, dataset_dir: str, split: str, seed: int, style: str, templates: Templates,
                     skip_log: SkipLog, include_false_premise: bool) -> list[EvalImage]:
    images = []
    for image_id, path in enumerate(reason_seg_images(dataset_dir, name, split)):
        try:
            h, w = image_size(path, name)
            anno = load_reason_seg_annotation(os.path.splitext(path)[0] + ".json", h, w, source=name)
        except SkipItem as skip:
            skip_log.record(skip)
            continue
        shapes = tuple(anno.shapes)  # kept instead of the decoded mask, so the split stays small
        stem = os.path.splitext(os.path.basename(path))[0]
        text = anno.texts[0]
        rng = stable_rng(seed, name, stem, 0)
        queries = [EvalQuery(ref_id=image_id, sent_id=0, sentence=text,
                             question=_question(style, templates, rng, text, anno.is_sentence), gt_exists=True,
                             gt_sent=None, gt_mask=PolygonLabelMask(shapes, h, w),
                             extra={"question_style": style, "is_sentence": anno.is_sentence})]
        if include_false_premise and anno.false_premise_qa:
            query, is_sentence, answer = anno.false_premise_qa[0]
            rng = stable_rng(seed, name, stem, 1)
            queries.append(EvalQuery(ref_id=image_id, sent_id=1, sentence=query,
                                     question=_question(style, templates, rng, query, is_sentence), gt_exists=False,
                                     gt_sent=None, gt_mask=BlankMask(h, w),
                                     extra={"question_style": style, "is_sentence": is_sentence, "answer": answer}))
        images.append(EvalImage(path, image_id, h, w, queries, dataset=name, split=split, extra={"name": stem}))
    return images


def build_eval_dataset(name: str, dataset_dir: str, split: str = "val", seed: int = 0, *,
                       question_style: Optional[str] = None, templates: Union[Templates, str, None] = None,
                       include_false_premise: bool = True, split_by: Optional[str] = None,
                       skip_log: Optional[SkipLog] = None, **kwargs: Any) -> list[EvalImage]:
    """All images of `split` of dataset `name`, each with every query (see the module docstring).

    question_style: "sesame" (templates, default for the refer sets) or "lisa" (default for ReasonSeg).
    split_by: another refs file for the refer sets (e.g. "unc" instead of "unc_exclude_unified").
    skip_log: collects malformed refs / annotations (a summary is logged either way).
    """
    if kwargs:
        raise TypeError(f"build_eval_dataset got unknown argument(s) {sorted(kwargs)}")
    if name not in EVAL_DATASETS:
        raise ValueError(f"unknown evaluation dataset {name!r}; known: {', '.join(EVAL_DATASETS)}")
    style = question_style or ("lisa" if name == "ReasonSeg" else "sesame")
    if style not in QUESTION_STYLES:
        raise ValueError(f"question_style must be one of {QUESTION_STYLES}, got {question_style!r}")
    t = resolve_templates(templates)
    skips = skip_log if skip_log is not None else SkipLog()
    if name == "ReasonSeg":
        if split not in ("train", "val", "test"):
            raise ValueError(f"ReasonSeg splits are train, val, test; got {split!r}")
        images = _reason_seg_eval(name, dataset_dir, split, seed, style, t, skips, include_false_premise)
    else:
        assert name in REFER_DATASETS
        images = _refer_eval(name, dataset_dir, split, seed, style, t, skips, split_by)
    if skips.counts:
        log.warning("%s %s: %s", name, split, skips.summary())
    return images


# --- teacher-forced validation ---------------------------------------------------------------
def teacher_forced_answer(query: EvalQuery, image_id: int, templates: Templates, seed: int) -> str:
    """The answer a perfect model gives: [SEG] for existing objects, else the provided / templated
    denial or correction. Seeded like the questions."""
    rng = stable_rng(seed, "answer", image_id, query.ref_id, query.sent_id)
    expr = query.sentence.strip().lower()
    if query.gt_exists:
        if query.extra.get("question_style") == "lisa":
            return LISA_EVAL.answer
        if query.extra.get("is_sentence"):
            return choice(rng, templates.long_answer)
        return choice(rng, templates.short_answer).format(class_name=expr)
    if query.extra.get("answer"):
        return str(query.extra["answer"]).strip()
    if query.gt_sent:
        return choice(rng, templates.correct_answer).format(class_name=expr, gt_name=query.gt_sent.strip().lower())
    return choice(rng, templates.neg_answer).format(class_name=expr)


class TeacherForcedSamples(torch.utils.data.Dataset):
    """One training-format Sample per evaluation image: one conversation per query (question +
    the answer a perfect model gives), masks for the existing objects. Unreadable images are
    skipped (the next image is used) and counted in `skip_log`."""

    def __init__(self, images: Sequence[EvalImage], clip_transform: Callable[[np.ndarray], torch.Tensor],
                 sam_transform: Callable[[np.ndarray], SamInput], *, templates: Union[Templates, str, None] = None,
                 seed: int = 0, conv_template: str = "llava_v1", max_queries_per_image: Optional[int] = None):
        self.images = list(images)
        self.clip_transform, self.sam_transform = clip_transform, sam_transform
        self.templates, self.seed, self.conv_template = resolve_templates(templates), seed, conv_template
        self.max_queries = max_queries_per_image
        self.skip_log = SkipLog()

    def __len__(self) -> int:
        return len(self.images)

    def _raw(self, im: EvalImage) -> RawSample:
        image = read_image_rgb(im.image_path, im.dataset or "eval")
        if image.shape[:2] != (im.height, im.width):
            raise SkipItem(im.dataset or "eval", im.image_path,
                           f"image is {image.shape[:2]}, annotations say {(im.height, im.width)}")
        queries = im.queries
        if self.max_queries is not None and len(queries) > self.max_queries:
            order = stable_rng(self.seed, "subset", im.image_id).permutation(len(queries))[:self.max_queries]
            queries = [queries[i] for i in sorted(order)]
        answers = [[teacher_forced_answer(q, im.image_id, self.templates, self.seed)] for q in queries]
        return RawSample(im.dataset or "eval", im.image_path, image, [[q.question] for q in queries], answers,
                         [q.gt_mask for q in queries if q.gt_exists], [q.gt_exists for q in queries],
                         [q.sentence for q in queries],
                         meta={"image_id": im.image_id, "dataset": im.dataset,
                               "ref_ids": [q.ref_id for q in queries], "sent_ids": [q.sent_id for q in queries]})

    def __getitem__(self, idx: int) -> Sample:
        if not 0 <= idx < len(self.images):
            raise IndexError(idx)
        skipped: dict[str, int] = {}
        for k in range(len(self.images)):
            im = self.images[(idx + k) % len(self.images)]
            try:
                raw = self._raw(im)
            except SkipItem as skip:
                self.skip_log.record(skip)
                skipped[skip.source] = skipped.get(skip.source, 0) + 1
                continue
            return to_sample(raw, self.clip_transform, self.sam_transform, self.conv_template, skipped)
        raise RuntimeError(f"no readable image among {len(self.images)} evaluation images ({self.skip_log.summary()})")

    def __iter__(self) -> Iterator[Sample]:
        for i in range(len(self)):
            yield self[i]


def teacher_forced_samples(images: Sequence[EvalImage], clip_transform, sam_transform,
                           **kwargs) -> TeacherForcedSamples:
    """See TeacherForcedSamples (keyword options: templates, seed, conv_template, max_queries_per_image)."""
    return TeacherForcedSamples(images, clip_transform, sam_transform, **kwargs)
