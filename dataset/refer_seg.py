"""Training samples from the referring datasets (RefCOCO family, FP-RefCOCO*, R-RefCOCO*).

One sample = one image: up to `num_classes_per_sample` of all sentences of all its refs (true and
false premise mixed), each its own single-turn conversation. A sentence whose object exists gets a
positive answer with one [SEG] and the ref's mask; one that does not gets a correction naming
`gt_sent` (FP-RefCOCO*) or a plain denial (everything else), and no mask.
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

from .image_io import DataError, SkipItem, read_image_rgb
from .refer import FALSE_PREMISE_DATASETS, ReferData, sentence_exists
from .sample import RawSample, choice, sample_without_replacement
from .templates import Templates, positive_answer


def refer_conversation(rng: np.random.Generator, templates: Templates, sentence: dict, exists: bool,
                       dataset: str, mask: Optional[np.ndarray] = None) -> tuple[str, str]:
    """(question, answer) for one referring sentence, as the original builds them (the question
    holds the lower-cased expression as written, the answer the stripped one). `mask`: the object's,
    for answer templates that say where it is."""
    question = choice(rng, templates.short_question).format(class_name=sentence["sent"].lower())
    expr = sentence["sent"].strip().lower()
    if exists:
        answer = positive_answer(rng, templates, expr, mask)
    elif dataset in FALSE_PREMISE_DATASETS and sentence.get("gt_sent"):
        gt_name = str(sentence["gt_sent"]).strip().lower()
        answer = choice(rng, templates.correct_answer).format(class_name=expr, gt_name=gt_name)
    else:
        answer = choice(rng, templates.neg_answer).format(class_name=expr)
    return question, answer


class ReferSegSource:
    """Samples images of one or more referring datasets (a dataset first, uniformly, then an image)."""

    def __init__(self, name: str, dataset_dir: str, datasets: Sequence[str], templates: Templates,
                 num_classes_per_sample: int = 3, split: str = "train", split_by: Optional[dict[str, str]] = None):
        if not datasets:
            raise ValueError(f"{name}: no referring datasets given")
        self.name = name
        self.templates = templates
        self.num_classes_per_sample = num_classes_per_sample
        self.data: list[ReferData] = []
        self.image_ids: list[list[int]] = []
        self.refs: list[dict[int, list[dict]]] = []
        for ds in datasets:
            data = ReferData(dataset_dir, ds, (split_by or {}).get(ds))
            by_image = data.refs_by_image(split)
            if not by_image:
                bad = data.bad_refs_of(split)
                raise DataError(f"{data.refs_path} (dataset {ds}): no usable ref in split {split!r} "
                                f"({len(bad)} malformed, e.g. ref {bad[0].ref_id}: {bad[0].problem})")
            self.data.append(data)
            self.refs.append(by_image)
            self.image_ids.append(list(by_image))

    def __len__(self) -> int:
        return sum(len(ids) for ids in self.image_ids)

    def sample(self, rng: np.random.Generator) -> RawSample:
        d = int(rng.integers(len(self.data)))
        data = self.data[d]
        image_id = choice(rng, self.image_ids[d])
        path = data.image_path(image_id)
        image = read_image_rgb(path, data.dataset)
        info = data.images[image_id]
        if image.shape[:2] != (info.height, info.width):
            raise SkipItem(data.dataset, path, "size_mismatch", f"image is {image.shape[0]}x{image.shape[1]} but "
                                                                f"instances.json says {info.height}x{info.width}")
        pairs = [(ref, sent) for ref in self.refs[d][image_id] for sent in ref["sentences"]]
        chosen = sample_without_replacement(rng, pairs, self.num_classes_per_sample)
        questions, answers, masks, exists, sentences = [], [], [], [], []
        ref_masks: dict[int, np.ndarray] = {}
        for ref, sent in chosen:
            ok = sentence_exists(sent)
            mask = None
            if ok:
                key = ref["ref_id"]
                if key not in ref_masks:
                    ref_masks[key] = data.ref_mask(ref)
                mask = ref_masks[key]
                masks.append(mask)
            q, a = refer_conversation(rng, self.templates, sent, ok, data.dataset, mask)
            questions.append([q])
            answers.append([a])
            exists.append(ok)
            sentences.append(sent["sent"])
        return RawSample(self.name, path, image, questions, answers, masks, exists, sentences,
                         meta={"dataset": data.dataset, "image_id": image_id})
