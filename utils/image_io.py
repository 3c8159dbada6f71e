"""Load any everyday image file (or http(s) URL) as RGB uint8, or fail with one clear line.

What the models expect is an (H, W, 3) uint8 RGB array in the orientation a viewer shows. Files
in the wild are grayscale, palette, RGBA, 16-bit, CMYK, or carry an EXIF rotation; this module
turns all of them into that array. Every failure is an `ImageLoadError` whose message names the
file and says what is wrong, so a caller (the demo loop, a data loader) can print it and go on.

The size guard of every image reader in the project lives here: `read_image_header` reads the
size from the file header (Pillow opens lazily, no pixel is decoded) and refuses images over
`MAX_IMAGE_PIXELS` before anything allocates them. The dataset readers (OpenCV decode, as the
original) and `load_image` (the demos) both go through it.

Only Pillow and numpy are needed.
"""
from __future__ import annotations

import io
import os
import re
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
# The most pixels an image may claim (about 13400 x 13400); larger ones are refused from the header.
# The default is Pillow's own refusal threshold (2 x PIL.Image.MAX_IMAGE_PIXELS), so the two agree;
# lower it here to be stricter. Pillow still refuses above its own limit: raise PIL.Image.MAX_IMAGE_PIXELS
# as well to go beyond it.
MAX_IMAGE_PIXELS = 178_956_970


class ImageLoadError(ValueError):
    """An image could not be loaded; the message is one line naming the source.

    `problem` is that line without the source; `reason` a short code for counting: not_found,
    not_a_file, not_readable, empty, not_an_image, too_large, cannot_decode, download_failed."""

    def __init__(self, source: str, problem: str, reason: str):
        super().__init__(f"{source}: {problem}" if source else problem)
        self.source, self.problem, self.reason = source, problem, reason

    def __reduce__(self):
        return type(self), (self.source, self.problem, self.reason)


@dataclass(frozen=True)
class ImageHeader:
    width: int  # as stored in the file
    height: int
    format: str  # Pillow's format name, e.g. "JPEG", "PNG"
    mode: str
    orientation: int  # EXIF orientation, 1 = as stored

    @property
    def size(self) -> tuple[int, int]:
        """(H, W) as displayed: EXIF orientations 5-8 swap the sides. This is also what OpenCV's
        imread returns, since it applies the orientation too."""
        return (self.width, self.height) if self.orientation in (5, 6, 7, 8) else (self.height, self.width)


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
        raise ImageLoadError(url, f"could not download ({_reason(e)})", "download_failed") from None
    if len(data) > MAX_URL_BYTES:
        raise ImageLoadError(url, f"download is larger than {MAX_URL_BYTES // (1024 * 1024)} MiB", "too_large")
    return data


def _reason(e: BaseException) -> str:
    reason = getattr(e, "reason", None) or getattr(e, "strerror", None) or str(e) or type(e).__name__
    return " ".join(str(reason).split())  # one line


def _open_file(source: str) -> Image.Image:
    if is_url(source):
        return Image.open(io.BytesIO(_read_url(source)))
    if not source.strip():
        raise ImageLoadError("", "empty image path", "not_found")
    path = os.path.expanduser(source)
    if not os.path.exists(path):
        raise ImageLoadError(source, "no such file", "not_found")
    if os.path.isdir(path):
        raise ImageLoadError(source, "is a directory, not an image file", "not_a_file")
    if not os.access(path, os.R_OK):
        raise ImageLoadError(source, "not readable (permission denied)", "not_readable")
    if os.path.getsize(path) == 0:
        raise ImageLoadError(source, "file is empty", "empty")
    return Image.open(path)


def _too_large(source: str, claim: str, limit: int) -> ImageLoadError:
    return ImageLoadError(source, f"image is too large to decode safely: its header claims {claim}, over the "
                                  f"limit of {limit:,} pixels (utils.image_io.MAX_IMAGE_PIXELS)", "too_large")


# leading bytes of the formats everyday images come in (JPEG, PNG, GIF, BMP, TIFF, WebP's RIFF)
IMAGE_SIGNATURES = (b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"GIF8", b"BM", b"II*\x00", b"MM\x00*", b"RIFF")


