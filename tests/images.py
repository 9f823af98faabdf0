"""Small image factories shared by the tests (Pillow, in memory)."""
from __future__ import annotations

import io

from PIL import Image


def png(im: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="PNG", **kw)
    return buf.getvalue()


def encode(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt, **kw)
    return buf.getvalue()


def gradient(width=64, height=48) -> Image.Image:
    """An RGB image whose every pixel differs from its neighbours (so changes are visible)."""
    im = Image.new("RGB", (width, height))
    im.putdata([((x * 7) % 256, (y * 11) % 256, ((x + y) * 5) % 256) for y in range(height) for x in range(width)])
    return im


def box_mask(size, box, *, mode="L") -> Image.Image:
    """White (keep) everywhere, black (inpaint) inside ``box`` = (left, top, right, bottom)."""
    im = Image.new("L", size, 255)
    im.paste(0, box)
    return im.convert(mode) if mode != "L" else im
