"""Upload decoding: formats by content, bombs, EXIF, animation, bit depths, mask semantics."""
import base64
import io
import struct
import zlib

import pytest
from PIL import Image

from dreamlayer.img2img import png_writer, uploads
from dreamlayer.errors import ApiError
from images import box_mask, encode, gradient, png

MAXPIX = 10_000_000


def err(fn, *a, **kw) -> ApiError:
    with pytest.raises(ApiError) as info:
        fn(*a, **kw)
    return info.value


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP"])
def test_accepted_formats_decode_to_rgb(fmt):
    d = uploads.decode_image(encode(gradient(40, 30), fmt), max_pixels=MAXPIX)
    assert d.image.mode == "RGB" and d.image.size == (40, 30)
    assert d.warnings == []


def test_gif_is_rejected_by_content_not_name():
    e = err(uploads.decode_image, encode(gradient(), "GIF"), max_pixels=MAXPIX)
    assert (e.status, e.code) == (415, "unsupported_image_type")


def test_not_an_image():
    e = err(uploads.decode_image, b"hello, I am text", max_pixels=MAXPIX)
    assert (e.status, e.code) == (400, "invalid_image")


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_truncated_files_are_rejected(fmt):
    data = encode(gradient(64, 64), fmt)
    e = err(uploads.decode_image, data[: len(data) // 2], max_pixels=MAXPIX)
    assert (e.status, e.code) == (400, "invalid_image")


def test_png_with_bad_crc_is_rejected():
    data = bytearray(png(gradient()))
    idat = data.index(b"IDAT")
    length = struct.unpack(">I", data[idat - 4: idat])[0]
    crc_at = idat + 4 + length
    data[crc_at] ^= 0xFF
    e = err(uploads.decode_image, bytes(data), max_pixels=MAXPIX)
    assert e.code == "invalid_image"


def _png_header_only(width, height) -> bytes:
    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return uploads.PNG_SIGNATURE + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 10)) + chunk(b"IEND", b"")


def test_decompression_bomb_rejected_before_decoding():
    e = err(uploads.decode_image, _png_header_only(50000, 50000), max_pixels=MAXPIX)
    assert (e.status, e.code) == (413, "image_too_large")
    assert "limit" in e.message


def test_exif_orientation_is_applied():
    im = gradient(40, 20)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise when displayed
    d = uploads.decode_image(encode(im, "JPEG", exif=exif.tobytes(), quality=95), max_pixels=MAXPIX)
    assert d.image.size == (20, 40)


def test_animated_png_uses_first_frame_with_warning():
    frames = [Image.new("RGB", (16, 16), c) for c in ("red", "blue")]
    buf = io.BytesIO()
    frames[0].save(buf, format="PNG", save_all=True, append_images=frames[1:])
    d = uploads.decode_image(buf.getvalue(), max_pixels=MAXPIX)
    assert d.image.getpixel((0, 0)) == (255, 0, 0)
    assert any("animated" in w for w in d.warnings)


def test_sixteen_bit_png_is_scaled_not_clipped():
    im = Image.new("I;16", (8, 8), 32896)  # 128 * 257
    d = uploads.decode_image(png(im), max_pixels=MAXPIX)
    assert d.image.getpixel((0, 0)) == (128, 128, 128)


@pytest.mark.parametrize("mode", ["P", "LA", "CMYK", "L", "RGBA"])
def test_other_modes_become_rgb(mode):
    im = gradient(16, 16).convert(mode)
    fmt = "JPEG" if mode == "CMYK" else "PNG"
    d = uploads.decode_image(encode(im, fmt), max_pixels=MAXPIX)
    assert d.image.mode == "RGB" and d.image.size == (16, 16)


# --- masks ---------------------------------------------------------------------------------

def test_mask_must_be_png_by_signature():
    jpeg = encode(box_mask((16, 16), (0, 0, 8, 8)).convert("RGB"), "JPEG")
    e = err(uploads.decode_mask, jpeg, size=(16, 16), max_bytes=10 << 20, max_pixels=MAXPIX)
    assert (e.status, e.code) == (415, "mask_not_png")


