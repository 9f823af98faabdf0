"""The service's own PNG writer (png_writer.encode_png / png_bytes / comfy_mask_png): valid files,
every pixel as given, text chunks kept, any size (several bands included)."""
from __future__ import annotations

import io
import zlib

import pytest
from PIL import Image, ImageOps, PngImagePlugin

from dreamlayer.img2img import inpainting
from dreamlayer.img2img import png_writer
from images import box_mask, gradient, png


def noisy(mode: str, size: tuple) -> Image.Image:
    """Every byte different from its neighbours, so a misplaced row or sample shows."""
    channels = len(mode)
    data = bytes((i * 131 + (i // 7) * 17) % 256 for i in range(size[0] * size[1] * channels))
    return Image.frombytes(mode, size, data)


def reopen(data: bytes) -> Image.Image:
    check = Image.open(io.BytesIO(data))
    check.verify()  # signature, chunk order and every CRC
    im = Image.open(io.BytesIO(data))
    im.load()
    return im


@pytest.mark.parametrize("mode", ["L", "LA", "RGB", "RGBA"])
@pytest.mark.parametrize("size", [(1, 1), (7, 3), (64, 48)])
def test_round_trip(mode, size):
    src = noisy(mode, size)
    out = reopen(png_writer.png_bytes(src))
    assert out.mode == mode and out.size == size
    assert out.tobytes() == src.tobytes()


def test_several_bands_and_levels(monkeypatch):
    monkeypatch.setattr(png_writer, "_PNG_BAND_BYTES", 1000)  # 1000 // (3*101 + 1) = 3 rows per band
    src = noisy("RGB", (101, 50))
    for level in (0, 1, 9):
        assert reopen(png_writer.png_bytes(src, level=level)).tobytes() == src.tobytes()


def test_stored_blocks_across_bands(monkeypatch):
    """Stored deflate blocks (at most 65535 bytes) and bands of rows do not line up."""
    monkeypatch.setattr(png_writer, "_PNG_BAND_BYTES", 50_000)
    src = noisy("RGB", (300, 290))  # 261,290 bytes of scanlines: 4 blocks, 6 bands
    data = png_writer.png_bytes(src, level=0)
    assert reopen(data).tobytes() == src.tobytes()
    assert len(data) == 8 + 25 + 12 + png_writer._stored_idat_size(261_290) + 12


def test_zlib_ng_and_the_standard_zlib_write_the_same_images(monkeypatch):
    """zlib-ng (requirements.txt) writes the files; the standard library's zlib, the fallback,
    gives the same pixels (stored images: the same bytes; deflated masks may differ in bytes)."""
    assert png_writer.zlib.__name__ == "zlib_ng.zlib_ng"  # installed: the fast one is used
    keep = noisy("L", (70, 40))
    weight = ImageOps.invert(keep)
    image = noisy("RGB", (70, 40))
    fast = png_writer.png_bytes(image), png_writer.comfy_mask_png(keep, weight), png_writer.png_bytes(image, level=6)
    monkeypatch.setattr(png_writer, "zlib", zlib)
    plain = png_writer.png_bytes(image), png_writer.comfy_mask_png(keep, weight), png_writer.png_bytes(image, level=6)
    assert fast[0] == plain[0]
    for a, b in zip(fast[1:], plain[1:]):
        assert reopen(a).tobytes() == reopen(b).tobytes()
    assert reopen(fast[1]).tobytes() == Image.merge("LA", (weight, keep)).tobytes()


def test_chunks_after_idat():
    data = png_writer.png_bytes(gradient(4, 4), chunks=[(b"prVt", b"abc", True), (b"tEXt", b"k\0v")])
    assert data.index(b"prVt") > data.index(b"IDAT") > data.index(b"tEXt")
    assert reopen(data).text == {"k": "v"}


def test_stored_by_default_and_unfiltered():
    src = gradient(32, 16)
    data = png_writer.png_bytes(src)
    im = Image.open(io.BytesIO(data))
    assert im.format == "PNG"
    pos, raw = 8, b""
    while pos < len(data):  # collect the IDAT stream: rows with filter byte 0, samples unchanged
        length = int.from_bytes(data[pos:pos + 4], "big")
        if data[pos + 4:pos + 8] == b"IDAT":
            raw += data[pos + 8:pos + 8 + length]
        pos += 12 + length
    rows = zlib.decompress(raw)
    stride = 32 * 3
    assert all(rows[r * (stride + 1)] == 0 for r in range(16))
    assert len(raw) > len(rows)  # stored, not deflated


def test_other_modes_go_through_pillow():
    for im in (Image.new("P", (5, 5), 3), Image.new("1", (9, 2), 1), Image.new("I;16", (4, 4), 40000)):
        out = reopen(png_writer.png_bytes(im))
        assert out.size == im.size


def test_text_chunks_are_written():
    info = PngImagePlugin.PngInfo()
    info.add_text("prompt", '{"1": {"class_type": "SaveImage"}}')
    info.add_text("note", "ünïcode ✓")  # not latin-1: an iTXt chunk
    out = reopen(png_writer.png_bytes(gradient(8, 8), chunks=info.chunks))
    assert out.text == {"prompt": '{"1": {"class_type": "SaveImage"}}', "note": "ünïcode ✓"}


def test_comfy_mask_png_has_keep_in_luminance_and_alpha():
    keep = noisy("L", (33, 20))
    out = reopen(png_writer.comfy_mask_png(keep))
    assert out.mode == "LA"
    assert out.getchannel("L").tobytes() == keep.tobytes()
    assert out.getchannel("A").tobytes() == keep.tobytes()


@pytest.mark.parametrize("size", [(33, 20), (700, 2000)])  # one band, and several bands of 1 MiB
def test_comfy_mask_png_can_carry_the_paste_weight_in_luminance(size):
    keep = noisy("L", size)
    weight = Image.eval(keep, lambda v: (v * 7 + 3) % 256)
    out = reopen(png_writer.comfy_mask_png(keep, weight))
    assert out.mode == "LA"
    assert out.getchannel("L").tobytes() == weight.tobytes()
    assert out.getchannel("A").tobytes() == keep.tobytes()
    # what ComfyUI's LoadImageMask reads: RGBA conversion, red = L
    assert out.convert("RGBA").getchannel("R").tobytes() == weight.tobytes()


def test_comfy_mask_png_rejects_a_weight_of_another_size():
    with pytest.raises(ValueError):
        png_writer.comfy_mask_png(noisy("L", (8, 8)), noisy("L", (8, 9)))


def test_paste_weight_is_the_inverse_paste_mask_padded_with_keep():
    keep = box_mask((101, 77), (30, 20, 70, 55))
    plan = inpainting.plan(keep.size, keep, mask_blur=3)
    weight = inpainting.paste_weight(keep, plan)
    assert weight.size == plan.padded_size == (104, 80)
    inner = weight.crop((0, 0, 101, 77))
    assert inner.tobytes() == ImageOps.invert(inpainting.paste_mask(keep, 3)).tobytes()
    assert weight.crop((101, 0, 104, 80)).getextrema() == (255, 255)
    assert weight.crop((0, 77, 104, 80)).getextrema() == (255, 255)


def test_finish_png_keeps_text_and_pixels():
    original = gradient(64, 48)
    keep = box_mask((64, 48), (8, 8, 24, 24))
    plan = inpainting.plan(original.size, keep, mask_blur=0)
    generated = Image.new("RGB", plan.padded_size, (200, 10, 10))
    info = PngImagePlugin.PngInfo()
    info.add_text("prompt", "{}")
    out = reopen(inpainting.finish_png(png(generated, pnginfo=info), original, keep, plan))
    assert out.text == {"prompt": "{}"}
    assert out.tobytes() == inpainting.finish(generated, original, keep, plan).tobytes()
