"""Reading images and label maps, and the bookkeeping for items that have to be skipped.

Three kinds of bad input are told apart:
- a missing file or folder that a dataset needs as a whole (an annotation file, an image folder) is
  an error at construction time, naming the path and the dataset (`require_path`, DatasetFileError);
- a malformed annotation file (invalid JSON, an image entry without `height`, ...) is an error at
  construction time naming the file and the field (`DataError`);
- a single unreadable image or malformed annotation is, in training, skipped and counted per
  source and reason (`SkipItem`, `SkipLog`), so a long run never dies on one broken file. Evaluation
  sets decide differently (dataset/eval_sets.py: stop, or skip with an explicit option).

Every image goes through the one size guard (utils.image_io.read_image_header): a file whose
header claims more than utils.image_io.MAX_IMAGE_PIXELS pixels is refused before it is decoded.

Skip reasons (the `reason` of a SkipItem, counted as "<source>/<reason>"):
  image:      not_found, not_a_file, not_readable, empty, not_an_image, too_large, cannot_decode,
              size_mismatch (the image is not the size its annotation says)
  annotation: bad_annotation (a segmentation / shape / json that cannot be read), annotation_missing
              (an image without its ReasonSeg json), unknown_annotation (a ref names an annotation
              id the file lacks), bad_ref (a ref without the keys it needs), bad_record (a malformed
              LLaVA record), no_class (a label map without any class)
  sample:     bad_sample (text and masks that do not agree)
"""
from __future__ import annotations

import logging
import os
from collections import Counter
from typing import Iterable, Optional

import cv2
import numpy as np

from utils.errors import InputError
from utils.image_io import ImageHeader, ImageLoadError, open_image, read_image_header

log = logging.getLogger(__name__)


class DatasetFileError(FileNotFoundError):
    """A file or folder a dataset needs is missing."""


class DataError(InputError, ValueError):
    """A dataset file or item is malformed; the message is one line naming the file and the field
    or id at fault."""


class SkipItem(Exception):
    """One item cannot be used (corrupt image, malformed annotation). Caught, counted, skipped.

    reason: a short code from the module docstring (what is counted); detail: what exactly."""

    def __init__(self, source: str, path: str, reason: str, detail: str = ""):
        super().__init__(f"{source}: skipping {path}: {detail or reason}")
        self.source, self.path, self.reason, self.detail = source, path, reason, detail

    def __reduce__(self):
        return type(self), (self.source, self.path, self.reason, self.detail)

    @property
    def key(self) -> str:
        """What skips are counted under: "<source>/<reason>"."""
        return f"{self.source}/{self.reason}"


def require_path(path: str, dataset: str, what: str = "file") -> str:
    """Return `path`, or raise an error naming it and the dataset that needs it."""
    if not os.path.exists(path):
        raise DatasetFileError(f"dataset {dataset!r}: missing {what} {path} "
                               f"(see dataset/README.md for the expected layout under --dataset_dir)")
    return path


def image_header(path: str, source: str) -> ImageHeader:
    """The file's header (size, orientation), checked by the one size guard. Raises SkipItem."""
    try:
        return read_image_header(path)
    except ImageLoadError as e:
        raise SkipItem(source, path, e.reason, e.problem) from None


def read_image_rgb(path: str, source: str) -> np.ndarray:
    """uint8 H x W x 3 RGB (OpenCV decode, as the original; EXIF orientation applied). The header
    is checked first, so a file claiming a huge size is never decoded. Raises SkipItem."""
    image_header(path, source)
    try:
        img = cv2.imread(path, cv2.IMREAD_COLOR)
    except cv2.error as e:  # OpenCV refuses some inputs by raising instead of returning None
        raise SkipItem(source, path, "cannot_decode", f"cannot decode image ({' '.join(str(e).split())})") from None
    if img is None or img.size == 0:
        raise SkipItem(source, path, "cannot_decode", "cannot decode image (corrupt or truncated)")
    return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)


def image_size(path: str, source: str) -> tuple[int, int]:
    """(H, W) as decoded (EXIF orientation applied), from the file header without decoding pixels."""
    return image_header(path, source).size


def read_label_map(path: str, source: str) -> np.ndarray:
    """A single-channel label PNG as its raw integer values (palette indices for P-mode files)."""
    try:
        with open_image(path) as im:
            label = np.array(im)
    except ImageLoadError as e:
        raise SkipItem(source, path, e.reason, f"label map: {e.problem}") from None
    except (OSError, ValueError, SyntaxError, EOFError) as e:
        raise SkipItem(source, path, "cannot_decode", f"cannot read label map ({e})") from None
    if label.ndim != 2:
        raise SkipItem(source, path, "bad_annotation", f"label map must be single-channel, got shape {label.shape}")
    return label


class SkipLog:
    """Counts skipped items per "<source>/<reason>", warning once per path. Per process: a DataLoader
    worker keeps its own, which is why samples also carry the skips that happened while making them."""

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()
        self._warned: set[str] = set()

    def record(self, skip: SkipItem) -> None:
        self.counts[skip.key] += 1
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


def count_skip(counts: dict[str, int], skip: SkipItem, log_to: Optional[SkipLog] = None) -> None:
    """Add one skip to a sample's `skipped` counts (and to a SkipLog)."""
    counts[skip.key] = counts.get(skip.key, 0) + 1
    if log_to is not None:
        log_to.record(skip)
