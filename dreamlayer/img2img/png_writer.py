"""The service's own PNG writer, for the files it hands to ComfyUI (the input image, the mask,
ControlNet images) and the results it serves after a paste-back.

Why not Pillow's: its PNG encoder tries all five row filters on every row (libpng's heuristic),
which costs more than the deflate itself: 30 ms for a 512x512 photo, 0.9 s for 4096x4096 even at
level 0. These files are read once, by ComfyUI over a local disk or loopback (or by a browser), so
the rows are left unfiltered and the samples go out as Pillow's raw encoder packs them, a band of
rows (about _PNG_BAND_BYTES) at a time, so that memory stays bounded whatever the image size. At
level 0 (images) the deflate stream of stored blocks is written here too: its size is known in
advance, so the output is allocated once and nothing but one band exists beside it. Masks use
level 1. docs/performance.md ("PNG encoding") has the measurements; tests/test_png_encoding.py
checks that Pillow reads back every pixel as given.
"""
from __future__ import annotations

import io
import struct

from PIL import Image

try:  # zlib-ng (requirements.txt): the same zlib streams, level 1 about 4x faster, checksums 5-10x
    from zlib_ng import zlib_ng as zlib
except ImportError:  # pragma: no cover - the standard library's zlib, slower, writes the same format
    import zlib

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
#: zlib level of the PNGs this service writes (inputs for ComfyUI, results it serves): 0 = stored.
#: They travel over a local disk or loopback and are read once, where raw bytes beat any deflate:
#: a 4096x4096 photo is written in 0.23 s instead of 1.8 s (Pillow, level 1), and read 6x faster.
PNG_COMPRESS_LEVEL = 0
#: Masks are flat: level 1 makes them both smaller and faster to write than stored.
MASK_COMPRESS_LEVEL = 1

_PNG_COLOR_TYPES = {"L": (0, 1), "LA": (4, 2), "RGB": (2, 3)}  # mode -> (colour type, channels)
_PNG_BAND_BYTES = 1 << 20
_STORED_BLOCK = 0xFFFF  # the largest stored deflate block


def _png_chunk(out, kind: bytes, data) -> None:
    out.write(struct.pack(">I", len(data)))
    out.write(kind)
    out.write(data)
    out.write(struct.pack(">I", zlib.crc32(data, zlib.crc32(kind))))


