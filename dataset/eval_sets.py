"""Evaluation sets: one item per image with all its queries of the chosen split.

    build_eval_dataset(name, dataset_dir, split="val", seed=0, *, on_error="stop", report=None, ...)

Names: refcoco, refcoco+, refcocog, fprefcoco, fprefcoco+, fprefcocog, R-refcoco, R-refcoco+,
R-refcocog (every sentence of every ref of the split; `split="test"` takes testA and testB, as
the REFER API does; ref_id / sent_id as in the refs file) and ReasonSeg (val / test: text[0] of
each image, plus its first false-premise query when the json has `false_premise_QA`).

Nothing is dropped quietly: a ref, annotation or image that cannot be read stops the building
with an EvalDataError naming the file and the id (`on_error="stop"`), or is left out and counted
in `report` (`on_error="skip"`; dataset/eval_report.py). Images are checked from their headers
while the set is built (present, an image, within the size guard, the size the annotation says);
`read_eval_image` applies the same rule to an image that fails to decode at evaluation time.

Question wording: `question_style="sesame"` draws from the question templates (ours, or a JSON
override), `"lisa"` uses LISA's fixed prompts (what READ reports ReasonSeg with; the default for
ReasonSeg). Templates are drawn with an RNG seeded from (seed, dataset, image_id, ref_id, sent_id),
so a rerun, or any sharding of the images, gives the same question for the same sentence. (The
original drew them unseeded, so its numbers moved between runs.)

Ground-truth masks are decoded when `query.gt_mask` is read (from the RLE or shapes kept in the
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

from model.transforms import SamInput

from .coco_masks import decode_rles, union_rle
from .eval_report import EvalDataError, EvalSetReport, SkippedItem, check_on_error
from .image_io import SkipItem, SkipLog, count_skip, image_header, read_image_rgb
from .paths import check_data_root
from .reason_seg import load_reason_seg_annotation, read_json_text, reason_question, reason_seg_images, reason_seg_mask
from .refer import FALSE_PREMISE_DATASETS, REFER_DATASETS, ReferData, sentence_exists
from .sample import IGNORE_LABEL, RawSample, Sample, choice, to_sample
from .templates import LISA_EVAL, Templates, positive_answer, resolve_templates

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
class RleMask:
    """The union of a ref's annotations, kept as (at most one) compressed RLE."""
    rles: tuple
    height: int
    width: int

    def decode(self) -> np.ndarray:
        return decode_rles(self.rles, self.height, self.width)


@dataclass(frozen=True)
class PolygonLabelMask:
    """A ReasonSeg labelme shape list (value 1 targets, 255 ignore; 0 with ignore_as_background)."""
    shapes: tuple
    height: int
    width: int
    ignore_as_background: bool = False

    def decode(self) -> np.ndarray:
        m = reason_seg_mask(list(self.shapes), self.height, self.width)
        if self.ignore_as_background:
            m[m == IGNORE_LABEL] = 0
        return m


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

    @property
    def gt_mask_source(self) -> object:
        """What gt_mask is decoded from (an array, or a mask source): one object for the queries that
        share a mask (a ref's sentences; an image's false premises), so a cache key for work on it."""
        return self.__dict__["_gt_mask"]


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


def _question(style: str, templates: Templates, rng: np.random.Generator, text: str, is_sentence: bool,
              lower: bool = True) -> str:
    """The user turn for `text`, worded as the original: a short phrase lower-cased unless `lower`
    is False (a ReasonSeg false-premise phrase, which the original keeps as written)."""
    if style == "lisa":
        if is_sentence:
            return LISA_EVAL.long_question.format(sent=text)
        return LISA_EVAL.short_question.format(class_name=text.lower() if lower else text)
    return reason_question(rng, templates, text, is_sentence, lower)


# --- unreadable items: stop or skip -----------------------------------------------------------
class _Problems:
    """Routes every unreadable item of one set: an EvalDataError, or an entry in the report."""

    def __init__(self, report: EvalSetReport):
        self.report = report

    def __call__(self, kind: str, item: str, skip: SkipItem, refs: int, queries: int) -> None:
        r = self.report
        detail = skip.detail or skip.reason
        if r.on_error == "stop":
            what = detail if item in detail else f"{item}: {detail}"
            raise EvalDataError(f"{r.dataset} {r.split}: {skip.path}: {what} "
                                f"[evaluation stops on unreadable data; on_error='skip' leaves such items out "
                                f"and counts them]")
        r.add(SkippedItem(kind, item, skip.path, skip.reason, detail, refs, queries))


def _check_image(path: str, height: int, width: int, source: str) -> None:
    """SkipItem unless the image is present, an image, within the size guard and `height` x `width`."""
    size = image_header(path, source).size
    if size != (height, width):
        raise SkipItem(source, path, "size_mismatch",
                       f"image is {size[0]}x{size[1]} but the annotation says {height}x{width}")


