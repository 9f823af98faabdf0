"""A request with a mask plans on a side thread while its own thread decodes the image
(dreamlayer/img2img/side_work.py): the same result, the same errors in the same order, whether
the side thread is used, busy, or planned for a size the decoded image does not have."""
from __future__ import annotations

import io
import json
import struct
import threading
import zlib

import pytest
from PIL import Image

from dreamlayer.img2img import uploads
from dreamlayer.img2img.service import Img2ImgRequest
from dreamlayer.img2img.side_work import SideWork, side_work
from images import box_mask, encode, gradient, png

MAXPIX = 10_000_000
PARAMS = {"prompt": "p", "steps": 2, "seed": 3, "mask_blur": 4}


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _exif(orientation: int) -> Image.Exif:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return exif


def early_exif_png(im, orientation):
    """Pillow writes eXIf before the pixels: the header tells the orientation."""
    return png(im, exif=_exif(orientation))


def late_exif_png(im, orientation):
    """eXIf after the pixels (PNG allows it): only decoding finds the orientation."""
    plain = png(im)
    return plain[:-12] + _chunk(b"eXIf", _exif(orientation).tobytes()) + plain[-12:]


@pytest.mark.parametrize("make,size", [
    (lambda: png(gradient(40, 24)), (40, 24)),
    (lambda: encode(gradient(40, 24), "JPEG", exif=_exif(6).tobytes()), (24, 40)),
    (lambda: encode(gradient(40, 24), "JPEG", exif=_exif(3).tobytes()), (40, 24)),
    (lambda: encode(gradient(40, 24), "WEBP", exif=_exif(8).tobytes()), (24, 40)),
    (lambda: early_exif_png(gradient(40, 24), 5), (24, 40)),
    (lambda: late_exif_png(gradient(40, 24), 6), (40, 24)),  # a guess: the decoded size is (24, 40)
])
def test_upright_size_reads_the_header(make, size):
    assert uploads.upright_size(make(), max_pixels=MAXPIX) == size


@pytest.mark.parametrize("data", [b"", b"not an image", png(gradient(40, 24))[:30],
                                  encode(gradient(8, 8), "GIF"), png(gradient(400, 300))])
def test_upright_size_is_none_for_what_the_decoding_will_reject(data):
    assert uploads.upright_size(data, max_pixels=100_000) is None


def test_side_work_is_handed_over_only_to_an_idle_thread():
    work = SideWork(1)
    release = threading.Event()
    busy = work.submit(release.wait, 30)
    assert busy is not None
    assert work.submit(lambda: 1) is None  # the only thread is busy: the caller does it itself
    release.set()
    assert busy.result(timeout=30) is True
    done = threading.Event()
    busy.add_done_callback(lambda _: done.set())  # runs after the thread was given back
    assert done.wait(30)
    assert work.submit(lambda: 2).result(timeout=30) == 2


def _prepare(app, image, mask, params=PARAMS):
    return app.extensions["img2img"].prepare(Img2ImgRequest(image, mask, dict(params)))


def _same(a, b):
    assert a.image.size == b.image.size and a.image.tobytes() == b.image.tobytes()
    assert a.keep.tobytes() == b.keep.tobytes() and a.plan == b.plan
    assert a.mask_file == b.mask_file and a.warnings == b.warnings and a.params == b.params


def _all_side_threads_busy():
    """Occupy every side thread; returns the event that frees them."""
    release, work = threading.Event(), side_work()
    while work.submit(release.wait, 60) is not None:
        pass
    return release


def test_side_thread_busy_or_idle_and_a_late_exif_turn_prepare_the_same(app, fake_comfy):
    """A 48x32 photo turned upright to 32x48 by its EXIF, with an upright mask: planned beside the
    decoding (orientation in the header), planned again after it (orientation after the pixels:
    the side thread planned for 48x32), and planned inline (no idle side thread)."""
    mask = png(box_mask((32, 48), (8, 10, 24, 30)))
    beside = _prepare(app, early_exif_png(gradient(48, 32), 6), mask)
    assert beside.image.size == beside.keep.size == (32, 48)
    assert not [w for w in beside.warnings if "resized" in w]
    assert beside.mask_file is not None and Image.open(io.BytesIO(beside.mask_file)).size == (32, 48)
    again = _prepare(app, late_exif_png(gradient(48, 32), 6), mask)
    _same(again, beside)
    release = _all_side_threads_busy()
    try:
        inline = _prepare(app, early_exif_png(gradient(48, 32), 6), mask)
    finally:
        release.set()
    _same(inline, beside)


@pytest.mark.parametrize("busy", [False, True])
@pytest.mark.parametrize("image_ok,mask_ok,params,code", [
    (False, False, {"model_name": "nope.safetensors"}, "invalid_image"),  # the image's error first
    (False, True, {}, "invalid_image"),
    (True, False, {"model_name": "nope.safetensors"}, "mask_empty"),  # then the mask's
    (True, True, {"model_name": "nope.safetensors"}, "unknown_model"),  # then the names'
    (True, True, {"outpaint": {"left": 8}, "width": 100}, "unsupported_combination"),
])
def test_errors_come_in_the_same_order(client, fake_comfy, busy, image_ok, mask_ok, params, code):
    image = png(gradient(48, 32)) if image_ok else png(gradient(48, 32))[:-40]
    mask = png(box_mask((48, 32), (8, 8, 20, 20)) if mask_ok else Image.new("L", (48, 32), 255))
    release = _all_side_threads_busy() if busy else None
    try:
        resp = client.post("/api/img2img", data={
            "params": json.dumps({**PARAMS, **params}),
            "image": (io.BytesIO(image), "i.png"), "mask": (io.BytesIO(mask), "m.png")},
            content_type="multipart/form-data")
    finally:
        if release is not None:
            release.set()
    body = resp.get_json()
    assert resp.status_code == 400 and body["code"] == code, body
    assert fake_comfy.prompts == [] and [p for p in fake_comfy.input_dir.rglob("*") if p.is_file()] == []
