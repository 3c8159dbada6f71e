"""Image preprocessing for the two encoders, exactly as the original feeds them.

CLIP: shortest side to the crop size (bicubic), centre crop, CLIP mean/std (transformers'
PIL-backed CLIP processor, which matches the processor the original used to float precision).
SAM: longest side to 1024 (bilinear, new side int(old*scale+0.5)), ImageNet mean/std on the
0-255 scale, zero padding bottom/right to a square.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from segment_anything.utils.transforms import ResizeLongestSide

from . import pil_resize

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


def _setting(settings, key: str):
    """A key of a transformers size dict (a dict, or a SizeDict with attributes)."""
    if settings is None:
        return None
    return settings.get(key) if isinstance(settings, dict) else getattr(settings, key, None)


@dataclass(frozen=True)
class ClipSteps:
    """What the CLIP processor does, as `ClipTransform.on_tensor` repeats it: shortest side to
    `shortest_edge` (Pillow `filter`), centre `crop` (h, w), x * `rescale` in float64 then float32,
    (x - mean) / std in float32."""

    shortest_edge: int
    filter: str
    crop: Optional[tuple[int, int]]
    rescale: Optional[float]
    mean: Optional[tuple[float, ...]]
    std: Optional[tuple[float, ...]]

    @staticmethod
    def of(processor) -> Optional["ClipSteps"]:
        """The steps of a transformers CLIP image processor, or None when its settings are ones that
        `on_tensor` does not make (then the processor itself runs)."""
        size, crop = getattr(processor, "size", None), getattr(processor, "crop_size", None)
        shortest = _setting(size, "shortest_edge")
        filters = {2: "bilinear", 3: "bicubic"}
        if (not getattr(processor, "do_resize", False) or shortest is None or _setting(size, "longest_edge")
                or _setting(size, "height") or int(getattr(processor, "resample", -1)) not in filters
                or getattr(processor, "do_pad", None)):
            return None
        do_crop = getattr(processor, "do_center_crop", False)
        if do_crop and (_setting(crop, "height") is None or _setting(crop, "width") is None):
            return None
        normalize = getattr(processor, "do_normalize", False)
        return ClipSteps(int(shortest), filters[int(processor.resample)],
                         (int(_setting(crop, "height")), int(_setting(crop, "width"))) if do_crop else None,
                         float(processor.rescale_factor) if getattr(processor, "do_rescale", False) else None,
                         tuple(processor.image_mean) if normalize else None,
                         tuple(processor.image_std) if normalize else None)

    def resized_size(self, height: int, width: int) -> tuple[int, int]:
        """transformers' output size for a shortest side (the long side truncated, not rounded)."""
        short, long = (width, height) if width <= height else (height, width)
        new_long = int(self.shortest_edge * long / short)
        return (new_long, self.shortest_edge) if width <= height else (self.shortest_edge, new_long)


@functools.lru_cache(maxsize=None)
def _channel_constants(values: tuple[float, ...], device: torch.device) -> torch.Tensor:
    """(C, 1, 1) float32 constants (a mean or std) on `device`, made once per device: building them
    from Python lists on a GPU is a blocking copy, which would stall the engine at every image."""
    return torch.tensor(values, dtype=torch.float32, device=device).view(-1, 1, 1)


class ClipTransform:
    def __init__(self, image_size: int, name_or_path: str | None = None):
        self.processor = build_clip_processor(image_size, name_or_path)
        self.steps = ClipSteps.of(self.processor)

    def __call__(self, image_rgb: np.ndarray) -> torch.Tensor:
        """uint8 HxWx3 RGB -> float32 3xSxS."""
        # channels last, said explicitly: left to guess, transformers takes a 3-pixel-high image
        # (3, W, 3) or a (1, 3, 3) one for channels-first and mixes up its pixels
        out = self.processor(images=image_rgb, return_tensors="pt", input_data_format="channels_last")
        return out["pixel_values"][0]

    def on_tensor(self, rgb: torch.Tensor) -> torch.Tensor:
        """The same float32 (3, s, s) as __call__, from a uint8 (H, W, 3) tensor, computed where the
        tensor is (model/pil_resize.py's resize; the same float operations in the same order)."""
        steps = self.steps
        if steps is None:  # processor settings not made here
            return self(rgb.cpu().numpy()).to(rgb.device)
        h, w = steps.resized_size(*rgb.shape[:2])
        crop = None
        if steps.crop is not None:
            crop = ((h - steps.crop[0]) // 2, (w - steps.crop[1]) // 2, *steps.crop)
            if min(crop[:2]) < 0:  # a crop larger than the image: the processor pads, not made here
                return self(rgb.cpu().numpy()).to(rgb.device)
        x = pil_resize.resize(rgb, (h, w), steps.filter, crop=crop).permute(2, 0, 1)
        if steps.rescale is not None:
            x = (x.double() * steps.rescale).float()  # transformers rescales in float64
        if steps.mean is not None:
            x = (x.float() - _channel_constants(steps.mean, x.device)) / _channel_constants(steps.std, x.device)
        return x.float().contiguous()


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

    def resized_size(self, height: int, width: int) -> tuple[int, int]:
        return tuple(self.resizer.get_preprocess_shape(height, width, self.image_size))

    def resized_tensor(self, rgb: torch.Tensor) -> SamInput:
        """What `resized` gives (segment_anything resizes with Pillow, bilinear), from a uint8 (H, W, 3)
        tensor, computed where the tensor is (model/pil_resize.py)."""
        size = self.resized_size(*rgb.shape[:2])
        return SamInput(pil_resize.resize(rgb, size, "bilinear"), size, (int(rgb.shape[0]), int(rgb.shape[1])))


def normalize_and_pad(resized: torch.Tensor, image_size: int) -> torch.Tensor:
    """uint8 (h, w, 3) resized image, on any device -> float32 (3, S, S): SAM's mean/std on the
    0-255 scale, zeros to the bottom and right. The same float operations wherever it runs."""
    h, w = resized.shape[:2]
    mean, std = _channel_constants(SAM_PIXEL_MEAN, resized.device), _channel_constants(SAM_PIXEL_STD, resized.device)
    x = (resized.permute(2, 0, 1).float() - mean) / std
    return F.pad(x, (0, image_size - w, 0, image_size - h))