def _refer_eval(name: str, dataset_dir: str, split: str, seed: int, style: str, templates: Templates,
                split_by: Optional[str], problem: _Problems) -> list[EvalImage]:
    data = ReferData(dataset_dir, name, split_by)
    report = problem.report
    by_image = data.refs_by_image(split)
    bad_refs = data.bad_refs_of(split)
    for bad in bad_refs:
        report.found_refs += 1
        report.found_queries += bad.queries
        problem("ref", f"ref {bad.ref_id}", SkipItem(name, data.refs_path, "bad_ref", bad.problem), 1, bad.queries)
    report.found_images += len({b.image_id for b in bad_refs if b.image_id is not None} - set(by_image))
    images = []
    for image_id, refs in by_image.items():
        info = data.images[image_id]
        path = data.image_path(image_id)
        n_queries = sum(len(ref["sentences"]) for ref in refs)
        report.found_images += 1
        report.found_refs += len(refs)
        report.found_queries += n_queries
        try:
            _check_image(path, info.height, info.width, name)
        except SkipItem as skip:
            problem("image", f"image {image_id}", skip, len(refs), n_queries)
            continue
        blank = BlankMask(info.height, info.width)
        queries = []
        for ref in refs:
            try:
                ref_mask = RleMask(tuple(union_rle(data.ref_rles(ref))), info.height, info.width)
            except SkipItem as skip:
                kind = "ref" if skip.reason == "unknown_annotation" else "annotation"
                problem(kind, f"ref {ref['ref_id']}", skip, 1, len(ref["sentences"]))
                continue
            for index, sent in enumerate(ref["sentences"]):
                sent_id = data.sentence_id(ref, index)
                exists = sentence_exists(sent)
                rng = stable_rng(seed, name, image_id, ref["ref_id"], sent_id)
                text = sent["sent"]
                gt_sent = sent.get("gt_sent") if name in FALSE_PREMISE_DATASETS and not exists else None
                queries.append(EvalQuery(
                    ref_id=ref["ref_id"], sent_id=sent_id, sentence=text,
                    question=_question(style, templates, rng, text, False), gt_exists=exists,
                    gt_sent=None if gt_sent is None else str(gt_sent), gt_mask=ref_mask if exists else blank,
                    extra={"question_style": style, "is_sentence": False}))
        if queries:
            images.append(EvalImage(path, image_id, info.height, info.width, queries, dataset=name, split=split))
    return images


def _reason_seg_query_count(json_path: str, include_false_premise: bool) -> int:
    """Queries an image would have given: its true-premise query, plus a false-premise one when
    asked for and the json has one (when the json cannot be read, as if it had)."""
    try:
        anno = read_json_text(json_path)
        has_fp = bool(anno.get("false_premise_QA"))
    except (OSError, ValueError, AttributeError):
        has_fp = True
    return 1 + int(include_false_premise and has_fp)


def _reason_seg_eval(name: str, dataset_dir: str, split: str, seed: int, style: str, templates: Templates,
                     include_false_premise: bool, ignore_as_background: bool, problem: _Problems) -> list[EvalImage]:
    report = problem.report
    images = []
    for image_id, path in enumerate(reason_seg_images(dataset_dir, name, split)):
        json_path = os.path.splitext(path)[0] + ".json"
        report.found_images += 1
        report.found_refs += 1
        try:
            h, w = image_header(path, name).size
            anno = load_reason_seg_annotation(json_path, h, w, source=name)
        except SkipItem as skip:
            n = _reason_seg_query_count(json_path, include_false_premise)
            report.found_queries += n
            problem("image" if skip.path == path else "annotation", f"image {image_id}", skip, 1, n)
            continue
        stem = os.path.splitext(os.path.basename(path))[0]
        text = anno.texts[0]
        rng = stable_rng(seed, name, stem, 0)
        queries = [EvalQuery(ref_id=image_id, sent_id=0, sentence=text,
                             question=_question(style, templates, rng, text, anno.is_sentence), gt_exists=True,
                             gt_sent=None, gt_mask=PolygonLabelMask(tuple(anno.shapes), h, w, ignore_as_background),
                             extra={"question_style": style, "is_sentence": anno.is_sentence})]
        if include_false_premise and anno.false_premise_qa:
            query, is_sentence, answer = anno.false_premise_qa[0]
            rng = stable_rng(seed, name, stem, 1)
            queries.append(EvalQuery(ref_id=image_id, sent_id=1, sentence=query,
                                     question=_question(style, templates, rng, query, is_sentence, lower=False),
                                     gt_exists=False, gt_sent=None, gt_mask=BlankMask(h, w),
                                     extra={"question_style": style, "is_sentence": is_sentence, "answer": answer}))
        report.found_queries += len(queries)
        images.append(EvalImage(path, image_id, h, w, queries, dataset=name, split=split, extra={"name": stem}))
    return images


