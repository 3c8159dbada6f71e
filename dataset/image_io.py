"""Reading images and label maps, and the bookkeeping for items that have to be skipped.

Two kinds of bad input are told apart:
- a missing file or folder that a dataset needs as a whole (an annotation file, an image folder) is
  an error at construction time, naming the path and the dataset (`require_path`);
- a single unreadable image or malformed annotation is skipped and counted (`SkipLog`), so a long
  run never dies on one broken file; the counts are reported at the end of an epoch or evaluation.
"""
from __future__ import annotations

import logging
import os
from collections import Counter
from typing import Iterable

import cv2
import numpy as np
from PIL import Image

log = logging.getLogger(__name__)


class DatasetFileError(FileNotFoundError):
    """A file or folder a dataset needs is missing."""


class SkipItem(Exception):
    """One item cannot be used (corrupt image, malformed annotation). Caught, counted, skipped."""

    def __init__(self, source: str, path: str, reason: str):
        super().__init__(f"{source}: skipping {path}: {reason}")
        self.source, self.path, self.reason = source, path, reason


def require_path(path: str, dataset: str, what: str = "file") -> str:
    """Return `path`, or raise an error naming it and the dataset that needs it."""
    if not os.path.exists(path):
        raise DatasetFileError(f"dataset {dataset!r}: missing {what} {path} "
                               f"(see dataset/README.md for the expected layout under --dataset_dir)")
    return path


def read_image_rgb(path: str, source: str) -> np.ndarray:
    """uint8 H x W x 3 RGB (OpenCV decode, as the original). Raises SkipItem if unreadable."""
    img = cv2.imread(path, cv2.IMREAD_COLOR)
    if img is None or img.size == 0:
        reason = "file not found" if not os.path.exists(path) else "cannot decode image"
        raise SkipItem(source, path, reason)
    return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)


def image_size(path: str, source: str) -> tuple[int, int]:
    """(H, W) from the file header without decoding the pixels."""
    try:
        with Image.open(path) as im:
            w, h = im.size
    except (OSError, ValueError) as e:
        raise SkipItem(source, path, f"cannot read image header ({e})") from e
    return h, w


def read_label_map(path: str, source: str) -> np.ndarray:
    """A single-channel label PNG as its raw integer values (palette indices for P-mode files)."""
    try:
        with Image.open(path) as im:
            label = np.array(im)
    except (OSError, ValueError) as e:
        raise SkipItem(source, path, f"cannot read label map ({e})") from e
    if label.ndim != 2:
        raise SkipItem(source, path, f"label map must be single-channel, got shape {label.shape}")
    return label


class SkipLog:
    """Counts skipped items per source, warning once per path. Per process: a DataLoader worker
    keeps its own, which is why samples also carry the skips that happened while making them."""

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()
        self._warned: set[str] = set()

    def record(self, skip: SkipItem) -> None:
        self.counts[skip.source] += 1
        if skip.path not in self._warned:
            self._warned.add(skip.path)
            log.warning("%s", skip)

    def merge(self, counts: Iterable[tuple[str, int]] | dict[str, int]) -> None:
        items = counts.items() if isinstance(counts, dict) else counts
        for k, v in items:
            self.counts[k] += v

    def as_dict(self) -> dict[str, int]:
        return dict(self.counts)

    def summary(self) -> str:
        if not self.counts:
            return "no items skipped"
        return "skipped items: " + ", ".join(f"{k}={v}" for k, v in sorted(self.counts.items()))
