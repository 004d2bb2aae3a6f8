"""Bytes of broken and unusual image files, shared by the stage-1 and stage-2 bad-input tests.

Each builder is tiny and fast; the comments say which PIL error the bytes provoke (Pillow 13), since the
point of the tests is that every one of them ends as a counted skip or a one-line error.
"""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
from PIL import Image


def encode(img: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt)
    return buf.getvalue()


def noise(seed: int = 0, size: int = 24) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8))


def truncated_jpeg() -> bytes:
    """The first half of a JPEG: PIL raises OSError while decoding."""
    data = encode(noise(1), "JPEG")
    return data[: len(data) // 2]


def truncated_png() -> bytes:
    """The first half of a PNG: OSError ("image file is truncated")."""
    data = encode(noise(2))
    return data[: len(data) // 2]


def broken_png() -> bytes:
    """A PNG whose IDAT length field is 100 bytes short: PIL raises SyntaxError ("broken PNG file"), which
    is neither an OSError nor a ValueError."""
    data = bytearray(encode(noise(3)))
    assert data[37:41] == b"IDAT"  # signature (8) + IHDR chunk (25)
    (n,) = struct.unpack(">I", data[33:37])
    data[33:37] = struct.pack(">I", n - 100)
    return bytes(data)


def _chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def bomb_png(width: int = 20000, height: int = 20000) -> bytes:
    """A 1-bit PNG header claiming width x height pixels (400 Mpx by default, above PIL's decompression-bomb
    limit of 2 x Image.MAX_IMAGE_PIXELS), with no real pixel data: Image.open raises DecompressionBombError,
    which is neither an OSError nor a ValueError. A few hundred bytes, nothing is decoded."""
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", zlib.compress(b"\0" * 64)) + _chunk(b"IEND", b"")


# (mode, PNG bytes, the 8-bit RGB image it should load as)
def mode_images() -> dict[str, tuple[bytes, Image.Image]]:
    out = {}
    grey = Image.new("L", (20, 12), 77)
    out["L"] = (encode(grey), Image.new("RGB", (20, 12), (77, 77, 77)))
    rgb = noise(4, 16)
    out["RGBA"] = (encode(rgb.convert("RGBA")), rgb)  # opaque alpha: the colours come through unchanged
    pal = Image.new("P", (12, 20))
    pal.putpalette([200, 100, 50, 10, 20, 240] + [0] * 762)
    pal.paste(1, (0, 0, 6, 20))
    out["P"] = (encode(pal), pal.convert("RGB"))
    g16 = Image.fromarray(np.full((12, 20), 40000, dtype=np.uint16))
    assert g16.mode.startswith("I;16")
    out["I;16"] = (encode(g16), Image.new("RGB", (20, 12), (156, 156, 156)))  # 40000 / 257 -> 156, not clipped to 255
    return out
