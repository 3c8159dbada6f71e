"""utils/image_io.py: every everyday image kind becomes RGB uint8; every failure is one clear line."""
import http.server
import os
import threading

import cv2
import numpy as np
import pytest
from PIL import Image

from utils.image_io import ImageLoadError, load_image, read_image_header


def _check_rgb(loaded, h, w):
    assert loaded.rgb.dtype == np.uint8 and loaded.rgb.shape == (h, w, 3)
    assert loaded.rgb.flags.writeable


def test_rgb_jpeg_and_png(tmp_path):
    arr = np.zeros((12, 20, 3), np.uint8)
    arr[:, :10] = (200, 30, 60)
    Image.fromarray(arr).save(tmp_path / "a.png")
    Image.fromarray(arr).save(tmp_path / "a.jpg", quality=98)
    png = load_image(str(tmp_path / "a.png"))
    _check_rgb(png, 12, 20)
    assert np.array_equal(png.rgb, arr) and png.original_size == (12, 20) and not png.downscaled
    jpg = load_image(str(tmp_path / "a.jpg"))
    _check_rgb(jpg, 12, 20)
    assert np.abs(jpg.rgb[:, 2:8].astype(int) - (200, 30, 60)).max() < 8  # lossy, but the right colour


def test_grayscale_and_one_bit(tmp_path):
    gray = np.arange(6 * 7, dtype=np.uint8).reshape(6, 7) * 5
    Image.fromarray(gray, mode="L").save(tmp_path / "g.png")
    out = load_image(str(tmp_path / "g.png"))
    _check_rgb(out, 6, 7)
    assert all(np.array_equal(out.rgb[..., c], gray) for c in range(3))
    Image.fromarray(gray > 100).convert("1").save(tmp_path / "b.png")
    bits = load_image(str(tmp_path / "b.png"))
    _check_rgb(bits, 6, 7)
    assert set(np.unique(bits.rgb)) <= {0, 255} and np.array_equal(bits.rgb[..., 0] == 255, gray > 100)


def test_rgba_and_la_transparent_pixels_become_white(tmp_path):
    rgba = np.zeros((4, 5, 4), np.uint8)
    rgba[..., :3] = (10, 20, 30)  # colour stored under transparency: must not show
    rgba[0, 0] = (200, 100, 50, 255)  # opaque: kept as is
    rgba[1, 1] = (0, 0, 0, 128)  # half transparent black on white: mid grey
    Image.fromarray(rgba, mode="RGBA").save(tmp_path / "a.png")
    out = load_image(str(tmp_path / "a.png")).rgb
    assert out[0, 0].tolist() == [200, 100, 50]
    assert out[2, 2].tolist() == [255, 255, 255]
    assert abs(int(out[1, 1, 0]) - 127) <= 1
    la = Image.fromarray(rgba[..., [0, 3]].copy(), mode="LA")
    la.save(tmp_path / "la.png")
    out = load_image(str(tmp_path / "la.png")).rgb
    assert out[0, 0].tolist() == [200] * 3 and out[3, 4].tolist() == [255] * 3


def test_palette_with_and_without_transparency(tmp_path):
    p = Image.new("P", (6, 4))
    p.putpalette([255, 0, 0, 0, 255, 0] + [0] * (256 * 3 - 6))
    px = np.zeros((4, 6), np.uint8)
    px[:, 3:] = 1
    p.putdata(px.flatten().tolist())
    p.save(tmp_path / "p.png")
    out = load_image(str(tmp_path / "p.png"))
    assert out.mode == "P" and out.rgb[0, 0].tolist() == [255, 0, 0] and out.rgb[0, 5].tolist() == [0, 255, 0]
    p.save(tmp_path / "pt.png", transparency=1)  # index 1 (green) is transparent -> white
    out = load_image(str(tmp_path / "pt.png")).rgb
    assert out[0, 0].tolist() == [255, 0, 0] and out[0, 5].tolist() == [255, 255, 255]
    p.save(tmp_path / "p.gif")
    assert load_image(str(tmp_path / "p.gif")).rgb[0, 5].tolist() == [0, 255, 0]


