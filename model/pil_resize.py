"""Pillow's 8-bit resampling (`Image.resize` with BILINEAR or BICUBIC), as tensor operations that
give the same bytes on any device.

Both encoders' inputs are made by Pillow resizes (SAM: bilinear to a longest side of 1024; CLIP:
bicubic to a shortest side of 336). Run in the evaluation's loader threads they cost ~15 ms of CPU
per image and, worse, hold the GIL the engine's thread needs to issue kernels; here they run on the
GPU, where the image already goes.

Pillow resizes in two separable passes (horizontal, then vertical, each skipped when that side keeps
its length). Each output pixel is a weighted sum of the input pixels under the filter; the weights
are computed in double precision, normalised to sum to one, and turned into integers with 22
fractional bits; the sums are integers, rounded by adding half and shifting, and clipped to 0..255
after each pass. Integer arithmetic is exact everywhere, so these tensors equal Pillow's output
exactly (tests/test_pil_resize.py compares them with the installed Pillow).
"""
from __future__ import annotations

import functools
import math
from typing import Optional

import numpy as np
import torch

PRECISION_BITS = 32 - 8 - 2  # Pillow's fixed-point weights for 8-bit images
_SUPPORT = {"bilinear": 1.0, "bicubic": 2.0}


def _filter(name: str, x: np.ndarray) -> np.ndarray:
    """Pillow's filter kernels, evaluated with its operation order (numpy float64, like C doubles)."""
    x = np.abs(x)
    if name == "bilinear":
        return np.where(x < 1.0, 1.0 - x, 0.0)
    a = -0.5  # Pillow's bicubic
    near = ((a + 2.0) * x - (a + 3.0)) * x * x + 1
    far = (((x - 5) * x + 8) * x - 4) * a
    return np.where(x < 1.0, near, np.where(x < 2.0, far, 0.0))


@functools.lru_cache(maxsize=256)
def weights(in_size: int, out_size: int, name: str) -> tuple[np.ndarray, np.ndarray]:
    """(first input index (out,), integer weights (out, taps)) of one pass, as Pillow's
    `precompute_coeffs` and `normalize_coeffs_8bpc` make them; weights past an output's last input
    are zero."""
    if name not in _SUPPORT:
        raise ValueError(f"unknown filter {name!r}; expected one of {sorted(_SUPPORT)}")
    scale = in_size / out_size
    filterscale = max(scale, 1.0)
    support = _SUPPORT[name] * filterscale
    taps = int(math.ceil(support)) * 2 + 1
    center = (np.arange(out_size) + 0.5) * scale
    # C's (int) truncates toward zero; a negative start is clamped to 0 either way
    first = np.maximum(np.trunc(center - support + 0.5), 0).astype(np.int64)
    last = np.minimum(np.trunc(center + support + 0.5), in_size).astype(np.int64)
    count = last - first
    j = np.arange(taps)
    live = j[None, :] < count[:, None]
    w = np.where(live, _filter(name, (j[None, :] + first[:, None] - center[:, None] + 0.5) * (1.0 / filterscale)), 0.0)
    total = np.zeros(out_size)
    for k in range(taps):  # summed in order, as the C loop sums them (numpy's sum is pairwise)
        total = total + w[:, k]
    w = np.where(total[:, None] != 0.0, w / np.where(total == 0.0, 1.0, total)[:, None], w)
    scaled = w * float(1 << PRECISION_BITS)
    fixed = np.trunc(np.where(w < 0, scaled - 0.5, scaled + 0.5)).astype(np.int64)
    return first, np.where(live, fixed, 0)


@functools.lru_cache(maxsize=256)
def _device_weights(in_size: int, out_size: int, name: str, device: torch.device):
    """(input index (out, taps), weights (out, taps) int32) on `device`, made once per geometry: a
    host-to-GPU copy from pageable memory would stall the stream at every image."""
    first, fixed = weights(in_size, out_size, name)
    index = np.minimum(first[:, None] + np.arange(fixed.shape[1])[None, :], in_size - 1)  # zero weights there
    index_t, fixed_t = torch.from_numpy(index), torch.from_numpy(fixed.astype(np.int32))
    if device.type == "cuda":
        index_t, fixed_t = index_t.pin_memory(), fixed_t.pin_memory()
    return index_t.to(device, non_blocking=True), fixed_t.to(device, non_blocking=True)


def _round_and_clip(sums: torch.Tensor) -> torch.Tensor:
    """Pillow's clip8: add half, drop the fraction bits, clip to 0..255."""
    return ((sums + (1 << (PRECISION_BITS - 1))) >> PRECISION_BITS).clamp_(0, 255).to(torch.uint8)


def _pass(image: torch.Tensor, axis: int, out_size: int, name: str, keep: slice) -> torch.Tensor:
    """One pass along axis 0 (rows) or 1 (columns) of a uint8 (H, W, C) image; `keep`: only these
    outputs (a crop of the resized image)."""
    index, fixed = _device_weights(image.shape[axis], out_size, name, image.device)
    index, fixed = index[keep], fixed[keep]
    # uint8 times int32 is int32 (no overflow: 255 x 2^22 x taps' absolute weights < 2^31); sums int64
    if axis == 1:  # (H, out, taps, C) weighted, summed over taps
        return _round_and_clip((image[:, index] * fixed[None, :, :, None]).sum(2))
    return _round_and_clip((image[index] * fixed[:, :, None, None]).sum(1))


def resize(image: torch.Tensor, size: tuple[int, int], name: str,
           crop: Optional[tuple[int, int, int, int]] = None) -> torch.Tensor:
    """uint8 (H, W, C) -> uint8 (h, w, C): what `PIL.Image.resize((w, h), BILINEAR or BICUBIC)`
    gives for the same pixels. crop (top, left, height, width): only that window of the resized image
    (the same bytes as cropping afterwards, without computing the rest)."""
    if image.dtype != torch.uint8 or image.dim() != 3:
        raise ValueError(f"resize takes a uint8 (H, W, C) image, got {tuple(image.shape)} {image.dtype}")
    h, w = size
    rows, cols = (slice(None), slice(None)) if crop is None else (slice(crop[0], crop[0] + crop[2]),
                                                                   slice(crop[1], crop[1] + crop[3]))
    # Pillow skips a pass whose side keeps its length (that pass would be the identity anyway)
    out = image[:, cols] if w == image.shape[1] else _pass(image, 1, w, name, cols)
    return out[rows] if h == image.shape[0] else _pass(out, 0, h, name, rows)
