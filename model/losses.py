"""SESAME's mask losses, with the original's definitions and normalisation.

Both are summed over masks here; the caller divides by the number of ground-truth masks in the
micro-batch, so each is a mean over all masks (samples without masks add nothing).

`valid` marks pixels that count. The original fed ignore-labelled pixels (255, ReasonSeg) into the
losses as targets of 255; here they are left out instead. Without ignore pixels both are identical.
"""
from __future__ import annotations

from typing import Optional, Sequence

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


def padded_stack(masks: Sequence[torch.Tensor], value: float) -> torch.Tensor:
    """(k_i, H_i, W_i) tensors -> (sum k_i, max H, max W), padded at the bottom and right with `value`."""
    h = max(m.shape[-2] for m in masks)
    w = max(m.shape[-1] for m in masks)
    return torch.cat([m if m.shape[-2:] == (h, w) else F.pad(m, (0, w - m.shape[-1], 0, h - m.shape[-2]), value=value)
                      for m in masks])


def mask_loss_sums(logits: Sequence[torch.Tensor], gts: Sequence[torch.Tensor],
                   ignore_label: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(bce sum, dice sum, number of masks) over the masks of several images of different sizes.

    logits[i] / gts[i]: (k_i, H_i, W_i) logits and labels (1 object, 0 background, `ignore_label`
    ignored) of image i. One padded batch instead of a loss per image: the padding is labelled
    ignored, so each mask's sums are over its own valid pixels, as per image (rounding aside). A
    training step then costs a fixed number of operations for the losses, whatever the images.
    """
    x = padded_stack([t.float() for t in logits], 0.0)
    g = padded_stack(gts, ignore_label)
    valid = g != ignore_label
    target = g == 1
    return bce_loss_sum(x, target, valid), dice_loss_sum(x, target, valid), x.shape[0]
