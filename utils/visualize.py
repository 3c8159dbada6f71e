"""Write what a query produced: the binary mask, a colour overlay and the answer text.

The overlay follows the original demo: on mask pixels, 0.3 * image + 0.7 * colour (red), elsewhere
the image unchanged. Each query gets its own new folder, so runs never overwrite each other.
"""
from __future__ import annotations

import os
import re
import urllib.parse
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
from PIL import Image

OVERLAY_COLOR = (255, 0, 0)  # RGB red, as the original's BGR (0, 0, 255)
OVERLAY_IMAGE_WEIGHT = 0.3
MAX_SLUG_CHARS = 40


@dataclass
class QueryFiles:
    directory: str
    mask: str  # seg_mask.png: the first [SEG]'s mask (the one See is decided on), 0 / 255
    overlay: str  # seg_overlay.jpg
    answer: str  # answer.txt
    extra_masks: list[str] = field(default_factory=list)  # seg_mask_1.png, ... for further [SEG]s


def overlay_mask(image_rgb: np.ndarray, mask: np.ndarray, color: tuple[int, int, int] = OVERLAY_COLOR) -> np.ndarray:
    """(H, W, 3) uint8 and (H, W) bool -> (H, W, 3) uint8 with mask pixels tinted towards `color`."""
    if mask.shape != image_rgb.shape[:2]:
        raise ValueError(f"mask shape {mask.shape} does not match image shape {image_rgb.shape[:2]}")
    out = image_rgb.copy()
    mask = mask.astype(bool)
    tinted = image_rgb[mask].astype(np.float32) * OVERLAY_IMAGE_WEIGHT \
        + np.asarray(color, np.float32) * (1.0 - OVERLAY_IMAGE_WEIGHT)
    out[mask] = tinted.astype(np.uint8)  # truncation, as the original's uint8 assignment
    return out


def save_mask_png(path: str, mask: np.ndarray) -> None:
    """Binary mask as an 8-bit PNG, 255 on the object and 0 elsewhere (lossless, visible)."""
    Image.fromarray(np.where(mask.astype(bool), 255, 0).astype(np.uint8), mode="L").save(path)


def slugify(text: str, max_chars: int = MAX_SLUG_CHARS) -> str:
    """'Is there a red square?' -> 'is-there-a-red-square'; never empty."""
    slug = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:max_chars].strip("-")
    return slug or "query"


def image_folder_name(source: str) -> str:
    """A filesystem-safe name for an image path or URL: its file stem."""
    if source.lower().startswith(("http://", "https://")):
        source = urllib.parse.urlparse(source).path
    stem = os.path.splitext(os.path.basename(source.rstrip("/\\")))[0]
    return re.sub(r"[^A-Za-z0-9._-]+", "_", stem).strip("._") or "image"


def new_query_dir(root: str, image_source: str, question: str) -> str:
    """Create and return `{root}/{image stem}/{NNN}_{question slug}` with the next free NNN.

    The folder is created with os.mkdir, so two runs racing for the same index cannot both get it.
    """
    parent = os.path.join(root, image_folder_name(image_source))
    os.makedirs(parent, exist_ok=True)
    used = [int(m.group(1)) for name in os.listdir(parent) if (m := re.match(r"(\d+)_", name))]
    index = max(used, default=-1) + 1
    slug = slugify(question)
    while True:
        path = os.path.join(parent, f"{index:03d}_{slug}")
        try:
            os.mkdir(path)
            return path
        except FileExistsError:
            index += 1


def write_query_outputs(directory: str, image_rgb: np.ndarray, masks: np.ndarray, answer: str,
                        saved_masks: Optional[np.ndarray] = None) -> QueryFiles:
    """Save masks (n, H, W) bool (n may be 0: a blank mask is written), the overlay of the first
    mask on `image_rgb`, and the answer text into an existing `directory`. `saved_masks`: the masks
    the PNGs hold when they differ from the overlay's, e.g. at the original size of an image that
    was downscaled for the model (default: `masks`)."""
    height, width = image_rgb.shape[:2]
    if masks.ndim != 3 or masks.shape[1:] != (height, width):
        raise ValueError(f"masks must be (n, {height}, {width}), got {tuple(masks.shape)}")
    saved = masks if saved_masks is None else saved_masks
    if saved.ndim != 3 or saved.shape[0] != masks.shape[0]:
        raise ValueError(f"saved_masks must be (n={masks.shape[0]}, H, W), got {tuple(saved.shape)}")
    first = masks[0] if masks.shape[0] else np.zeros((height, width), dtype=bool)
    files = QueryFiles(directory=directory, mask=os.path.join(directory, "seg_mask.png"),
                       overlay=os.path.join(directory, "seg_overlay.jpg"),
                       answer=os.path.join(directory, "answer.txt"))
    save_mask_png(files.mask, saved[0] if saved.shape[0] else np.zeros(saved.shape[1:], dtype=bool))
    Image.fromarray(overlay_mask(image_rgb, first)).save(files.overlay, quality=95)
    for k in range(1, saved.shape[0]):
        path = os.path.join(directory, f"seg_mask_{k}.png")
        save_mask_png(path, saved[k])
        files.extra_masks.append(path)
    with open(files.answer, "w", encoding="utf-8") as f:
        f.write(answer + "\n")
    return files
