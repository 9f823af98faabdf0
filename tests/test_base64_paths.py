"""uploads.decode_base64_image: the fast path (ASCII, unbroken, padded) and the tolerant one give
the same answers as before."""
from __future__ import annotations

import base64

import pytest

from dreamlayer.img2img import uploads
from dreamlayer.errors import ApiError
from images import gradient, png

DATA = png(gradient(9, 7))
B64 = base64.b64encode(DATA).decode()


@pytest.mark.parametrize("value", [
    B64,
    "  " + B64 + "\n",
    "data:image/png;base64," + B64,
    "data:image/png;name=é.png;base64," + B64,        # non-ASCII parameter before the comma
    "data:image/png;base64," + B64[:30] + "\r\n" + B64[30:],
    B64.rstrip("="),                                   # padding left out
])
def test_decodes(value):
    assert uploads.decode_base64_image(value, "input_image") == DATA


@pytest.mark.parametrize("value,code", [
    (B64[:20] + "é" + B64[20:], "invalid_base64"),
    (B64[:20] + "*" + B64[20:], "invalid_base64"),
    ("data:image/png;base64,", "missing_image"),
    ("   ", "missing_image"),
])
def test_rejects(value, code):
    with pytest.raises(ApiError) as info:
        uploads.decode_base64_image(value, "input_image")
    assert info.value.code == code


STRICTNESS_CASES = [b"QQ==", b"QQ==QQ==", b"QQ=", b"Q", b"QUJD", b"QU JD", b"QUJD\n", b"=QUJD", b"QU=D",
                    b"QUJ\x80", b"QQ==\n", b"", b"QUJDRA", b"QUJDRA==", b"QUJDRA=", b"Q===", b"QUJD====",
                    b"-_-_", b"+/+/", B64.encode(), B64.encode()[:-1]]


@pytest.mark.parametrize("data", STRICTNESS_CASES)
def test_the_fast_decoder_gives_the_standard_librarys_answers(data, monkeypatch):
    """Same bytes or same error code with pybase64 as with binascii (where pybase64's strict pass
    refuses what binascii's takes, e.g. padding after a full quantum, the tolerant pass decides)."""
    def outcome():
        try:
            return uploads.decode_base64_image("data:image/png;base64," + data.decode("latin-1"), "input_image")
        except ApiError as exc:
            return exc.code

    assert uploads.pybase64 is not None  # requirements.txt installs it
    fast = outcome()
    monkeypatch.setattr(uploads, "pybase64", None)
    assert outcome() == fast


@pytest.mark.parametrize("value", ["data:image/png;base64," + B64, B64.rstrip("=")])
def test_decodes_without_pybase64_too(value, monkeypatch):
    monkeypatch.setattr(uploads, "pybase64", None)
    assert uploads.decode_base64_image(value, "input_image") == DATA
