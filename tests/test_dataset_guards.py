"""The one image size guard in every dataset reader, and the data root that must not be the code."""
import os
import shutil

import cv2
import numpy as np
import pytest
from data_files import jpeg_claiming, png_claiming
from PIL import Image, ImageFile

from dataset.image_io import SkipItem, image_size, read_image_rgb, read_label_map
from dataset.paths import PACKAGE_DIR, DataRootError, check_data_root
from model.transforms import ClipTransform, SamTransform


@pytest.fixture
def no_decoding(monkeypatch):
    """Call it to fail the test from then on if any pixel decoder runs."""
    def refuse(*args, **kwargs):
        raise AssertionError("a decoder ran on a file the header check should have refused")

    def block():
        monkeypatch.setattr(cv2, "imread", refuse)
        monkeypatch.setattr(Image.Image, "load", refuse)
        monkeypatch.setattr(ImageFile.ImageFile, "load", refuse)
    return block


@pytest.mark.parametrize("write,size", [(jpeg_claiming, (65000, 65000)), (jpeg_claiming, (30000, 30000)),
                                        (png_claiming, (30000, 30000)), (png_claiming, (20000, 9000))])
def test_huge_headers_are_refused_before_decoding(tmp_path, no_decoding, write, size):
    path = tmp_path / ("bomb.png" if write is png_claiming else "bomb.jpg")
    write(path, *size)
    no_decoding()
    for read in (read_image_rgb, image_size, read_label_map):
        with pytest.raises(SkipItem) as info:
            read(str(path), "refcoco")
        assert info.value.reason == "too_large" and info.value.key == "refcoco/too_large"
        message = str(info.value)
        assert "\n" not in message and str(path) in message and "too large" in message


def test_the_limit_is_one_overridable_constant(tmp_path, monkeypatch):
    import utils.image_io
    cv2.imwrite(str(tmp_path / "ok.png"), np.zeros((40, 50, 3), np.uint8))
    assert read_image_rgb(str(tmp_path / "ok.png"), "x").shape == (40, 50, 3)
    monkeypatch.setattr(utils.image_io, "MAX_IMAGE_PIXELS", 1999)  # 40 x 50 = 2000
    with pytest.raises(SkipItem, match="40x50|50x40") as info:
        read_image_rgb(str(tmp_path / "ok.png"), "x")
    assert info.value.reason == "too_large"
    with pytest.raises(SkipItem, match="too large"):
        read_label_map(str(tmp_path / "ok.png"), "x")


@pytest.mark.parametrize("content,reason", [(None, "not_found"), (b"", "empty"), (b"plain text\n", "not_an_image"),
                                            (b"\xff\xd8\xff\xe0 cut", "cannot_decode")])
def test_unreadable_images_name_the_reason(tmp_path, content, reason):
    path = tmp_path / "x.jpg"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(SkipItem) as info:
        read_image_rgb(str(path), "refcoco")
    assert info.value.reason == reason and str(path) in str(info.value)


def test_exif_rotated_size_is_what_opencv_decodes(tmp_path):
    im = Image.new("RGB", (40, 20), (0, 0, 255))
    exif = im.getexif()
    exif[0x0112] = 6
    im.save(tmp_path / "r.jpg", exif=exif.tobytes())
    path = str(tmp_path / "r.jpg")
    assert image_size(path, "x") == read_image_rgb(path, "x").shape[:2] == (40, 20)


def test_training_skips_and_counts_a_bomb(synthetic_root, tokenizer, tmp_path):
    """A JPEG claiming 65000 x 65000 pixels among the training images: skipped, counted with its
    reason, never decoded; the run goes on."""
    from dataset.hybrid import HybridDataset
    root = tmp_path / "r"
    shutil.copytree(synthetic_root, root, ignore=shutil.ignore_patterns("ade20k", "mapillary", "vlpart", "cocostuff"))
    folder = root / "refer_seg" / "images" / "mscoco" / "images" / "train2014"
    bombs = sorted(folder.iterdir())[0:6:2]  # half of refcoco's training images
    for f in bombs:
        jpeg_claiming(f, 65000, 65000)
    ds = HybridDataset(str(root), tokenizer, ClipTransform(32), SamTransform(64), datasets="refer_seg||vqa",
                       sample_rates=(1, 1), refer_seg_data="refcoco", samples_per_epoch=40)
    samples = [ds[i] for i in range(40)]
    assert all(os.path.basename(s.image_path) not in {f.name for f in bombs} for s in samples)
    assert set(ds.skipped_counts()) == {"refcoco/too_large"}
    assert sum(sum(s.skipped.values()) for s in samples) == ds.skipped_counts()["refcoco/too_large"] > 0


def test_data_root_must_not_be_the_code_package(synthetic_root, tokenizer, tmp_path):
    from dataset.eval_sets import build_eval_dataset
    from dataset.hybrid import HybridDataset
    assert check_data_root(synthetic_root) == synthetic_root
    for bad in (PACKAGE_DIR, os.path.join(PACKAGE_DIR, "refer_seg"), os.path.relpath(PACKAGE_DIR)):
        with pytest.raises(DataRootError) as info:
            check_data_root(bad)
        assert "\n" not in str(info.value) and "code package" in str(info.value) and "./data" in str(info.value)
    link = tmp_path / "link"
    link.symlink_to(PACKAGE_DIR)  # compared as real paths
    with pytest.raises(DataRootError):
        check_data_root(str(link))
    with pytest.raises(DataRootError):
        build_eval_dataset("refcoco", PACKAGE_DIR)
    with pytest.raises(DataRootError):
        HybridDataset(PACKAGE_DIR, tokenizer, ClipTransform(32), SamTransform(64))
