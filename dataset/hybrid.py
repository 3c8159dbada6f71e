"""HybridDataset: the training mixture of every source, sampled by rate.

Item `idx` is a pure function of (seed, idx): its RNG is seeded from both, picks a source with
probability rate / sum(rates), then lets that source draw an image and its conversations. A resumed
run therefore replays the same stream by skipping indices, and DataLoader workers need no seeding.
(The original ignored `idx` and drew from the unseeded global RNG.)

A corrupt image or malformed annotation is skipped and counted per "<source>/<reason>", and the
same RNG stream draws a replacement, so the item stays deterministic.
"""
from __future__ import annotations

import logging
from typing import Callable, Sequence, Union

import numpy as np
import torch

from model.conversation import SYSTEM_PROMPTS
from model.transforms import SamInput

from .image_io import SkipItem, SkipLog, count_skip
from .paths import check_data_root
from .reason_seg import ReasonSegSource
from .refer import REFER_DATASETS
from .refer_seg import ReferSegSource
from .sample import Sample, to_sample
from .sem_seg import SemSegSource
from .templates import SEG, Templates, resolve_templates
from .vqa import VqaSource

log = logging.getLogger(__name__)

HYBRID_SOURCES = ("sem_seg", "refer_seg", "neg_refer_seg", "correct_refer_seg", "vqa", "reason_seg")
DEFAULT_SAMPLES_PER_EPOCH = 500 * 12 * 8  # steps_per_epoch x batch_size x GPUs of the SESAME recipe


def split_names(value: Union[str, Sequence[str]], what: str) -> list[str]:
    """"a||b" or ["a", "b"] -> ["a", "b"]."""
    names = value.split("||") if isinstance(value, str) else list(value)
    names = [n.strip() for n in names if n.strip()]
    if not names:
        raise ValueError(f"{what}: no names given")
    return names


def parse_rates(value: Union[str, Sequence[float]], n: int) -> np.ndarray:
    rates = [float(x) for x in value.split(",")] if isinstance(value, str) else [float(x) for x in value]
    if len(rates) != n:
        raise ValueError(f"sample_rates has {len(rates)} values for {n} datasets")
    if any(r < 0 for r in rates) or sum(rates) <= 0:
        raise ValueError(f"sample_rates must be non-negative with a positive sum, got {rates}")
    return np.asarray(rates) / sum(rates)


