"""What every data source produces, before and after image preprocessing.

A source returns a `RawSample` (one image, its conversations and ground-truth masks, as numpy);
`to_sample` runs the CLIP and SAM transforms and gives the `Sample` that `collate_fn` batches.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
import torch

from model.conversation import IMAGE_TOKEN, Conversation
from model.transforms import SamInput

from .image_io import SkipItem
from .templates import SEG

IGNORE_LABEL = 255


@dataclass(eq=False)
class RawSample:
    """One image and its conversations. masks[k] belongs to the k-th [SEG] counted over the answers
    of all conversations in order; each is (H, W) uint8 with 0/1 and 255 = ignore."""

    source: str
    image_path: str
    image: np.ndarray  # (H, W, 3) uint8 RGB
    questions: list[list[str]]  # per conversation, its user turns (one of them holds the <image>)
    answers: list[list[str]]  # per conversation, its assistant turns
    masks: list[np.ndarray]
    exists: list[bool]  # per conversation: does the object it asks about exist
    sentences: list[str]  # per conversation: the expression / class it is about ("" for VQA)
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        """Inconsistent text or masks make the item unusable: SkipItem (skipped and counted)."""
        def bad(reason: str):
            return SkipItem(self.source, self.image_path, "bad_sample", reason)

        n_conv = len(self.questions)
        if not (len(self.answers) == len(self.exists) == len(self.sentences) == n_conv) or n_conv == 0:
            raise bad(f"{n_conv} question lists, {len(self.answers)} answer lists, {len(self.exists)} exists, "
                      f"{len(self.sentences)} sentences")
        for qs, ans in zip(self.questions, self.answers):
            if len(qs) != len(ans) or not qs:
                raise bad("a conversation needs one answer per question")
            if sum(q.count(IMAGE_TOKEN) for q in qs) != 1:
                raise bad("a conversation needs exactly one <image>, in one of its questions")
            if any(SEG in q for q in qs) or any(IMAGE_TOKEN in a for a in ans):
                raise bad("[SEG] in a question or <image> in an answer")
        n_seg = sum(a.count(SEG) for turns in self.answers for a in turns)
        if n_seg != len(self.masks):
            raise bad(f"{n_seg} [SEG] in the answers but {len(self.masks)} masks")
        h, w = self.image.shape[:2]
        for m in self.masks:
            if m.shape != (h, w):
                raise bad(f"mask shape {m.shape} differs from image {(h, w)}")


@dataclass(eq=False)
class Sample:
    """One preprocessed image with its conversations: the unit `collate_fn` batches."""

    source: str
    image_path: str
    images_clip: torch.Tensor  # (3, s, s)
    sam: SamInput
    conversations: list[Conversation]
    masks: torch.Tensor  # (n, H, W) uint8, n = [SEG]s over the conversations, in order
    exists: list[bool]
    sentences: list[str]
    skipped: dict[str, int] = field(default_factory=dict)  # "<source>/<reason>" -> items skipped to produce this one
    meta: dict[str, Any] = field(default_factory=dict)


def to_sample(raw: RawSample, clip_transform: Callable[[np.ndarray], torch.Tensor],
              sam_transform: Callable[[np.ndarray], SamInput], conv_template: str = "llava_v1",
              skipped: dict[str, int] | None = None) -> Sample:
    h, w = raw.image.shape[:2]
    masks = (torch.from_numpy(np.stack(raw.masks)) if raw.masks else torch.zeros((0, h, w), dtype=torch.uint8))
    convs = [Conversation(list(q), list(a), conv_template) for q, a in zip(raw.questions, raw.answers)]
    return Sample(source=raw.source, image_path=raw.image_path, images_clip=clip_transform(raw.image),
                  sam=sam_transform(raw.image), conversations=convs, masks=masks.to(torch.uint8),
                  exists=list(raw.exists), sentences=list(raw.sentences), skipped=dict(skipped or {}),
                  meta=dict(raw.meta))


def choice(rng: np.random.Generator, items: Sequence):
    """One element of a sequence (numpy's choice would turn strings into numpy scalars)."""
    return items[int(rng.integers(len(items)))]


def sample_without_replacement(rng: np.random.Generator, items: Sequence, k: int) -> list:
    k = min(k, len(items))
    return [items[int(i)] for i in rng.choice(len(items), size=k, replace=False)]
