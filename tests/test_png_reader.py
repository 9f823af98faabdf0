"""png_reader: the one-inflate validation of plain PNG uploads. It must keep every pixel, store
the rows again without compression, and leave every file it does not fully check to Pillow —
whose verdicts (400s, warnings, orientation) must stay exactly as they were."""
import io
import pickle
import struct
import zlib

import pytest
from PIL import Image, PngImagePlugin

from dreamlayer.errors import ApiError
from dreamlayer.img2img import png_reader, uploads
from dreamlayer.img2img.service import Prepared
from images import gradient, png

MAXPIX = 10_000_000
INFLATERS = {"zlib-ng": png_reader.zlib}
try:
    from isal import isal_zlib
    INFLATERS["isal"] = isal_zlib
except ImportError:  # not on this machine's architecture: zlib-ng's alone
    pass


@pytest.fixture(autouse=True, params=sorted(INFLATERS))
def inflater(request, monkeypatch):
    """Every test with each inflate the service may use (ISA-L where installed, zlib-ng else)."""
    monkeypatch.setattr(png_reader, "_inflate_lib", INFLATERS[request.param])
    return request.param


def chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def build(width, height, color, rows: bytes, *, before=(), after=(), idat_size=None, depth=8, interlace=0) -> bytes:
    """A PNG made by hand: IHDR, ``before`` chunks, the zlib stream of ``rows`` in IDATs of
    ``idat_size`` bytes, ``after`` chunks, IEND."""
    stream = zlib.compress(rows, 6)
    size = idat_size or len(stream)
    idats = b"".join(chunk(b"IDAT", stream[i:i + size]) for i in range(0, len(stream), size))
    ihdr = struct.pack(">IIBBBBB", width, height, depth, color, 0, 0, interlace)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + b"".join(chunk(k, b) for k, b in before)
            + idats + b"".join(chunk(k, b) for k, b in after) + chunk(b"IEND", b""))


def noisy_rows(width, height, channels, *, filters=(0, 1, 2, 3, 4)) -> bytes:
    """Rows of varied samples, cycling through every filter type (any bytes unfilter to pixels)."""
    stride = width * channels
    return b"".join(bytes([filters[y % len(filters)]]) + bytes((x * 7 + y * 13) % 256 for x in range(stride))
                    for y in range(height))


def pixels(data: bytes) -> tuple:
    with Image.open(io.BytesIO(data)) as im:
        im.load()
        return im.mode, im.size, im.tobytes()


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L", "LA"])
def test_pillow_written_pngs_are_stored_again_with_every_pixel(mode):
    original = png(gradient(61, 37).convert(mode))
    stored = png_reader.read(original, max_pixels=MAXPIX)
    assert stored is not None and (stored.mode, stored.size) == (mode, (61, 37))
    assert pixels(stored.png) == pixels(original)
    assert len(stored.png) > len(original)  # no compression: ComfyUI inflates nothing


@pytest.mark.parametrize("color,channels", [(0, 1), (2, 3), (4, 2), (6, 4)])
def test_every_filter_type_and_small_idat_chunks_keep_their_pixels(color, channels):
    data = build(23, 10, color, noisy_rows(23, 10, channels), idat_size=17,
                 before=[(b"sRGB", b"\0"), (b"tEXt", b"parameters\0a photo, steps 20")])
    stored = png_reader.read(data, max_pixels=MAXPIX)
    assert stored is not None
    assert pixels(stored.png) == pixels(data)


