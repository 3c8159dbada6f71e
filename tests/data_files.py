"""Files for the data tests: small images whose headers claim huge sizes (decompression bombs, without
allocating anything), and JSON read independently of the loaders."""
import io
import json
import struct
import zlib

import numpy as np
from PIL import Image


def _jpeg_and_frame_header() -> tuple[bytearray, int]:
    """A 16x16 JPEG and the offset of its frame header (SOF) marker."""
    buf = io.BytesIO()
    Image.fromarray(np.full((16, 16, 3), 120, np.uint8)).save(buf, "JPEG")
    data = bytearray(buf.getvalue())
    i = 2  # after SOI: walk the marker segments to the first SOF
    while data[i + 1] not in (0xC0, 0xC1, 0xC2):
        i += 2 + int.from_bytes(data[i + 2:i + 4], "big")
    return data, i


def jpeg_claiming(path, width: int, height: int) -> None:
    """A valid 16x16 JPEG whose frame header says width x height."""
    data, i = _jpeg_and_frame_header()
    data[i + 5:i + 9] = struct.pack(">HH", height, width)
    with open(path, "wb") as f:
        f.write(bytes(data))


def jpeg_cut_after_header(path) -> None:
    """A JPEG whose header reads (16x16) but whose data stops there: it cannot be decoded."""
    data, i = _jpeg_and_frame_header()
    with open(path, "wb") as f:
        f.write(bytes(data[:i + 2 + int.from_bytes(data[i + 2:i + 4], "big")]))


def png_claiming(path, width: int, height: int) -> None:
    """A 16x16 PNG whose IHDR (with a valid CRC) says width x height."""
    buf = io.BytesIO()
    Image.fromarray(np.full((16, 16, 3), 120, np.uint8)).save(buf, "PNG")
    data = bytearray(buf.getvalue())
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    with open(path, "wb") as f:
        f.write(bytes(data))


def read_json_any_encoding(path):
    """What a ReasonSeg file holds, decoded here on its own: UTF-8, or cp1252 when it is not UTF-8."""
    data = open(path, "rb").read()
    try:
        return json.loads(data.decode("utf-8"))
    except UnicodeDecodeError:
        return json.loads(data.decode("cp1252"))