class HybridDataset(torch.utils.data.Dataset):
    def __init__(
        self,
        dataset_dir: str,
        tokenizer,
        clip_transform: Callable[[np.ndarray], torch.Tensor],
        sam_transform: Callable[[np.ndarray], SamInput],
        *,
        datasets: Union[str, Sequence[str]] = "refer_seg||correct_refer_seg||vqa||neg_refer_seg",
        sample_rates: Union[str, Sequence[float]] = (12, 2, 2, 1),
        refer_seg_data: Union[str, Sequence[str]] = "refclef||refcoco||refcoco+||refcocog",
        neg_refer_seg_data: Union[str, Sequence[str]] = "R-refcocog||R-refcoco||R-refcoco+",
        correct_refer_seg_data: Union[str, Sequence[str]] = "fprefcoco||fprefcoco+||fprefcocog",
        vqa_data: str = "llava_instruct_150k",
        reason_seg_data: str = "ReasonSeg|train",
        sem_seg_data: Union[str, Sequence[str]] = "ade20k||cocostuff||pascal_part||paco_lvis||mapillary",
        num_classes_per_sample: int = 3,
        samples_per_epoch: int = DEFAULT_SAMPLES_PER_EPOCH,
        seed: int = 0,
        templates: Union[Templates, str, None] = None,
        conv_template: str = "llava_v1",
        max_retries: int = 50,
    ):
        self.names = split_names(datasets, "datasets")
        unknown = [n for n in self.names if n not in HYBRID_SOURCES]
        if unknown:
            raise ValueError(f"unknown dataset name(s) {unknown}; known: {', '.join(HYBRID_SOURCES)}")
        self.rates = parse_rates(sample_rates, len(self.names))
        if num_classes_per_sample < 1:
            raise ValueError(f"num_classes_per_sample must be >= 1, got {num_classes_per_sample}")
        if samples_per_epoch < 1:
            raise ValueError(f"samples_per_epoch must be >= 1, got {samples_per_epoch}")
        if tokenizer is not None and SEG not in tokenizer.get_vocab():
            raise ValueError("the tokenizer has no [SEG] token: call model.tokenizer.add_sesame_tokens first")
        check_data_root(dataset_dir)
        if conv_template not in SYSTEM_PROMPTS:
            raise ValueError(f"unknown conv_template {conv_template!r}; known: {', '.join(sorted(SYSTEM_PROMPTS))}")
        self.templates = resolve_templates(templates)
        self.clip_transform, self.sam_transform = clip_transform, sam_transform
        self.conv_template = conv_template
        self.samples_per_epoch, self.seed, self.max_retries = samples_per_epoch, seed, max_retries
        self.skip_log = SkipLog()

        k, t = num_classes_per_sample, self.templates
        refer_lists = {"refer_seg": refer_seg_data, "neg_refer_seg": neg_refer_seg_data,
                       "correct_refer_seg": correct_refer_seg_data}
        self.sources = []
        for name in self.names:
            if name in refer_lists:
                ds = split_names(refer_lists[name], f"{name}_data")
                bad = [d for d in ds if d not in REFER_DATASETS]
                if bad:
                    raise ValueError(f"{name}_data: unknown referring dataset(s) {bad}; "
                                     f"known: {', '.join(REFER_DATASETS)}")
                src = ReferSegSource(name, dataset_dir, ds, t, k)
                for data in src.data:
                    bad = data.bad_refs_of("train")
                    if bad:
                        log.warning("%s: %d unusable refs left out of training, e.g. ref %s: %s",
                                    data.refs_path, len(bad), bad[0].ref_id, bad[0].problem)
                        self.skip_log.merge({f"{data.dataset}/bad_ref": len(bad)})
            elif name == "vqa":
                src = VqaSource(name, dataset_dir, vqa_data)
            elif name == "reason_seg":
                src = ReasonSegSource(name, dataset_dir, reason_seg_data, t, k)
            else:
                src = SemSegSource(name, dataset_dir, split_names(sem_seg_data, "sem_seg_data"), t, k)
            self.sources.append(src)

    def __len__(self) -> int:
        return self.samples_per_epoch

    def _rng_and_source(self, idx: int) -> tuple[np.random.Generator, int]:
        rng = np.random.default_rng([self.seed, int(idx)])
        return rng, int(rng.choice(len(self.sources), p=self.rates))

    def source_of(self, idx: int) -> str:
        """The dataset name item `idx` is drawn from (without loading it)."""
        return self.names[self._rng_and_source(idx)[1]]

    def __getitem__(self, idx: int) -> Sample:
        if not 0 <= idx < self.samples_per_epoch:
            raise IndexError(idx)
        rng, s = self._rng_and_source(idx)
        source = self.sources[s]
        skipped: dict[str, int] = {}
        for _ in range(self.max_retries):
            try:
                raw = source.sample(rng)
                break
            except SkipItem as skip:
                count_skip(skipped, skip, self.skip_log)
        else:
            raise RuntimeError(f"{self.names[s]}: {self.max_retries} items in a row were unusable "
                               f"({self.skip_log.summary()}); is the data root intact?")
        sample = to_sample(raw, self.clip_transform, self.sam_transform, self.conv_template, skipped)
        sample.meta.setdefault("dataset", raw.source)
        sample.source = self.names[s]
        return sample

    def skipped_counts(self) -> dict[str, int]:
        """Items skipped so far in this process, per "<source>/<reason>" (DataLoader workers keep
        their own: sum `batch.meta["skipped"]` in the training loop for the whole picture)."""
        return self.skip_log.as_dict()
