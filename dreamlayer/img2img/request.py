"""Reading an img2img request (multipart or JSON) into raw bytes and a parameter object.

Nothing from the client reaches the filesystem here: file names and declared types of the
parts are ignored; sizes are checked on the bytes actually received.
"""
from __future__ import annotations

import codecs
import json
import re

from flask import Request
from werkzeug.formparser import FormDataParser, MultiPartParser

from dreamlayer.errors import BadRequest, PayloadTooLarge, UnsupportedMediaType
from dreamlayer.img2img.service import Img2ImgRequest
from dreamlayer.img2img.uploads import decode_base64_image


def _loads(text, what: str, code: str):
    """json.loads that answers 400 for anything it cannot parse, absurd nesting included, and
    bytes in another encoding than UTF-8 (which json.loads would guess: JSON is UTF-8, RFC 8259)."""
    if isinstance(text, bytes) and json.detect_encoding(text) not in ("utf-8", "utf-8-sig"):
        raise BadRequest(f"{what} is not UTF-8 ({json.detect_encoding(text)}): send JSON in UTF-8", code=code)
    try:
        return json.loads(text)
    except RecursionError:
        raise BadRequest(f"{what} is nested too deeply to be parsed", code=code) from None
    except ValueError as exc:
        raise BadRequest(f"{what} is not valid JSON ({exc})", code=code) from None


#: A codec that decodes UTF-8 like Werkzeug's form parser, except that an invalid byte becomes a
#: lone surrogate (U+DC80-U+DCFF) instead of U+FFFD, whatever ``errors`` it is given: Werkzeug
#: decodes form fields with "replace", which would hide a mis-encoded prompt as U+FFFD characters
#: that the client never sent (a real U+FFFD in valid UTF-8 stays what it is).
_MARKED_UTF8 = "dreamlayer_marked_utf_8"
_BAD_BYTE = re.compile("[\udc80-\udcff]")


def _marked_utf8(name: str):
    if name != _MARKED_UTF8:
        return None
    utf8 = codecs.lookup("utf-8")
    return codecs.CodecInfo(utf8.encode, lambda data, errors="strict": codecs.utf_8_decode(
        data, "surrogateescape", True), name=_MARKED_UTF8)


codecs.register(_marked_utf8)


class _MarkingMultiPartParser(MultiPartParser):
    def get_part_charset(self, headers) -> str:
        charset = super().get_part_charset(headers)
        return _MARKED_UTF8 if charset in ("utf-8", "ascii", "us-ascii") else charset


class _MarkingFormDataParser(FormDataParser):
    """Werkzeug's parser with the multipart fields decoded by ``_marked_utf8`` (see above)."""

    def _parse_multipart(self, stream, mimetype, content_length, options):
        parser = _MarkingMultiPartParser(stream_factory=self.stream_factory,
                                         max_form_memory_size=self.max_form_memory_size,
                                         max_form_parts=self.max_form_parts, cls=self.cls)
        boundary = options.get("boundary", "").encode("ascii")
        if not boundary:
            raise ValueError("Missing boundary")
        form, files = parser.parse(stream, boundary, content_length)
        return stream, form, files


class FormRequest(Request):
    """The app's request class: its multipart text fields keep invalid UTF-8 visible."""

    form_data_parser_class = _MarkingFormDataParser


def _utf8_text(raw, what: str, code: str) -> str:
    """A text field as sent, or 400 when its bytes are not UTF-8."""
    if isinstance(raw, bytes):
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise BadRequest(f"{what} is not UTF-8 (byte {exc.start}): send it in UTF-8", code=code) from None
    if not raw.isascii() and (bad := _BAD_BYTE.search(raw)):
        raise BadRequest(f"{what} is not UTF-8 (character {bad.start()}): send it in UTF-8", code=code)
    return raw


def _read_limited(storage, limit: int, what: str, code: str) -> bytes:
    """Read a file part, refusing (413) as soon as it exceeds ``limit`` bytes."""
    data = storage.stream.read(limit + 1)
    if len(data) > limit:
        raise PayloadTooLarge(f"The {what} exceeds {limit} bytes", code=code)
    return data


