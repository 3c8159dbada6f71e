"""model/pil_resize.py and the tensor preprocessing built on it: the same bytes as Pillow, and the
same encoder inputs as the transformers CLIP processor and segment_anything's resize (CPU here;
tests/test_pil_resize_cuda.py on a GPU)."""
import numpy as np
import pytest
import torch
from PIL import Image

from model import pil_resize
from model.transforms import ClipSteps, ClipTransform, SamTransform

FILTERS = {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC}
# up and down, by large and small factors, odd and one-pixel sides, one side unchanged
GEOMETRIES = [((480, 640), (768, 1024)), ((640, 427), (1024, 683)), ((480, 640), (336, 448)), ((427, 640), (336, 503)),
              ((7, 5), (3, 11)), ((1, 9), (4, 2)), ((300, 1000), (1024, 3413)), ((2000, 1500), (1024, 768)),
              ((33, 17), (33, 40)), ((50, 60), (50, 60))]
IMAGE_SIZES = [(480, 640), (640, 427), (427, 640), (500, 375), (336, 336), (200, 900), (37, 41), (1000, 333)]


def image(h, w, seed=0):
    """Noise, with a smooth ramp in the top half (noise alone clips often; ramps round often)."""
    rng = np.random.default_rng(seed)
    img = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    img[: h // 2] = ((np.arange(w)[None, :, None] * 7 + np.arange(3)) % 256).astype(np.uint8)
    return img


def check_resize(device):
    for (h0, w0), (h, w) in GEOMETRIES:
        for name, pil_filter in FILTERS.items():
            img = image(h0, w0)
            want = np.asarray(Image.fromarray(img).resize((w, h), pil_filter))
            got = pil_resize.resize(torch.from_numpy(img).to(device), (h, w), name)
            assert got.device.type == torch.device(device).type and got.dtype == torch.uint8
            assert np.array_equal(got.cpu().numpy(), want), ((h0, w0), (h, w), name)
            crop = (h // 4, w // 5, max(1, h // 2), max(1, w // 2))
            cropped = pil_resize.resize(torch.from_numpy(img).to(device), (h, w), name, crop=crop)
            assert np.array_equal(cropped.cpu().numpy(), want[crop[0]:crop[0] + crop[2], crop[1]:crop[1] + crop[3]])


def check_transforms(device, clip_size=336, sam_size=1024):
    clip, sam = ClipTransform(clip_size), SamTransform(sam_size)
    assert clip.steps is not None  # the tensor path is taken, not the processor fallback
    for k, (h, w) in enumerate(IMAGE_SIZES):
        img = image(h, w, seed=k)
        rgb = torch.from_numpy(img).to(device)
        got = clip.on_tensor(rgb)
        assert got.device == rgb.device and torch.equal(got.cpu(), clip(img)), (h, w)
        want, resized = sam.resized(img), sam.resized_tensor(rgb)
        assert (resized.resized_size, resized.original_size) == (want.resized_size, want.original_size)
        assert torch.equal(resized.pixels.cpu(), want.pixels), (h, w)


def test_resize_gives_pillows_bytes():
    check_resize("cpu")


def test_tensor_transforms_give_the_processors_inputs():
    check_transforms("cpu")


def test_weights_are_pillows_fixed_point_coefficients():
    """Hand-checkable case: doubling 2 pixels bilinearly gives taps (0.75, 0.25) in 22-bit fixed point."""
    first, fixed = pil_resize.weights(2, 4, "bilinear")
    one = 1 << pil_resize.PRECISION_BITS
    assert first.tolist() == [0, 0, 0, 1]
    assert fixed[:, :2].tolist() == [[one, 0], [3 * one // 4, one // 4], [one // 4, 3 * one // 4], [one, 0]]
    with pytest.raises(ValueError, match="unknown filter"):
        pil_resize.weights(2, 4, "lanczos")


def test_unsupported_processor_settings_fall_back_to_the_processor():
    """A processor resizing to a fixed height and width is not what on_tensor makes: it runs the
    processor itself (same values), rather than guessing."""
    clip = ClipTransform(32)
    clip.processor.size = {"height": 40, "width": 24}
    clip.steps = ClipSteps.of(clip.processor)
    assert clip.steps is None
    img = image(50, 70)
    assert torch.equal(clip.on_tensor(torch.from_numpy(img)), clip(img))
    # a centre crop larger than the resized image (the processor pads): the processor runs too
    clip = ClipTransform(32)
    clip.processor.crop_size = {"height": 40, "width": 40}
    clip.steps = ClipSteps.of(clip.processor)
    assert clip.steps is not None and clip.steps.crop == (40, 40)
    assert torch.equal(clip.on_tensor(torch.from_numpy(img)), clip(img))
