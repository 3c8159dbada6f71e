"""Image preprocessing for the two encoders, exactly as the original feeds them.

CLIP: shortest side to the crop size (bicubic), centre crop, CLIP mean/std (transformers'
PIL-backed CLIP processor, which matches the processor the original used to float precision).
SAM: longest side to 1024 (bilinear, new side int(old*scale+0.5)), ImageNet mean/std on the
0-255 scale, zero padding bottom/right to a square.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from segment_anything.utils.transforms import ResizeLongestSide

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
SAM_PIXEL_MEAN = (123.675, 116.28, 103.53)
SAM_PIXEL_STD = (58.395, 57.12, 57.375)


def build_clip_processor(image_size: int, name_or_path: str | None = None):
    """The CLIP image processor: from the tower's preprocessor_config.json when available,
    else built from the geometry (the values every CLIP-L release uses)."""
    from transformers import CLIPImageProcessorPil

    if name_or_path:
        try:
            return CLIPImageProcessorPil.from_pretrained(name_or_path)
        except (OSError, ValueError):
            pass
    return CLIPImageProcessorPil(size={"shortest_edge": image_size},
                                 crop_size={"height": image_size, "width": image_size},
                                 resample=3, do_center_crop=True, image_mean=list(CLIP_MEAN),
                                 image_std=list(CLIP_STD))


class ClipTransform:
    def __init__(self, image_size: int, name_or_path: str | None = None):
        self.processor = build_clip_processor(image_size, name_or_path)

    def __call__(self, image_rgb: np.ndarray) -> torch.Tensor:
        """uint8 HxWx3 RGB -> float32 3xSxS."""
        # channels last, said explicitly: left to guess, transformers takes a 3-pixel-high image
        # (3, W, 3) or a (1, 3, 3) one for channels-first and mixes up its pixels
        out = self.processor(images=image_rgb, return_tensors="pt", input_data_format="channels_last")
        return out["pixel_values"][0]


@dataclass(frozen=True)
class SamInput:
    pixels: torch.Tensor  # float32 3 x S x S, normalised and zero padded
    resized_size: tuple[int, int]  # (h, w) before padding
    original_size: tuple[int, int]  # (H, W) of the input image


class SamTransform:
    def __init__(self, image_size: int = 1024):
        self.image_size = image_size
        self.resizer = ResizeLongestSide(image_size)

    def __call__(self, image_rgb: np.ndarray) -> SamInput:
        resized = self.resized(image_rgb)
        return SamInput(normalize_and_pad(resized.pixels, self.image_size), resized.resized_size,
                        resized.original_size)

    def resized(self, image_rgb: np.ndarray) -> SamInput:
        """The first half of __call__: pixels are the resized image, uint8 (h, w, 3), not yet
        normalised or padded. The evaluation engine finishes them on the GPU with
        `normalize_and_pad` (a quarter of the bytes to copy there, less work for the loader)."""
        resized = self.resizer.apply_image(image_rgb)
        h, w = resized.shape[:2]
        return SamInput(torch.from_numpy(np.ascontiguousarray(resized)), (h, w),
                        (int(image_rgb.shape[0]), int(image_rgb.shape[1])))


@functools.lru_cache(maxsize=None)
def _sam_mean_std(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(3, 1, 1) float32 mean and std on `device`, made once per device: building them from Python
    lists on a GPU is a blocking copy, which would stall the engine at every image."""
    return (torch.tensor(SAM_PIXEL_MEAN, device=device).view(3, 1, 1),
            torch.tensor(SAM_PIXEL_STD, device=device).view(3, 1, 1))


def normalize_and_pad(resized: torch.Tensor, image_size: int) -> torch.Tensor:
    """uint8 (h, w, 3) resized image, on any device -> float32 (3, S, S): SAM's mean/std on the
    0-255 scale, zeros to the bottom and right. The same float operations wherever it runs."""
    h, w = resized.shape[:2]
    mean, std = _sam_mean_std(resized.device)
    x = (resized.permute(2, 0, 1).float() - mean) / std
    return F.pad(x, (0, image_size - w, 0, image_size - h))
