"""Load any everyday image file (or http(s) URL) as RGB uint8, or fail with one clear line.

What the models expect is an (H, W, 3) uint8 RGB array in the orientation a viewer shows. Files
in the wild are grayscale, palette, RGBA, 16-bit, CMYK, or carry an EXIF rotation; this module
turns all of them into that array. Every failure is an `ImageLoadError` whose message names the
file and says what is wrong, so a caller (the demo loop, a data loader) can print it and go on.

Only Pillow and numpy are needed.
"""
from __future__ import annotations

import io
import os
import urllib.error
import urllib.request
import warnings
from dataclasses import dataclass
from typing import Optional

import numpy as np
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError

URL_PREFIXES = ("http://", "https://")
MAX_URL_BYTES = 200 * 1024 * 1024
URL_TIMEOUT_S = 30.0


class ImageLoadError(ValueError):
    """An image could not be loaded; the message is one line naming the source."""


@dataclass(frozen=True)
class LoadedImage:
    rgb: np.ndarray  # (H, W, 3) uint8, EXIF orientation applied
    source: str  # the path or URL as given
    original_size: tuple[int, int]  # (H, W) after EXIF rotation, before any downscaling
    mode: str  # Pillow mode of the file, e.g. "RGB", "P", "I;16"

    @property
    def downscaled(self) -> bool:
        return self.rgb.shape[:2] != self.original_size


def is_url(source: str) -> bool:
    return source.lower().startswith(URL_PREFIXES)


def _read_url(url: str) -> bytes:
    try:
        with urllib.request.urlopen(url, timeout=URL_TIMEOUT_S) as response:
            data = response.read(MAX_URL_BYTES + 1)
    except (urllib.error.URLError, OSError, ValueError) as e:
        raise ImageLoadError(f"{url}: could not download ({_reason(e)})") from None
    if len(data) > MAX_URL_BYTES:
        raise ImageLoadError(f"{url}: download is larger than {MAX_URL_BYTES // (1024 * 1024)} MiB")
    return data


def _reason(e: BaseException) -> str:
    reason = getattr(e, "reason", None) or getattr(e, "strerror", None) or str(e) or type(e).__name__
    return " ".join(str(reason).split())  # one line


def _open(source: str) -> Image.Image:
    if is_url(source):
        return Image.open(io.BytesIO(_read_url(source)))
    if not source.strip():
        raise ImageLoadError("empty image path")
    path = os.path.expanduser(source)
    if not os.path.exists(path):
        raise ImageLoadError(f"{source}: no such file")
    if os.path.isdir(path):
        raise ImageLoadError(f"{source}: is a directory, not an image file")
    if not os.access(path, os.R_OK):
        raise ImageLoadError(f"{source}: not readable (permission denied)")
    if os.path.getsize(path) == 0:
        raise ImageLoadError(f"{source}: file is empty")
    return Image.open(path)


