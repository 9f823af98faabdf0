"""uploads.decode_base64_image: the fast path (ASCII, unbroken, padded) and the tolerant one give
the same answers as before."""
from __future__ import annotations

import base64

import pytest

import uploads
from errors import ApiError
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