def fallback_cases():
    rgb = noisy_rows(8, 4, 3)
    exif = Image.Exif()
    exif[0x0112] = 6
    yield "palette", png(gradient(8, 4).convert("P"))
    yield "16-bit grey", png(gradient(8, 4).convert("I;16"))
    yield "tRNS colour key", build(8, 4, 2, rgb, before=[(b"tRNS", b"\0\1\0\2\0\3")])
    yield "eXIf", build(8, 4, 2, rgb, before=[(b"eXIf", exif.tobytes())])
    yield "EXIF in a text chunk", build(8, 4, 2, rgb, before=[(b"tEXt", b"Raw profile type exif\0x")])
    yield "XMP", build(8, 4, 2, rgb, before=[(b"iTXt", b"XML:com.adobe.xmp\0\0\0\0\0<x/>")])
    yield "a chunk after the data", build(8, 4, 2, rgb, after=[(b"tEXt", b"Comment\0late")])
    yield "an unknown chunk", build(8, 4, 2, rgb, before=[(b"prVt", b"1234")])
    yield "interlaced", build(8, 4, 2, rgb, interlace=1)
    yield "bit depth 16", build(4, 4, 2, noisy_rows(8, 4, 3, filters=(0,)), depth=16)
    yield "filter type 5", build(8, 4, 2, rgb[:-25] + b"\5" + rgb[-24:])
    yield "rows missing", build(8, 4, 2, rgb[:-1])
    yield "rows in excess", build(8, 4, 2, rgb + b"\0")
    good = build(8, 4, 2, rgb)
    yield "bytes after IEND", good + b"\0"
    yield "no IEND", good[:-12]
    idat = good.index(b"IDAT")
    bad_crc = bytearray(good)
    bad_crc[idat + 4 + struct.unpack(">I", good[idat - 4:idat])[0]] ^= 1
    yield "a bad CRC", bytes(bad_crc)
    stream = zlib.compress(rgb)
    yield "two zlib streams", (good[:idat - 4] + chunk(b"IDAT", stream + stream) + chunk(b"IEND", b""))
    yield "adler32 wrong", (good[:idat - 4] + chunk(b"IDAT", stream[:-1] + bytes([stream[-1] ^ 1]))
                            + chunk(b"IEND", b""))


@pytest.mark.parametrize("name,data", list(fallback_cases()), ids=[n for n, _ in fallback_cases()])
def test_what_it_does_not_fully_check_is_left_to_pillow(name, data):
    assert png_reader.read(data, max_pixels=MAXPIX) is None


def test_a_bomb_is_inflated_no_further_than_its_announced_rows(monkeypatch, inflater):
    """64 MB of rows behind an 8x4 header (64 KB compressed): the inflate stops one byte past
    the 100 bytes announced, and Pillow judges the file."""
    lib, inflated = INFLATERS[inflater], []

    class Counting:
        error = lib.error

        @staticmethod
        def decompressobj():
            real = lib.decompressobj()

            class Obj:
                def decompress(self, data, max_length):
                    rows = real.decompress(data, max_length)
                    inflated.append(len(rows))
                    return rows

                def __getattr__(self, name):
                    return getattr(real, name)
            return Obj()
    monkeypatch.setattr(png_reader, "_inflate_lib", Counting)
    assert png_reader.read(build(8, 4, 2, bytes(64 << 20)), max_pixels=MAXPIX) is None
    assert inflated == [8 * 4 * 3 + 4 + 1]


def test_more_pixels_than_allowed_is_left_to_pillow_before_any_inflate():
    data = build(8, 4, 2, noisy_rows(8, 4, 3))
    assert png_reader.read(data, max_pixels=31) is None
    assert png_reader.read(data, max_pixels=32) is not None


@pytest.mark.parametrize("name,data", [case for case in fallback_cases()
                                       if case[0] in ("filter type 5", "rows missing", "a bad CRC", "adler32 wrong")])
def test_corrupt_pngs_are_still_rejected_by_the_service(name, data):
    with pytest.raises(ApiError) as info:
        uploads.decode_image(data, max_pixels=MAXPIX)
    assert (info.value.status, info.value.code) == (400, "invalid_image")


def test_an_rgb_png_comes_with_its_stored_rows_for_comfyui():
    original = png(gradient(64, 48))
    decoded = uploads.decode_image(original, max_pixels=MAXPIX)
    assert decoded.png == png_reader.read(original, max_pixels=MAXPIX).png
    assert (decoded.image.mode, decoded.image.size) == ("RGB", (64, 48))
    assert decoded.image.tobytes() == Image.open(io.BytesIO(original)).convert("RGB").tobytes()


def test_converted_or_oriented_uploads_carry_no_stored_png():
    rgba = uploads.decode_image(png(gradient(16, 8).convert("RGBA")), max_pixels=MAXPIX)
    assert rgba.png is None and rgba.image.mode == "RGB"
    exif = Image.Exif()
    exif[0x0112] = 6  # turned 90 degrees: the service applies it
    turned = uploads.decode_image(build(8, 4, 2, noisy_rows(8, 4, 3), before=[(b"eXIf", exif.tobytes())]),
                                  max_pixels=MAXPIX)
    assert turned.png is None and turned.image.size == (4, 8)


