"""SESAME's mask losses, with the original's definitions and normalisation.

Both are summed over masks here; the caller divides by the number of ground-truth masks in the
micro-batch, so each is a mean over all masks (samples without masks add nothing).

`valid` marks pixels that count. The original fed ignore-labelled pixels (255, ReasonSeg) into the
losses as targets of 255; here they are left out instead. Without ignore pixels both are identical.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

DICE_SCALE = 1000.0
DICE_EPS = 1e-6


def dice_loss_sum(logits: torch.Tensor, targets: torch.Tensor, valid: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Sum over masks of 1 - (2*sum(p*g) + eps) / (sum(p) + sum(g/s) + eps) with p = sigmoid(logits)/s,
    s = DICE_SCALE, sums over pixels (the original's scaling)."""
    g = targets.float().flatten(1)
    p = logits.float().sigmoid().flatten(1) / DICE_SCALE
    if valid is not None:
        v = valid.flatten(1).float()
        p, g = p * v, g * v
    inter = 2 * (p * g).sum(-1)
    denom = p.sum(-1) + (g / DICE_SCALE).sum(-1)
    return (1 - (inter + DICE_EPS) / (denom + DICE_EPS)).sum()


def bce_loss_sum(logits: torch.Tensor, targets: torch.Tensor, valid: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Sum over masks of the per-pixel mean binary cross-entropy with logits."""
    per_pixel = F.binary_cross_entropy_with_logits(logits.float(), targets.float(), reduction="none").flatten(1)
    if valid is None:
        return per_pixel.mean(-1).sum()
    v = valid.flatten(1).float()
    return ((per_pixel * v).sum(-1) / v.sum(-1).clamp(min=1)).sum()
