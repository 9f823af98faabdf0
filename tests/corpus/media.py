"""Odd and broken image files, made with Pillow (and a few byte patches) at test time.

Every factory returns the bytes of one file; none is committed as a binary. Solid colours and
stripes are used where a test checks pixels after the service has decoded the file.
"""
from __future__ import annotations

import io
import struct
import zlib

from PIL import Image

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

RED, GREEN, BLUE = (220, 30, 40), (30, 200, 60), (40, 50, 230)


def encode(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt, **kw)
    return buf.getvalue()


def png(im: Image.Image, **kw) -> bytes:
    return encode(im, "PNG", **kw)


def solid(size=(32, 32), colour=RED, mode="RGB") -> Image.Image:
    return Image.new(mode, size, colour)


def stripes(colours, size=(48, 32), mode="RGB") -> Image.Image:
    """Vertical stripes of equal width, one per colour (left to right)."""
    im = Image.new(mode, size)
    w = size[0] // len(colours)
    for i, c in enumerate(colours):
        im.paste(c, (i * w, 0, size[0] if i == len(colours) - 1 else (i + 1) * w, size[1]))
    return im


def keep_mask(size, box, *, mode="L") -> Image.Image:
    """White (keep) everywhere, black (inpaint) inside box = (left, top, right, bottom)."""
    im = Image.new("L", size, 255)
    im.paste(0, box)
    return im if mode == "L" else im.convert(mode)


# --- PNG chunk surgery -------------------------------------------------------------------------

def chunk(kind: bytes, body: bytes, *, crc: int | None = None) -> bytes:
    crc = zlib.crc32(kind + body) if crc is None else crc
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", crc & 0xFFFFFFFF)


def png_chunks(data: bytes):
    """(kind, body) of every chunk of a PNG."""
    pos, out = len(PNG_SIGNATURE), []
    while pos < len(data):
        length = struct.unpack(">I", data[pos:pos + 4])[0]
        out.append((data[pos + 4:pos + 8], data[pos + 8:pos + 8 + length]))
        pos += 12 + length
    return out


def png_with_bad_crc(im: Image.Image) -> bytes:
    """A PNG whose IDAT checksum is wrong (the pixels themselves are intact)."""
    parts = [PNG_SIGNATURE]
    for kind, body in png_chunks(png(im)):
        parts.append(chunk(kind, body, crc=zlib.crc32(kind + body) ^ 0x5A5A5A5A) if kind == b"IDAT"
                     else chunk(kind, body))
    return b"".join(parts)


def png_insert_before_iend(im: Image.Image, extra: bytes) -> bytes:
    data = png(im)
    iend = data.rindex(b"IEND") - 4
    return data[:iend] + extra + data[iend:]


def png_declaring(width: int, height: int, *, mode_byte=2) -> bytes:
    """A tiny PNG file whose header declares width x height pixels (a decompression bomb)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, mode_byte, 0, 0, 0)
    return (PNG_SIGNATURE + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
            + chunk(b"IEND", b""))


def jpeg_declaring(width: int, height: int) -> bytes:
    """A small JPEG whose SOF header is patched to declare width x height pixels."""
    data = bytearray(encode(solid((16, 16)), "JPEG"))
    sof = data.index(b"\xff\xc0")
    data[sof + 5:sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def truncated(data: bytes, keep: float = 0.5) -> bytes:
    return data[: int(len(data) * keep)]


# --- formats and modes ---------------------------------------------------------------------------

def apng(colours=(RED, BLUE), size=(32, 32)) -> bytes:
    frames = [solid(size, c) for c in colours]
    return encode(frames[0], "PNG", save_all=True, append_images=frames[1:], duration=100, loop=0)


def animated_gif(colours=(RED, BLUE), size=(32, 32)) -> bytes:
    frames = [solid(size, c) for c in colours]
    return encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)


def sixteen_bit_grey(values=(0, 128 * 257, 65535), size=(48, 32)) -> bytes:
    """An I;16 PNG of vertical stripes; 8-bit equivalents are value / 257."""
    return png(stripes(values, size, mode="I;16"))


def palette(colours=(RED, GREEN, BLUE), size=(48, 32)) -> bytes:
    im = stripes(colours, size).quantize(colors=len(colours), dither=Image.Dither.NONE)
    assert im.mode == "P"
    return png(im)


def grey_alpha(grey=(40, 200), size=(32, 32)) -> bytes:
    """An LA PNG: left half grey[0], right half grey[1], half transparent everywhere."""
    im = Image.merge("LA", (stripes(grey, size, mode="L"), Image.new("L", size, 128)))
    return png(im)


def cmyk_jpeg(colour=GREEN, size=(32, 32)) -> bytes:
    return encode(solid(size, colour).convert("CMYK"), "JPEG", quality=95)


def exif_rotated_jpeg(orientation=6, size=(40, 24), colours=(RED, BLUE)) -> bytes:
    """Stored as size with colours as left/right halves; orientation 6 = rotate 90° clockwise to
    display, so the displayed image is (h, w) with colours[0] on top."""
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encode(stripes(colours, size), "JPEG", exif=exif.tobytes(), quality=95)


def png_with_garbage_exif(im: Image.Image) -> bytes:
    """A valid PNG carrying an eXIf chunk that is not EXIF at all."""
    return png_insert_before_iend(im, chunk(b"eXIf", b"this is not a TIFF header at all"))


def padded(data: bytes, total: int) -> bytes:
    """``data`` followed by zero bytes up to ``total`` bytes (trailing data after a PNG's IEND)."""
    assert len(data) <= total
    return data + b"\0" * (total - len(data))


def multipart(parts, boundary: str = "corpus-boundary-7f3a") -> tuple:
    """(content_type, body) of a multipart/form-data body built byte by byte.

    parts: (name, data, filename, content_type) tuples; filename None = a plain field; a bytes
    filename is written as is (NUL bytes, raw UTF-8); a str one is UTF-8 encoded.
    """
    out = bytearray()
    for name, data, filename, ctype in parts:
        out += b"--" + boundary.encode() + b"\r\n"
        out += b'Content-Disposition: form-data; name="' + name.encode() + b'"'
        if filename is not None:
            out += b'; filename="' + (filename if isinstance(filename, bytes) else filename.encode()) + b'"'
        out += b"\r\n"
        if ctype:
            out += b"Content-Type: " + ctype.encode() + b"\r\n"
        out += b"\r\n" + (data if isinstance(data, bytes) else data.encode()) + b"\r\n"
    out += b"--" + boundary.encode() + b"--\r\n"
    return f"multipart/form-data; boundary={boundary}", bytes(out)
