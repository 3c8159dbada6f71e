"""Evaluation sets: one item per image with all its queries. OWNER: dataset issue (#4).
Interface stub until that lands; the evaluation (#6) consumes exactly these types."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import numpy as np


@dataclass
class EvalQuery:
    ref_id: int
    sent_id: int
    sentence: str  # the referring expression / ReasonSeg text as in the annotation
    question: str  # the full user turn, "<image>\n..." (templated, deterministic given the seed)
    gt_exists: bool
    gt_sent: Optional[str]  # FP-RefCOCO: the true expression to suggest; else None
    gt_mask: np.ndarray  # (H, W) uint8; all zero for false premises; 255 = ignore
    extra: dict = field(default_factory=dict)  # e.g. ReasonSeg is_sentence


@dataclass
class EvalImage:
    image_path: str
    image_id: int
    height: int
    width: int
    queries: list[EvalQuery]


def build_eval_dataset(name: str, dataset_dir: str, split: str = "val", seed: int = 0, **kwargs) -> list[EvalImage]:
    raise NotImplementedError("evaluation datasets are not implemented yet (issue #4)")
