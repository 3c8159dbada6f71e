"""Mask metrics with the original's definitions: per-mask intersection and union, LISA's gIoU rule.

Per mask (foreground class, pixels whose ground truth is 255 left out of both counts):
    I = |pred AND gt|,  U = |pred OR gt|
cIoU = sum(I) / sum(U) over a set; gIoU = the mean of I / (U + 1e-5), an empty union counting 1.
The evaluation's See / Segment / Say metrics over records are in evaluation/metrics.py.
"""
from __future__ import annotations

import numpy as np

IGNORE_LABEL = 255
CIOU_EPS = 1e-10
GIOU_EPS = 1e-5


def intersection_union(pred: np.ndarray, gt: np.ndarray, ignore_label: int = IGNORE_LABEL) -> tuple[int, int]:
    """Foreground intersection and union. pred: (H, W) bool/0-1; gt: (H, W) 0/1 with `ignore_label`."""
    pred, gt = np.asarray(pred), np.asarray(gt)
    if pred.shape != gt.shape:
        raise ValueError(f"prediction shape {pred.shape} differs from ground truth shape {gt.shape}")
    valid = gt != ignore_label
    p = (pred != 0) & valid
    g = (gt == 1) & valid
    return int((p & g).sum()), int((p | g).sum())


def mask_giou(intersection: float, union: float) -> float:
    """One mask's IoU for gIoU, LISA's rule: I / (U + 1e-5), and 1 when prediction and ground truth
    are both empty (union 0)."""
    return 1.0 if union == 0 else intersection / (union + GIOU_EPS)
