"""What the collate function hands the model: the contract between `dataset/` and `model/`."""
from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

import torch


@dataclass
class SesameBatch:
    """A training / teacher-forced micro-batch. N images, B conversations (B >= N).

    images_clip:    (N, 3, s, s) CLIP pixels, one per image (not repeated per conversation).
    images_sam:     (N, 3, S, S) SAM pixels, normalised and padded.
    input_ids:      (B, L) token ids with one IMAGE_TOKEN_INDEX per row, right padded.
    labels:         (B, L) ids to predict, IGNORE_INDEX elsewhere.
    attention_mask: (B, L) bool.
    offset:         (N + 1,) conversations of image i are rows offset[i]:offset[i+1].
    masks:          N tensors (n_i, H_i, W_i) uint8 ground truth, 255 = ignore; n_i = [SEG]s of image i.
    resized_sizes:  N (h, w) SAM input sizes before padding.
    original_sizes: N (H, W) image sizes.
    meta:           anything the loader wants to carry along (paths, sentences); not used by the model.
    """

    images_clip: torch.Tensor
    images_sam: torch.Tensor
    input_ids: torch.Tensor
    labels: torch.Tensor
    attention_mask: torch.Tensor
    offset: torch.Tensor
    masks: list[torch.Tensor]
    resized_sizes: list[tuple[int, int]]
    original_sizes: list[tuple[int, int]]
    meta: dict[str, Any] = field(default_factory=dict)

    def to(self, device, dtype: torch.dtype | None = None) -> "SesameBatch":
        """Move tensors to `device`; images (only) are cast to `dtype`."""
        moved = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, torch.Tensor):
                is_image = f.name.startswith("images_")
                v = v.to(device=device, dtype=dtype if (is_image and dtype is not None) else v.dtype)
            elif f.name == "masks":
                v = [m.to(device) for m in v]
            moved[f.name] = v
        return SesameBatch(**moved)