def _padded_bands(im: Image.Image, mode: str, make=None):
    """``im``'s rows in bands of about _PNG_BAND_BYTES, as ``mode`` samples with one zero byte
    after each row (Pillow's raw encoder pads rows to the stride it is given). ``make`` turns a
    band of ``im`` and its box into an image of ``mode``."""
    width, height = im.size
    stride = width * _PNG_COLOR_TYPES[mode][1] + 1
    step = max(1, _PNG_BAND_BYTES // stride)
    for top in range(0, height, step):
        box = (0, top, width, min(height, top + step))
        band = im if box == (0, 0, width, height) else im.crop(box)
        yield (make(band, box) if make else band).tobytes("raw", mode, stride)


def _scanlines(bands):
    """PNG scanlines (filter type 0, None, then the row's samples) from padded bands: the zero
    after each row is the next row's filter byte, and the last one is dropped."""
    yield b"\0"
    last = None
    for band in bands:
        if last is not None:
            yield last
        last = memoryview(band)
    if last is not None:
        yield last[:-1]


def _stored_idat_size(raw_size: int) -> int:
    """zlib header, one 5-byte header per stored block, the data, Adler-32."""
    return 2 + 5 * max(1, -(-raw_size // _STORED_BLOCK)) + raw_size + 4


def _write_stored_idat(out, pieces, raw_size: int) -> None:
    """One IDAT chunk holding a zlib stream of stored blocks of ``pieces`` (raw_size bytes)."""
    out.write(struct.pack(">I", _stored_idat_size(raw_size)))
    out.write(b"IDAT")
    crc = zlib.crc32(b"IDAT")

    def put(data):
        nonlocal crc
        out.write(data)
        crc = zlib.crc32(data, crc)

    put(b"\x78\x01")  # deflate, 32 KiB window, no dictionary, "fastest"
    adler, left, in_block = 1, raw_size, 0
    if raw_size == 0:
        put(struct.pack("<BHH", 1, 0, 0xFFFF))
    for piece in pieces:
        view = memoryview(piece)
        adler = zlib.adler32(view, adler)
        pos = 0
        while pos < len(view):
            if in_block == 0:
                in_block = min(_STORED_BLOCK, left)
                put(struct.pack("<BHH", 1 if in_block == left else 0, in_block, in_block ^ 0xFFFF))
            take = min(in_block, len(view) - pos)
            put(view[pos:pos + take])
            pos, in_block, left = pos + take, in_block - take, left - take
    put(struct.pack(">I", adler))
    out.write(struct.pack(">I", crc))


def encode_png(size: tuple, mode: str, bands, *, level: int, chunks=()) -> bytes:
    """An 8-bit PNG of ``mode`` (L, LA or RGB) from ``bands`` (see _padded_bands); zlib ``level``
    0 (stored) to 9. ``chunks``: extra (type, data[, after_idat]) chunks, as in
    PIL.PngImagePlugin.PngInfo.chunks (text, for instance)."""
    width, height = size
    color_type, channels = _PNG_COLOR_TYPES[mode]
    return _png_file(size, color_type, _scanlines(bands), (width * channels + 1) * height, level=level,
                     chunks=chunks)


def stored_png(size: tuple, color_type: int, rows) -> bytes:
    """An 8-bit PNG of colour ``color_type`` whose one IDAT stores ``rows`` (scanlines with their
    filter bytes, whatever the filters) without compression: what png_reader makes of a
    validated upload, in one allocation."""
    return _png_file(size, color_type, (rows,), len(rows), level=0)


def _png_file(size: tuple, color_type: int, scanlines, raw_size: int, *, level: int, chunks=()) -> bytes:
    """The PNG file of ``scanlines`` (raw_size bytes in all, filter bytes included)."""
    width, height = size
    before = [(c[0], c[1]) for c in chunks if not (len(c) > 2 and c[2])]
    after = [(c[0], c[1]) for c in chunks if len(c) > 2 and c[2]]
    out = io.BytesIO()
    if level == 0:  # allocate the whole file once: no growing, no copy in getvalue()
        total = (len(PNG_SIGNATURE) + 12 + 13 + sum(12 + len(d) for _, d in before + after)
                 + 12 + _stored_idat_size(raw_size) + 12)
        out.seek(total - 1)
        out.write(b"\0")
        out.seek(0)
    out.write(PNG_SIGNATURE)
    _png_chunk(out, b"IHDR", struct.pack(">IIBBBBB", width, height, 8, color_type, 0, 0, 0))
    for kind, data in before:
        _png_chunk(out, kind, data)
    if level == 0:
        _write_stored_idat(out, scanlines, raw_size)
    else:
        deflate = zlib.compressobj(level)
        for piece in scanlines:
            data = deflate.compress(piece)
            if data:
                _png_chunk(out, b"IDAT", data)
        _png_chunk(out, b"IDAT", deflate.flush())
    for kind, data in after:
        _png_chunk(out, kind, data)
    _png_chunk(out, b"IEND", b"")
    return out.getvalue()


def png_bytes(im: Image.Image, *, level: int = PNG_COMPRESS_LEVEL, chunks=()) -> bytes:
    """``im`` as a PNG (see encode_png); modes other than L, LA and RGB go through Pillow."""
    if im.mode not in _PNG_COLOR_TYPES or not (im.width and im.height):
        buf = io.BytesIO()
        info = None
        if chunks:
            from PIL.PngImagePlugin import PngInfo
            info = PngInfo()
            for kind, data, *after in chunks:
                info.add(kind, data, bool(after and after[0]))
        im.save(buf, format="PNG", compress_level=level, pnginfo=info)
        return buf.getvalue()
    return encode_png(im.size, im.mode, _padded_bands(im, im.mode), level=level, chunks=chunks)


def comfy_mask_png(keep: Image.Image, paste_weight: Image.Image | None = None) -> bytes:
    """The mask as ComfyUI's mask loaders need it.

    LoadImage's MASK output (and LoadImageMask(channel="alpha")) is 1 - alpha/255, so the alpha
    channel carries the 'keep' luminance: black -> transparent -> mask 1.0 -> inpainted. An opaque
    mask would mask nothing. The file is an LA PNG: A holds ``keep`` (mode L); L holds
    ``paste_weight`` (how much of the input to keep when pasting back, read as L/255 by
    ImageToMask(channel="red") of LoadImage's IMAGE, or LoadImageMask(channel="red")), or ``keep``
    again. It is built a band at a time (Pillow stores LA in 4 bytes per pixel: a whole LA image of
    4096x4096 would be 64 MiB).
    """
    if keep.mode != "L":
        keep = keep.convert("L")
    if paste_weight is None:
        bands = _padded_bands(keep, "LA", lambda band, box: Image.merge("LA", (band, band)))
    else:
        if paste_weight.size != keep.size or paste_weight.mode != "L":
            raise ValueError("paste_weight must be an L image of the mask's size")
        bands = _padded_bands(keep, "LA", lambda band, box: Image.merge(
            "LA", (paste_weight if band is keep else paste_weight.crop(box), band)))
    return encode_png(keep.size, "LA", bands, level=MASK_COMPRESS_LEVEL)