def test_mask_size_limit_counts_received_bytes():
    data = png(box_mask((16, 16), (0, 0, 8, 8)))
    uploads.decode_mask(data, size=(16, 16), max_bytes=len(data), max_pixels=MAXPIX)
    e = err(uploads.decode_mask, data, size=(16, 16), max_bytes=len(data) - 1, max_pixels=MAXPIX)
    assert (e.status, e.code) == (413, "mask_too_large")


def test_all_white_mask_is_empty():
    e = err(uploads.decode_mask, png(Image.new("L", (16, 16), 255)), size=(16, 16), max_bytes=1 << 20,
            max_pixels=MAXPIX)
    assert (e.status, e.code) == (400, "mask_empty")


def test_transparent_pixels_count_as_keep():
    im = Image.new("RGBA", (16, 16), (0, 0, 0, 0))  # black but fully transparent: keep
    im.paste((0, 0, 0, 255), (0, 0, 4, 4))  # opaque black: inpaint
    keep = uploads.decode_mask(png(im), size=(16, 16), max_bytes=1 << 20, max_pixels=MAXPIX).image
    assert keep.getpixel((1, 1)) == 0 and keep.getpixel((10, 10)) == 255


def test_palette_and_16bit_masks():
    pal = box_mask((16, 16), (0, 0, 8, 8)).convert("P")
    keep = uploads.decode_mask(png(pal), size=(16, 16), max_bytes=1 << 20, max_pixels=MAXPIX).image
    assert keep.getpixel((2, 2)) == 0 and keep.getpixel((12, 12)) == 255
    i16 = Image.new("I;16", (16, 16), 65535)
    i16.paste(0, (0, 0, 8, 8))
    i16.paste(32896, (8, 8, 16, 16))
    keep = uploads.decode_mask(png(i16), size=(16, 16), max_bytes=1 << 20, max_pixels=MAXPIX).image
    assert (keep.getpixel((2, 2)), keep.getpixel((12, 12)), keep.getpixel((12, 2))) == (0, 128, 255)


def test_mask_of_other_size_is_resized_with_warning():
    d = uploads.decode_mask(png(box_mask((32, 8), (0, 0, 16, 8))), size=(16, 16), max_bytes=1 << 20,
                            max_pixels=MAXPIX)
    assert d.image.size == (16, 16)
    assert any("resized" in w and "aspect ratio" in w for w in d.warnings)


def test_comfy_mask_png_carries_keep_in_alpha():
    """LoadImageMask(channel="alpha") yields 1 - A/255: black (inpaint) must be transparent."""
    keep = box_mask((16, 16), (0, 0, 8, 8))
    out = Image.open(io.BytesIO(png_writer.comfy_mask_png(keep)))
    alpha = out.convert("RGBA").getchannel("A")
    assert alpha.getpixel((2, 2)) == 0 and alpha.getpixel((12, 12)) == 255


# --- base64 --------------------------------------------------------------------------------

def test_base64_and_data_urls():
    data = png(gradient(8, 8))
    b64 = base64.b64encode(data).decode()
    assert uploads.decode_base64_image(b64, "input_image") == data
    assert uploads.decode_base64_image("data:image/png;base64," + b64, "input_image") == data
    assert uploads.decode_base64_image(b64[:40] + "\n" + b64[40:], "input_image") == data


@pytest.mark.parametrize("value,status,code", [
    ("not base64 at all!!", 400, "invalid_base64"),
    ("data:text/plain;base64,aGVsbG8=", 415, "unsupported_media_type"),
    ("data:image/png,rawdata", 400, "invalid_base64"),
    (12345, 400, "invalid_parameter"),
])
def test_bad_base64(value, status, code):
    e = err(uploads.decode_base64_image, value, "input_image")
    assert (e.status, e.code) == (status, code)


def test_mask_data_url_must_be_png():
    e = err(uploads.decode_base64_image, "data:image/jpeg;base64,aGVsbG8=", "mask_image", mask=True)
    assert e.status == 415