def _starts_like_an_image(source: str) -> bool:
    if is_url(source):
        return False
    try:
        with open(source, "rb") as f:
            head = f.read(8)
    except OSError:
        return False
    return head.startswith(IMAGE_SIGNATURES)


def open_image(source: str, limit: Optional[int] = None) -> Image.Image:
    """The Pillow image opened lazily (header read, no pixel decoded), refused with an ImageLoadError
    if it claims more than `limit` pixels (default MAX_IMAGE_PIXELS). Use it as a context manager."""
    limit = MAX_IMAGE_PIXELS if limit is None else limit
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = _open_file(source)
    except ImageLoadError:
        raise
    except Image.DecompressionBombError as e:  # over Pillow's own limit: refused while reading the header
        claimed = re.search(r"\((\d+) pixels\)", str(e))
        claim = f"{int(claimed.group(1)):,} pixels" if claimed else "more pixels than Pillow allows"
        raise _too_large(source, claim, min(limit, 2 * Image.MAX_IMAGE_PIXELS)) from None
    except UnidentifiedImageError:
        if _starts_like_an_image(source):  # a known image signature Pillow could not parse: cut off or corrupt
            raise ImageLoadError(source, "cannot decode image (its header is cut off or corrupt)",
                                 "cannot_decode") from None
        raise ImageLoadError(source, "not an image file Pillow can read", "not_an_image") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:  # a header that is cut off or corrupt
        raise ImageLoadError(source, f"cannot decode image ({_reason(e)})", "cannot_decode") from None
    w, h = image.size
    if w * h > limit:
        image.close()
        raise _too_large(source, f"{w}x{h} = {w * h:,} pixels", limit)
    if w < 1 or h < 1:
        image.close()
        raise ImageLoadError(source, f"the header gives an empty image ({w}x{h})", "cannot_decode")
    return image


def read_image_header(source: str, *, limit: Optional[int] = None) -> ImageHeader:
    """Size, format and EXIF orientation from the header, without decoding any pixel.

    Raises ImageLoadError (one line naming `source`) for a missing, unreadable, empty or non-image
    file, and for an image over `limit` pixels (default MAX_IMAGE_PIXELS, read at call time)."""
    with open_image(source, limit) as image:
        return ImageHeader(image.size[0], image.size[1], image.format or "", image.mode,
                           _orientation(image, header_only=True))


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


def _orientation(image: Image.Image, header_only: bool = False) -> int:
    """EXIF orientation (1 = as stored); unreadable EXIF counts as 1 rather than losing the image.
    header_only: never decode pixels to find it (Pillow decodes a whole PNG to look for an eXIf
    chunk stored after the pixel data; such a rare chunk is then not seen)."""
    if header_only and image.format == "PNG" and "exif" not in image.info:
        return 1
    try:
        value = image.getexif().get(ExifTags.Base.Orientation, 1)
    except Exception:  # Pillow raises assorted errors on malformed EXIF blocks
        return 1
    return value if isinstance(value, int) and 1 <= value <= 8 else 1


def load_image(source: str, *, max_pixels: Optional[int] = None, limit: Optional[int] = None) -> LoadedImage:
    """Read `source` (a file path or an http(s) URL) as RGB uint8 with EXIF rotation applied.

    Images above `max_pixels` are downscaled (aspect kept) to at most that many pixels; JPEGs are
    decoded at a reduced scale first, so huge photos never need their full size in memory.
    `LoadedImage.original_size` is the (H, W) as displayed, before any downscaling. Images whose
    header claims more than `limit` pixels (default MAX_IMAGE_PIXELS) are refused before decoding.
    Every failure is an ImageLoadError: one line naming `source`.
    """
    try:
        with warnings.catch_warnings():
            # Pillow's warnings (bomb size, corrupt EXIF, palette transparency) are handled here or harmless
            warnings.simplefilter("ignore")
            with open_image(source, limit) as image:
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
    except MemoryError:
        raise ImageLoadError(source, "not enough memory to decode this image", "too_large") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:  # truncated / corrupt data
        raise ImageLoadError(source, f"cannot decode image ({_reason(e)})", "cannot_decode") from None
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.shape[0] == 0 or rgb.shape[1] == 0:
        raise ImageLoadError(source, f"decoded to an unusable array of shape {rgb.shape}", "cannot_decode")
    return LoadedImage(rgb=rgb, source=source, original_size=original_size, mode=mode)