def parse_multipart(request: Request, *, max_mask_bytes: int) -> Img2ImgRequest:
    image_part = request.files.get("image")
    if image_part is None:
        raise BadRequest("The multipart request has no 'image' file part", code="missing_image")
    image = image_part.read()
    if not image:
        raise BadRequest("The 'image' file part is empty", code="missing_image")
    mask = None
    mask_part = request.files.get("mask")
    if mask_part is None and request.form.get("mask"):
        # a mask must never be dropped silently, e.g. curl -F mask=<m.png (text) instead of -F mask=@m.png
        raise BadRequest("'mask' was sent as a text field; send the mask PNG as a file part "
                         "(curl: -F mask=@mask.png)", code="invalid_mask")
    if mask_part is not None:
        mask = _read_limited(mask_part, max_mask_bytes, "mask", "mask_too_large")
        if not mask:
            raise BadRequest("The 'mask' file part is empty", code="invalid_mask")
    raw = request.form.get("params")
    if raw is None:
        if "params" in request.files:
            raw = request.files["params"].read()
        else:
            raise BadRequest("The multipart request has no 'params' field: send the parameters as a JSON "
                             "object string in 'params'", code="missing_params")
    params = _loads(_utf8_text(raw, "'params'", "invalid_params"), "'params'", "invalid_params")
    if not isinstance(params, dict):
        raise BadRequest("'params' must be a JSON object", code="invalid_params")
    return Img2ImgRequest(image=image, mask=mask, params=params)


def _body(request: Request) -> bytes:
    """The whole body, in one read of its declared length where there is one (get_data reads it
    in 64 KiB pieces into a buffer that is then copied: 0.4 ms of a 512x512 request's 0.7 MB)."""
    length = request.content_length
    if not length:
        return request.get_data(cache=False)
    stream = request.stream  # MAX_CONTENT_LENGTH and the client hanging up: as for get_data
    data = stream.read(length)
    while len(data) < length:  # an input stream that returns less than asked
        more = stream.read(length - len(data))
        if not more:
            break
        data += more
    return data


def parse_json(request: Request, *, max_mask_bytes: int) -> Img2ImgRequest:
    body = _loads(_body(request), "The body", "invalid_json")
    if not isinstance(body, dict):
        raise BadRequest("The JSON body must be an object", code="invalid_params")
    value = body.get("input_image")
    if value is None or value == "":
        raise BadRequest("The JSON body has no 'input_image' (base64 or data URL)", code="missing_image")
    image = decode_base64_image(value, "input_image")
    mask = None
    mask_key = "mask_image" if body.get("mask_image") not in (None, "") else "mask"
    mask_value = body.get(mask_key)
    if mask_value not in (None, ""):
        if isinstance(mask_value, str) and len(mask_value) > (max_mask_bytes * 4) // 3 + 4096:
            raise PayloadTooLarge(f"The mask exceeds {max_mask_bytes} bytes", code="mask_too_large")
        mask = decode_base64_image(mask_value, mask_key, mask=True)
        if len(mask) > max_mask_bytes:
            raise PayloadTooLarge(f"The mask is {len(mask)} bytes; the limit is {max_mask_bytes} bytes",
                                  code="mask_too_large")
    params = {k: v for k, v in body.items() if k not in ("input_image", "mask_image", "mask")}
    return Img2ImgRequest(image=image, mask=mask, params=params)


def parse_request(request: Request, *, max_mask_bytes: int) -> Img2ImgRequest:
    mimetype = request.mimetype
    if mimetype == "multipart/form-data":
        return parse_multipart(request, max_mask_bytes=max_mask_bytes)
    if mimetype == "application/json" or mimetype.endswith("+json"):
        return parse_json(request, max_mask_bytes=max_mask_bytes)
    raise UnsupportedMediaType(
        f"Content-Type '{mimetype or '(none)'}' is not supported: send multipart/form-data (image, mask, "
        "params) or application/json (input_image, mask_image and parameters)", code="unsupported_content_type")
