"""Pictures of READ's Similarity-as-Points for one query, one PNG per [SEG].

Left: the [SEG] / image-token similarity map over the image as a JET heat map, blended 0.3 image +
0.7 map as READ's analysis dashboard does, with the chosen points. Right: the predicted mask over
the image, with the same points. Below: a legend with the point counts.
Points: positive (label 1) green, negative (label 0) red, neutral (label -1) white; fill entries
(`valid = False`) are not drawn. Small images are enlarged (nearest neighbour) so points stay visible.
"""
from __future__ import annotations

import os
from typing import Optional, Protocol

import cv2
import numpy as np
import torch
from PIL import Image


class SasPPicture(Protocol):
    """What the pictures read of a SasP result (`model.sasp.SasPResult`; utils/ imports nothing above it)."""

    original_size: tuple[int, int]
    scores: torch.Tensor  # (n_seg, P) similarities: one row per [SEG]
    points: torch.Tensor  # (n_seg, k, 2) x, y in original pixels
    labels: torch.Tensor  # (n_seg, k): 1 positive, 0 negative, -1 neutral
    valid: torch.Tensor  # (n_seg, k): False for fill entries

    def full_map(self) -> torch.Tensor: ...

HEATMAP_IMAGE_WEIGHT = 0.3
POINT_COLOURS = {1: (0, 220, 0), 0: (230, 0, 0), -1: (255, 255, 255)}  # RGB
POINT_NAMES = {1: "positive", 0: "negative", -1: "neutral"}
MASK_COLOUR = (30, 144, 255)  # RGB; blue, so the red negative points stay visible
MASK_IMAGE_WEIGHT = 0.5
MIN_DISPLAY_SIDE = 256
PANEL_GAP = 4
LEGEND_HEIGHT = 22


def heatmap_overlay(image_rgb: np.ndarray, map01: np.ndarray, image_weight: float = HEATMAP_IMAGE_WEIGHT) -> np.ndarray:
    """(H, W, 3) uint8 image and (H, W) map in [0, 1] -> uint8 blend of the image and the JET map."""
    if map01.shape != image_rgb.shape[:2]:
        raise ValueError(f"map shape {map01.shape} does not match image shape {image_rgb.shape[:2]}")
    levels = np.clip(np.rint(map01 * 255.0), 0, 255).astype(np.uint8)
    jet = cv2.cvtColor(cv2.applyColorMap(levels, cv2.COLORMAP_JET), cv2.COLOR_BGR2RGB)
    blend = image_weight * image_rgb.astype(np.float32) + (1.0 - image_weight) * jet.astype(np.float32)
    return np.clip(np.rint(blend), 0, 255).astype(np.uint8)


def mask_overlay(image_rgb: np.ndarray, mask: np.ndarray) -> np.ndarray:
    if mask.shape != image_rgb.shape[:2]:
        raise ValueError(f"mask shape {mask.shape} does not match image shape {image_rgb.shape[:2]}")
    out = image_rgb.astype(np.float32)
    m = mask.astype(bool)
    out[m] = MASK_IMAGE_WEIGHT * out[m] + (1.0 - MASK_IMAGE_WEIGHT) * np.asarray(MASK_COLOUR, np.float32)
    return np.rint(out).astype(np.uint8)