def build_eval_dataset(name: str, dataset_dir: str, split: str = "val", seed: int = 0, *,
                       question_style: Optional[str] = None, templates: Union[Templates, str, None] = None,
                       include_false_premise: bool = True, split_by: Optional[str] = None,
                       on_error: str = "stop", report: Optional[EvalSetReport] = None,
                       ignore_as_background: bool = False, **kwargs: Any) -> list[EvalImage]:
    """All images of `split` of dataset `name`, each with every query (see the module docstring).

    question_style: "sesame" (templates, default for the refer sets) or "lisa" (default for ReasonSeg).
    split_by: another refs file for the refer sets (e.g. "unc" instead of "unc_exclude_unified").
    on_error: "stop" (an EvalDataError at the first unreadable ref / annotation / image) or "skip"
        (left out and recorded in `report`).
    report: an EvalSetReport to fill (counts found / evaluated / skipped); its dataset, split and
        on_error are set here. Without one, a skip summary is only logged.
    ignore_as_background: ReasonSeg ground truth's ignore pixels (255) count as background (0), as
        the original SESAME evaluation does; by default they are left out of the metrics.
    """
    if kwargs:
        raise TypeError(f"build_eval_dataset got unknown argument(s) {sorted(kwargs)}")
    if name not in EVAL_DATASETS:
        raise ValueError(f"unknown evaluation dataset {name!r}; known: {', '.join(EVAL_DATASETS)}")
    style = question_style or ("lisa" if name == "ReasonSeg" else "sesame")
    if style not in QUESTION_STYLES:
        raise ValueError(f"question_style must be one of {QUESTION_STYLES}, got {question_style!r}")
    check_data_root(dataset_dir)
    t = resolve_templates(templates)
    report = report if report is not None else EvalSetReport()
    report.start(name, split, on_error)
    problem = _Problems(report)
    if name == "ReasonSeg":
        if split not in ("train", "val", "test"):
            raise ValueError(f"ReasonSeg splits are train, val, test; got {split!r}")
        images = _reason_seg_eval(name, dataset_dir, split, seed, style, t, include_false_premise,
                                  ignore_as_background, problem)
    else:
        assert name in REFER_DATASETS
        images = _refer_eval(name, dataset_dir, split, seed, style, t, split_by, problem)
    report.built_images = len(images)
    report.built_refs = sum(len({q.ref_id for q in im.queries}) for im in images)
    report.built_queries = sum(len(im.queries) for im in images)
    if not report.complete:
        log.warning("%s", report.summary())
    return images


def read_eval_image(image: EvalImage, on_error: str = "stop",
                    report: Optional[EvalSetReport] = None) -> Optional[np.ndarray]:
    """The image's (H, W, 3) uint8 RGB pixels, decoded as training decodes them (OpenCV, EXIF
    orientation applied, the header size-guarded first) and checked against the annotation size.

    An image that cannot be used (not found, empty, not an image, too large, cannot be decoded,
    not the annotated size): with on_error="stop" an EvalDataError whose one-line message names the
    file and what is wrong; with "skip" the image and its queries are recorded in `report` (stage
    "run": they are not evaluated) and None is returned. Safe to call from loader threads."""
    check_on_error(on_error)
    if on_error == "skip" and report is None:
        raise ValueError("read_eval_image(on_error='skip') needs the report to count the image in")
    source = image.dataset or "evaluation"
    try:
        rgb = read_image_rgb(image.image_path, source)
        if rgb.shape[:2] != (image.height, image.width):
            raise SkipItem(source, image.image_path, "size_mismatch",
                           f"image is {rgb.shape[0]}x{rgb.shape[1]} but the annotation says "
                           f"{image.height}x{image.width}")
        return rgb
    except SkipItem as skip:
        if on_error == "stop":
            raise EvalDataError(f"{source} {image.split}: {skip.path}: image {image.image_id}: "
                                f"{skip.detail or skip.reason}") from None
        report.add(SkippedItem("image", f"image {image.image_id}", skip.path, skip.reason, skip.detail or skip.reason,
                               len({q.ref_id for q in image.queries}), len(image.queries), stage="run"))
        return None


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
        return positive_answer(rng, templates, expr, lambda: query.gt_mask == 1)  # decoded only for {where}
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
            raise SkipItem(im.dataset or "eval", im.image_path, "size_mismatch",
                           f"image is {image.shape[0]}x{image.shape[1]}, annotations say {im.height}x{im.width}")
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
                count_skip(skipped, skip, self.skip_log)
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