def _to_uint8_gray(arr: np.ndarray) -> np.ndarray:
    """High-bit-depth single channel -> uint8, keeping the full range of the stored type."""
    if arr.dtype == np.uint16 or (arr.dtype.kind in "iu" and arr.max(initial=0) > 255):
        return (np.clip(arr, 0, 65535).astype(np.uint32) // 257).astype(np.uint8)  # 65535 -> 255
    if arr.dtype.kind == "f":
        top = 1.0 if arr.size and float(np.nanmax(arr)) <= 1.0 else 255.0
        return (np.clip(np.nan_to_num(arr), 0, top) * (255.0 / top) + 0.5).astype(np.uint8)
    return np.clip(arr, 0, 255).astype(np.uint8)


def _flatten_alpha(image: Image.Image) -> Image.Image:
    """Transparent pixels are shown on white, as image viewers do (their stored colour is often
    black or garbage, which would otherwise become part of the picture)."""
    rgba = image.convert("RGBA")
    background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(background, rgba).convert("RGB")


def to_rgb_array(image: Image.Image) -> np.ndarray:
    """Any Pillow image (already EXIF-transposed) -> (H, W, 3) uint8 RGB."""
    mode = image.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        gray = _to_uint8_gray(np.asarray(image))
        return np.repeat(gray[:, :, None], 3, axis=2)
    has_alpha = mode in ("RGBA", "LA", "PA", "RGBa", "La") or (mode == "P" and "transparency" in image.info) \
        or (mode in ("L", "RGB") and "transparency" in image.info)
    rgb = _flatten_alpha(image) if has_alpha else image.convert("RGB")
    return np.asarray(rgb, dtype=np.uint8).copy()


def _fit_within(image: Image.Image, max_pixels: int) -> Image.Image:
    w, h = image.size
    scale = (max_pixels / float(w * h)) ** 0.5
    size = (max(1, int(w * scale)), max(1, int(h * scale)))
    if image.mode not in ("RGB", "RGBA", "L", "LA"):
        image = Image.fromarray(to_rgb_array(image))
    return image.resize(size, Image.Resampling.BILINEAR, reducing_gap=3.0)


def _orientation(image: Image.Image) -> int:
    """EXIF orientation (1 = as stored); unreadable EXIF counts as 1 rather than losing the image."""
    try:
        value = image.getexif().get(ExifTags.Base.Orientation, 1)
    except Exception:  # Pillow raises assorted errors on malformed EXIF blocks
        return 1
    return value if isinstance(value, int) and 1 <= value <= 8 else 1


def load_image(source: str, *, max_pixels: Optional[int] = None) -> LoadedImage:
    """Read `source` (a file path or an http(s) URL) as RGB uint8 with EXIF rotation applied.

    Images above `max_pixels` are downscaled (aspect kept) to at most that many pixels; JPEGs are
    decoded at a reduced scale first, so huge photos never need their full size in memory.
    `LoadedImage.original_size` is the (H, W) as displayed, before any downscaling. Pillow's own
    decompression-bomb guard (2 * Image.MAX_IMAGE_PIXELS) still applies and gives an ImageLoadError,
    like every other failure: one line naming `source`.
    """
    try:
        with warnings.catch_warnings():
            # Pillow's warnings (bomb size, corrupt EXIF, palette transparency) are handled here or harmless
            warnings.simplefilter("ignore")
            with _open(source) as image:
                mode = image.mode
                stored_w, stored_h = image.size
                orientation = _orientation(image)
                # EXIF orientations 5-8 swap width and height when shown
                original_size = (stored_w, stored_h) if orientation in (5, 6, 7, 8) else (stored_h, stored_w)
                too_big = max_pixels is not None and stored_w * stored_h > max_pixels
                if too_big and image.format == "JPEG":  # let libjpeg skip detail we would throw away
                    s = (max_pixels / float(stored_w * stored_h)) ** 0.5
                    image.draft("RGB", (int(stored_w * s) + 1, int(stored_h * s) + 1))
                transposed = ImageOps.exif_transpose(image) if orientation != 1 else image
                if too_big:
                    transposed = _fit_within(transposed, max_pixels)
                rgb = to_rgb_array(transposed)
    except ImageLoadError:
        raise
    except Image.DecompressionBombError:
        raise ImageLoadError(f"{source}: image is too large to decode safely (over "
                             f"{2 * Image.MAX_IMAGE_PIXELS / 1e6:.0f} megapixels)") from None
    except UnidentifiedImageError:
        raise ImageLoadError(f"{source}: not an image file Pillow can read") from None
    except MemoryError:
        raise ImageLoadError(f"{source}: not enough memory to decode this image") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:  # truncated / corrupt data
        raise ImageLoadError(f"{source}: cannot decode image ({_reason(e)})") from None
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.shape[0] == 0 or rgb.shape[1] == 0:
        raise ImageLoadError(f"{source}: decoded to an unusable array of shape {rgb.shape}")
    return LoadedImage(rgb=rgb, source=source, original_size=original_size, mode=mode)