def display_scale(height: int, width: int) -> int:
    """Integer enlargement that brings the longer side to at least MIN_DISPLAY_SIDE pixels."""
    return max(1, -(-MIN_DISPLAY_SIDE // max(height, width)))


def point_radius(canvas_shape: tuple[int, ...]) -> int:
    return max(3, round(0.012 * max(canvas_shape[:2])))


def draw_points(canvas: np.ndarray, points: np.ndarray, labels: np.ndarray, valid: np.ndarray,
                scale: int) -> np.ndarray:
    """Draw (K, 2) original-pixel (x, y) points on a canvas `scale` times the original size.
    Neutral first, positives last, so positives are never hidden."""
    out = np.ascontiguousarray(canvas.copy())
    radius = point_radius(out.shape)
    for label in (-1, 0, 1):
        for (x, y) in points[valid & (labels == label)]:
            centre = (int(round((x + 0.5) * scale - 0.5)), int(round((y + 0.5) * scale - 0.5)))
            cv2.circle(out, centre, radius + 1, (0, 0, 0), thickness=-1, lineType=cv2.LINE_AA)
            cv2.circle(out, centre, radius, POINT_COLOURS[label], thickness=-1, lineType=cv2.LINE_AA)
    return out


def _legend(width: int, labels: np.ndarray, valid: np.ndarray) -> np.ndarray:
    strip = np.full((LEGEND_HEIGHT, width, 3), 255, np.uint8)
    x = 8
    for label in (1, 0, -1):
        count = int((valid & (labels == label)).sum())
        cv2.circle(strip, (x, LEGEND_HEIGHT // 2), 5, (0, 0, 0), -1, cv2.LINE_AA)
        cv2.circle(strip, (x, LEGEND_HEIGHT // 2), 4, POINT_COLOURS[label], -1, cv2.LINE_AA)
        text = f"{POINT_NAMES[label]} {count}"
        cv2.putText(strip, text, (x + 9, LEGEND_HEIGHT // 2 + 4), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (0, 0, 0), 1,
                    cv2.LINE_AA)
        x += 18 + cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, 0.4, 1)[0][0]
    return strip


def render_sasp(image_rgb: np.ndarray, result: SasPPicture, seg_index: int = 0,
                mask: Optional[np.ndarray] = None) -> np.ndarray:
    """The picture for [SEG] number `seg_index`: heat map + points | mask + points, legend below."""
    height, width = image_rgb.shape[:2]
    if image_rgb.ndim != 3 or image_rgb.shape[2] != 3 or image_rgb.dtype != np.uint8:
        raise ValueError(f"image must be (H, W, 3) uint8 RGB, got {image_rgb.shape} {image_rgb.dtype}")
    if (height, width) != tuple(result.original_size):
        raise ValueError(f"image is {height}x{width} but the SasP result is for {result.original_size}")
    n = result.scores.shape[0]
    if not 0 <= seg_index < n:
        raise ValueError(f"seg_index {seg_index} out of range: the SasP result holds {n} [SEG]s")
    map01 = result.full_map()[seg_index].detach().float().cpu().numpy()
    mask = np.zeros((height, width), bool) if mask is None else np.asarray(mask)
    points = result.points[seg_index].detach().float().cpu().numpy()
    labels = result.labels[seg_index].cpu().numpy()
    valid = result.valid[seg_index].cpu().numpy()

    s = display_scale(height, width)
    panels = []
    for panel in (heatmap_overlay(image_rgb, map01), mask_overlay(image_rgb, mask)):
        big = cv2.resize(panel, (width * s, height * s), interpolation=cv2.INTER_NEAREST) if s > 1 else panel
        panels.append(draw_points(big, points, labels, valid, s))
    gap = np.full((height * s, PANEL_GAP, 3), 255, np.uint8)
    row = np.concatenate([panels[0], gap, panels[1]], axis=1)
    return np.concatenate([row, _legend(row.shape[1], labels, valid)], axis=0)


def save_sasp_pngs(directory: str, image_rgb: np.ndarray, result: SasPPicture, masks: Optional[np.ndarray] = None,
                   stem: str = "sasp") -> list[str]:
    """Write one PNG per [SEG] into an existing `directory`: `{stem}.png` for the first, then
    `{stem}_1.png`, ... (the numbering of the demo's seg_mask*.png). masks: (n, H, W) bool or None."""
    if not os.path.isdir(directory):
        raise ValueError(f"output directory {directory!r} does not exist")
    n = result.scores.shape[0]
    if masks is not None and (np.ndim(masks) != 3 or len(masks) != n):
        raise ValueError(f"masks must be (n={n}, H, W), one per [SEG], got shape {np.shape(masks)}")
    paths = []
    for k in range(n):
        path = os.path.join(directory, f"{stem}.png" if k == 0 else f"{stem}_{k}.png")
        Image.fromarray(render_sasp(image_rgb, result, k, None if masks is None else np.asarray(masks[k]))).save(path)
        paths.append(path)
    return paths