def test_text_chunks_of_comfyui_and_a1111_outputs_keep_the_fast_way():
    info = PngImagePlugin.PngInfo()
    info.add_text("prompt", '{"3": {"class_type": "KSampler"}}')
    info.add_text("parameters", "a photo\nSteps: 20, Sampler: Euler a")
    decoded = uploads.decode_image(png(gradient(16, 8), pnginfo=info), max_pixels=MAXPIX)
    assert decoded.png is not None and decoded.warnings == []


def test_a_job_pickled_for_redis_carries_the_stored_png_not_the_pixels():
    original = png(gradient(32, 16))
    decoded = uploads.decode_image(original, max_pixels=MAXPIX)
    job = Prepared(None, decoded.image, None, [], None, [], decoded.png)
    data = pickle.dumps(job)
    assert len(data) < len(decoded.png) + 1000  # one copy of the rows (1.5 KB), no pixels beside it
    back = pickle.loads(data)
    assert back.image_png == decoded.png
    assert back.image.tobytes() == Image.open(io.BytesIO(original)).convert("RGB").tobytes()


def test_a_job_without_a_stored_png_pickles_its_pixels():
    decoded = uploads.decode_image(png(gradient(32, 16).convert("RGBA")), max_pixels=MAXPIX)
    job = Prepared(None, decoded.image, None, [], None, [], decoded.png)
    back = pickle.loads(pickle.dumps(job))
    assert back.image_png is None and back.image.tobytes() == decoded.image.tobytes()


def test_the_service_hands_comfyui_the_stored_rows_only_when_the_image_is_unchanged(app):
    from dreamlayer.img2img import inpainting
    from dreamlayer.img2img.png_writer import png_bytes
    from dreamlayer.img2img.service import Img2ImgRequest
    service = app.extensions["img2img"]

    def image_file(upload, **params):
        job = service.prepare(Img2ImgRequest(upload, None, {"prompt": "p", "steps": 2, **params}))
        return job, service._input_files(job, *inpainting.prepare(job.image, job.keep, job.plan)).image

    upload = png(gradient(64, 48))
    job, sent = image_file(upload)
    assert sent == job.image_png == png_reader.read(upload, max_pixels=MAXPIX).png
    # padded to a multiple of 8, or outpainted: ComfyUI gets the new pixels, written by the service
    for upload, params in ((png(gradient(61, 37)), {}), (upload, {"outpaint": {"left": 8}})):
        job, sent = image_file(upload, **params)
        assert sent != png_reader.read(upload, max_pixels=MAXPIX).png
        gen = inpainting.prepare(job.image, None, job.plan)[0]
        assert sent == png_bytes(gen) and pixels(sent)[1] == gen.size


def test_a_prepared_job_holds_no_lazy_image_but_its_own(app):
    """The Redis store pickles a job in a writer thread while the request's thread runs it: only
    ``image``, which travels as its stored PNG, may still be undecoded; a ControlNet unit's image
    is decoded in prepare() (two threads loading one lazy image would race)."""
    import base64
    from dreamlayer.img2img.service import Img2ImgRequest
    hint = "data:image/png;base64," + base64.b64encode(png(gradient(32, 24))).decode()
    params = {"prompt": "p", "steps": 2, "controlnet": {"enabled": True, "units": [
        {"enabled": True, "model": "tiny-controlnet-random.safetensors", "preprocessor": "none", "input_image": hint}]}}
    job = app.extensions["img2img"].prepare(Img2ImgRequest(png(gradient(64, 48)), png(gradient(64, 48).convert("L")),
                                                           params))
    (control,) = job.control_images
    assert job.image_png is not None and job.image.tile  # still lazy: never decoded so far
    assert control.tile == [] and job.keep.tile == []  # decoded


def test_a_files_png_header_gives_its_size_or_nothing(tmp_path):
    good = png(gradient(40, 30))
    ihdr_crc = good.index(b"IHDR") + 17
    for name, data, size in [
        ("good", good, (40, 30)),
        ("jpeg", _jpeg(), None),
        ("truncated header", good[:30], None),
        ("IHDR CRC wrong", good[:ihdr_crc] + bytes([good[ihdr_crc] ^ 1]) + good[ihdr_crc + 1:], None),
        ("another first chunk", good[:12] + b"tEXt" + good[16:], None),
        ("zero width", build(0, 4, 2, b""), None),
    ]:
        (tmp_path / name).write_bytes(data)
        assert png_reader.file_size(tmp_path / name) == size, name
    assert png_reader.file_size(tmp_path / "missing") is None


def _jpeg() -> bytes:
    buf = io.BytesIO()
    gradient(40, 30).save(buf, format="JPEG")
    return buf.getvalue()
