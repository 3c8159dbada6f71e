"""utils/visualize.py: mask PNG, overlay arithmetic, per-query folders that never collide."""
import os

import numpy as np
import pytest
from PIL import Image

from utils.visualize import image_folder_name, new_query_dir, overlay_mask, save_mask_png, slugify, write_query_outputs


def test_overlay_is_point3_image_plus_point7_red_on_mask_only():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (7, 9, 3), dtype=np.uint8)
    mask = np.zeros((7, 9), bool)
    mask[2:5, 3:8] = True
    out = overlay_mask(image, mask)
    expected = np.floor(image[mask].astype(np.float64) * 0.3 + np.array([255, 0, 0]) * 0.7 + 1e-6)
    assert np.array_equal(out[mask], expected.astype(np.uint8))
    assert np.array_equal(out[~mask], image[~mask])
    assert out.dtype == np.uint8 and not np.shares_memory(out, image)
    with pytest.raises(ValueError, match="mask shape"):
        overlay_mask(image, mask[:, :5])


def test_mask_png_is_binary_0_255(tmp_path):
    mask = np.zeros((5, 6), bool)
    mask[1, 2] = mask[4, 5] = True
    save_mask_png(str(tmp_path / "m.png"), mask)
    back = np.asarray(Image.open(tmp_path / "m.png"))
    assert back.dtype == np.uint8 and back.shape == (5, 6)
    assert np.array_equal(back, np.where(mask, 255, 0))


def test_names():
    assert slugify("Is there a red square?") == "is-there-a-red-square"
    assert slugify("???") == "query"
    assert len(slugify("word " * 50)) <= 40 and not slugify("word " * 50).endswith("-")
    assert image_folder_name("/data/imgs/COCO_0001.jpg") == "COCO_0001"
    assert image_folder_name("https://example.org/a/b/The dress.png?x=1") == "The_dress"
    assert image_folder_name("https://example.org/") == "image"
    assert image_folder_name("../..") == "image"


def test_query_dirs_are_new_every_time(tmp_path):
    root = str(tmp_path / "vis")
    a = new_query_dir(root, "pics/cat.jpg", "Where is the cat?")
    b = new_query_dir(root, "other/cat.png", "Where is the cat?")  # same stem, same question
    c = new_query_dir(root, "pics/dog.jpg", "Where is the cat?")
    assert os.path.basename(a) == "000_where-is-the-cat" and os.path.basename(b) == "001_where-is-the-cat"
    assert os.path.dirname(a) == os.path.dirname(b) == os.path.join(root, "cat")
    assert os.path.basename(c) == "000_where-is-the-cat" and all(os.path.isdir(p) for p in (a, b, c))
    os.mkdir(os.path.join(root, "cat", "007_manual"))  # a gap is skipped, never reused
    assert os.path.basename(new_query_dir(root, "cat.jpg", "x")) == "008_x"


def test_write_outputs_blank_and_multi_mask(tmp_path):
    image = np.full((10, 12, 3), 40, np.uint8)
    blank = write_query_outputs(str(tmp_path), image, np.zeros((0, 10, 12), bool), "No, there is none.")
    assert np.asarray(Image.open(blank.mask)).max() == 0
    overlay = np.asarray(Image.open(blank.overlay))
    assert overlay.shape == (10, 12, 3) and np.abs(overlay.astype(int) - 40).max() <= 2
    assert open(blank.answer, encoding="utf-8").read() == "No, there is none.\n" and blank.extra_masks == []

    masks = np.zeros((2, 10, 12), bool)
    masks[0, :5] = True
    masks[1, 5:] = True
    os.mkdir(tmp_path / "two")
    files = write_query_outputs(str(tmp_path / "two"), image, masks, "Sure.")
    assert np.array_equal(np.asarray(Image.open(files.mask)) == 255, masks[0])
    assert [os.path.basename(p) for p in files.extra_masks] == ["seg_mask_1.png"]
    assert np.array_equal(np.asarray(Image.open(files.extra_masks[0])) == 255, masks[1])
    overlay = np.asarray(Image.open(files.overlay)).astype(int)
    assert overlay[2, 2, 0] > 150 and overlay[8, 2, 0] < 60  # red only over the first mask
    with pytest.raises(ValueError, match="masks must be"):
        write_query_outputs(str(tmp_path), image, masks[:, :5], "x")