def test_sixteen_bit_pngs(tmp_path):
    g16 = np.array([[0, 257, 257 * 128], [65535, 1000, 60000]], np.uint16)
    assert cv2.imwrite(str(tmp_path / "g16.png"), g16)
    out = load_image(str(tmp_path / "g16.png")).rgb
    assert out[..., 0].tolist() == [[0, 1, 128], [255, 1000 // 257, 60000 // 257]]
    assert np.array_equal(out[..., 0], out[..., 2])
    rgb16 = np.zeros((3, 4, 3), np.uint16)
    rgb16[..., 0] = 65535  # red channel full (cv2 writes BGR)
    rgb16[..., 2] = 257 * 10
    assert cv2.imwrite(str(tmp_path / "c16.png"), rgb16[..., ::-1].copy())
    out = load_image(str(tmp_path / "c16.png")).rgb
    _check_rgb(load_image(str(tmp_path / "c16.png")), 3, 4)
    assert out[0, 0].tolist() == [255, 0, 10]


def test_cmyk_jpeg(tmp_path):
    Image.new("CMYK", (8, 6), (0, 255, 255, 0)).save(tmp_path / "c.jpg")
    out = load_image(str(tmp_path / "c.jpg"))
    _check_rgb(out, 6, 8)
    assert out.rgb[3, 3, 0] > 240 and out.rgb[3, 3, 1] < 15


@pytest.mark.parametrize("orientation,top_left_red", [(1, True), (3, False), (6, True), (8, False)])
def test_exif_rotated_jpeg_is_shown_upright(tmp_path, orientation, top_left_red):
    # stored 40 wide x 20 high: left half red, right half blue
    im = Image.new("RGB", (40, 20), (0, 0, 255))
    im.paste((255, 0, 0), (0, 0, 20, 20))
    exif = im.getexif()
    exif[0x0112] = orientation
    im.save(tmp_path / "r.jpg", exif=exif.tobytes(), quality=95)
    out = load_image(str(tmp_path / "r.jpg"))
    swapped = orientation in (6, 8)
    assert out.rgb.shape[:2] == ((40, 20) if swapped else (20, 40))
    assert out.original_size == out.rgb.shape[:2]
    # 6 = rotate 90 clockwise to show: the stored left edge becomes the top; 8 the bottom; 3 = 180 degrees
    assert (out.rgb[1, 1, 0] > 200) == top_left_red
    assert (out.rgb[-2, -2, 2] > 200) == top_left_red


def test_large_images_are_downscaled_keeping_aspect(tmp_path):
    arr = np.zeros((300, 400, 3), np.uint8)
    arr[:, :200] = 255
    Image.fromarray(arr).save(tmp_path / "big.png")
    out = load_image(str(tmp_path / "big.png"), max_pixels=12_000)
    h, w = out.rgb.shape[:2]
    assert h * w <= 12_000 and abs(w / h - 4 / 3) < 0.05 and out.downscaled and out.original_size == (300, 400)
    assert out.rgb[h // 2, 2].tolist() == [255] * 3 and out.rgb[h // 2, -3].tolist() == [0] * 3
    # JPEG: decoded at reduced scale (draft), then fitted; EXIF rotation still applied
    im = Image.fromarray(np.full((1200, 1600, 3), 90, np.uint8))
    exif = im.getexif()
    exif[0x0112] = 6
    im.save(tmp_path / "big.jpg", exif=exif.tobytes())
    out = load_image(str(tmp_path / "big.jpg"), max_pixels=30_000)
    h, w = out.rgb.shape[:2]
    assert h * w <= 30_000 and h > w and out.original_size == (1600, 1200)
    assert load_image(str(tmp_path / "big.png"), max_pixels=10 ** 9).rgb.shape == (300, 400, 3)


def test_decompression_bomb_is_a_clear_error(tmp_path, monkeypatch):
    Image.new("RGB", (64, 64)).save(tmp_path / "bomb.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 4096 px > 2 * 1000
    with pytest.raises(ImageLoadError, match=r"bomb\.png: image is too large"):
        load_image(str(tmp_path / "bomb.png"))


@pytest.mark.parametrize("claim", ["jpeg", "png"])
def test_huge_headers_are_refused_before_decoding(tmp_path, monkeypatch, claim):
    """The demos share the dataset readers' guard: a file claiming 65000 x 65000 or 30000 x 30000
    pixels is refused from its header (nothing is decoded or allocated), even with downscaling on."""
    from data_files import jpeg_claiming, png_claiming
    from PIL import ImageFile
    write = jpeg_claiming if claim == "jpeg" else png_claiming
    for side in (65000, 30000):
        path = tmp_path / f"bomb{side}.{claim}"
        write(path, side, side)
        monkeypatch.setattr(ImageFile.ImageFile, "load", lambda *a: pytest.fail("decoded"))
        for kwargs in ({}, {"max_pixels": 50_000_000}):
            with pytest.raises(ImageLoadError) as info:
                load_image(str(path), **kwargs)
            message = str(info.value)
            assert "\n" not in message and str(path) in message and "too large" in message
            assert info.value.reason == "too_large"
        with pytest.raises(ImageLoadError, match="too large"):
            read_image_header(str(path))
        monkeypatch.undo()


def test_one_limit_for_header_check_and_demo(tmp_path, monkeypatch):
    import utils.image_io
    Image.fromarray(np.zeros((30, 40, 3), np.uint8)).save(tmp_path / "a.png")
    header = read_image_header(str(tmp_path / "a.png"))
    assert (header.width, header.height, header.format, header.size) == (40, 30, "PNG", (30, 40))
    monkeypatch.setattr(utils.image_io, "MAX_IMAGE_PIXELS", 1199)  # 30 x 40 = 1200
    for read in (read_image_header, load_image):
        with pytest.raises(ImageLoadError, match="40x30 = 1,200 pixels, over the limit of 1,199"):
            read(str(tmp_path / "a.png"))
    assert load_image(str(tmp_path / "a.png"), limit=1200).rgb.shape == (30, 40, 3)


def _one_line_error(source, pattern, reason=None):
    for read in (load_image, read_image_header):
        with pytest.raises(ImageLoadError) as info:
            read(source)
        message = str(info.value)
        assert "\n" not in message and source in message
        assert pattern in message, message
        assert reason is None or info.value.reason == reason


def test_bad_files_give_one_line_errors(tmp_path, monkeypatch):
    _one_line_error(str(tmp_path / "missing.jpg"), "no such file", "not_found")
    _one_line_error(str(tmp_path), "is a directory", "not_a_file")
    (tmp_path / "empty.png").write_bytes(b"")
    _one_line_error(str(tmp_path / "empty.png"), "file is empty", "empty")
    (tmp_path / "notes.jpg").write_text("this is not an image\n" * 20)
    _one_line_error(str(tmp_path / "notes.jpg"), "not an image file", "not_an_image")
    Image.fromarray(np.full((64, 64, 3), 128, np.uint8)).save(tmp_path / "whole.jpg")
    data = (tmp_path / "whole.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 3])
    _one_line_error(str(tmp_path / "cut.jpg"), "cannot decode image")
    with pytest.raises(ImageLoadError, match="empty image path"):
        load_image("   ")
    (tmp_path / "locked.png").write_bytes(b"x")
    monkeypatch.setattr(os, "access", lambda path, mode: False)  # root can read anything; simulate a 0o000 file
    _one_line_error(str(tmp_path / "locked.png"), "permission denied")


def test_http_url_is_fetched_and_errors_are_one_line(tmp_path):
    Image.fromarray(np.full((5, 9, 3), (1, 2, 3), np.uint8)).save(tmp_path / "web.png")

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *a, **k):
            super().__init__(*a, directory=str(tmp_path), **k)

        def log_message(self, *a):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Quiet)  # loopback only, no network
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        base = f"http://127.0.0.1:{server.server_address[1]}"
        out = load_image(base + "/web.png")
        assert out.rgb.shape == (5, 9, 3) and out.rgb[0, 0].tolist() == [1, 2, 3]
        _one_line_error(base + "/nothing.png", "could not download")
    finally:
        server.shutdown()
        server.server_close()


def test_corrupt_exif_keeps_the_image_unrotated(tmp_path, recwarn):
    Image.fromarray(np.full((10, 20, 3), 90, np.uint8)).save(
        tmp_path / "bad_exif.jpg", exif=b"Exif\x00\x00MM\x00*\x00\x00\x00\x08\xff\xff\x01\x12")
    out = load_image(str(tmp_path / "bad_exif.jpg"))
    assert out.rgb.shape == (10, 20, 3) and out.original_size == (10, 20)
    assert not [w for w in recwarn if "EXIF" in str(w.message)]
