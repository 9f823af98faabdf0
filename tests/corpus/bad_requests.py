"""The bad-input corpus of POST /api/img2img: every request with the exact answer it must get.

Each Case builds its request lazily (images are made with Pillow at test time, see media.py).
A case expects either an error (status, stable code and, for parameters, the field) or a 200
whose images ``check`` verifies: some inputs look odd but are valid after all (16-bit or
palette images, EXIF rotation, masks of another shape...) and must give a correct result.

Used by tests/test_bad_input_corpus.py, which sends every case to the real app on a real port.
"""
from __future__ import annotations

import base64
import json
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
from PIL import Image

from corpus import media as M

MASK_LIMIT = 10 * 1024 * 1024  # the service's default MAX_MASK_BYTES
BASE = {"prompt": "corpus", "steps": 2, "seed": 5}
#: no mask + denoise 0: the fake ComfyUI returns the decoded input unchanged, so pixels can be checked
IDENTITY = {**BASE, "denoising_strength": 0}
#: with a mask: no blur, no growth, so the inpainted area is exactly the mask's black area
EXACT_MASK = {**BASE, "mask_blur": 0, "grow_mask_by": 0}
IMG_SIZE = (64, 48)
BOX = (16, 8, 40, 32)  # the black (inpaint) box of the masks below


@dataclass(frozen=True)
class Req:
    content_type: Optional[str]
    body: bytes


@dataclass(frozen=True)
class Case:
    id: str
    category: str
    build: Callable[[], Req]
    status: int
    code: Optional[str] = None  # None: a success (200)
    field: Optional[str] = None
    says: tuple = ()  # fragments the error message (or, for a 200, the warnings) must contain
    check: Optional[Callable] = None  # check(images: list[np.ndarray]) for a 200

    @property
    def ok(self) -> bool:
        return self.status == 200


# --- request builders -------------------------------------------------------------------------

_cache: dict = {}


def _memo(key, make):
    if key not in _cache:
        _cache[key] = make()
    return _cache[key]


def small_png() -> bytes:
    return _memo("small", lambda: M.png(M.solid((32, 32), M.RED)))


def gradient_png() -> bytes:
    def make():
        w, h = IMG_SIZE
        x, y = np.meshgrid(np.arange(w), np.arange(h))
        arr = np.stack([(x * 7) % 256, (y * 11) % 256, ((x + y) * 5) % 256], axis=-1).astype(np.uint8)
        return M.png(Image.fromarray(arr, "RGB"))
    return _memo("gradient", make)


def box_mask(mode="L") -> bytes:
    return M.png(M.keep_mask(IMG_SIZE, BOX, mode=mode))


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def form(params=BASE, image=None, mask=None, *, image_name="image.png", mask_name="mask.png",
         image_type="image/png", mask_type="image/png", extra=()):
    """A multipart request. params: dict (JSON-encoded), str (sent as is) or None (no part);
    image/mask: bytes, a zero-argument function giving bytes, or None (no part)."""
    def build():
        parts = []
        img = image() if callable(image) else image
        if img is not None:
            parts.append(("image", img, image_name, image_type))
        msk = mask() if callable(mask) else mask
        if msk is not None:
            parts.append(("mask", msk, mask_name, mask_type))
        if params is not None:
            parts.append(("params", params if isinstance(params, str) else json.dumps(params), None, None))
        parts.extend(extra)
        ctype, body = M.multipart(parts)
        return Req(ctype, body)
    return build


def form_img(params=BASE, **kw):
    """form() with the small default image."""
    return form(params, small_png, **kw)


def js(fields=None, *, image=small_png, mask=None, raw: str = "", mask_key="mask_image"):
    """A JSON request: BASE + fields at the top level, the image (and mask) as base64 strings
    (a str value is sent as is). raw: a JSON fragment appended to the object as text, for
    values json.dumps cannot write (1e309) or NaN/Infinity tokens; its keys win."""
    def build():
        obj = {**BASE, **(fields or {})}
        if image is not None:
            img = image() if callable(image) else image
            obj["input_image"] = img if isinstance(img, str) else b64(img)
        if mask is not None:
            msk = mask() if callable(mask) else mask
            obj[mask_key] = msk if isinstance(msk, str) else b64(msk)
        text = json.dumps(obj)
        if raw:
            text = text[:-1] + ", " + raw + "}"
        return Req("application/json", text.encode())
    return build


def raw_body(content_type, body: bytes):
    return lambda: Req(content_type, body)


# --- checks of valid-after-all results --------------------------------------------------------

def _only(images):
    assert len(images) == 1, f"expected one image, got {len(images)}"
    return images[0]


def is_solid(colour, tol=0):
    def check(images):
        out = _only(images)
        diff = np.abs(out.astype(int) - np.array(colour)).max()
        assert diff <= tol, f"expected {colour} everywhere (±{tol}), max difference {diff}"
    return check


def is_stripes(colours, size, tol=0):
    def check(images):
        out = _only(images)
        assert out.shape[:2] == (size[1], size[0]), f"size {out.shape[1]}x{out.shape[0]}, expected {size}"
        w = size[0] // len(colours)
        for i, c in enumerate(colours):
            part = out[:, i * w + 1:(i + 1) * w - 1].astype(int)  # 1 px off stripe edges (JPEG)
            diff = np.abs(part - np.array(c)).max()
            assert diff <= tol, f"stripe {i}: expected {c} (±{tol}), max difference {diff}"
    return check


def rotated_exif(check_size, top, bottom, tol=24):
    """The EXIF-rotated JPEG: displayed size, colours[0] on top, colours[1] below."""
    def check(images):
        out = _only(images).astype(int)
        assert out.shape[:2] == (check_size[1], check_size[0]), \
            f"EXIF orientation not applied: got {out.shape[1]}x{out.shape[0]}, expected {check_size}"
        h = out.shape[0]
        assert np.abs(out[: h // 2 - 2].mean(axis=(0, 1)) - top).max() <= tol, "top half is not colours[0]"
        assert np.abs(out[h // 2 + 2:].mean(axis=(0, 1)) - bottom).max() <= tol, "bottom half is not colours[1]"
    return check


def _gradient_arr():
    from io import BytesIO
    return np.asarray(Image.open(BytesIO(gradient_png())).convert("RGB"), dtype=int)


def inpainted(region: Callable[[np.ndarray], np.ndarray], *, margin=0):
    """Pixels in region(out) changed (>= 90 %), every pixel farther than margin px from it kept."""
    def check(images):
        out = _only(images).astype(int)
        src = _gradient_arr()
        assert out.shape == src.shape, f"output {out.shape} differs from the input {src.shape}"
        inside = region(np.zeros(out.shape[:2], bool))
        changed = (out != src).any(axis=-1)
        assert changed[inside].mean() >= 0.9, f"only {changed[inside].mean():.0%} of the masked area changed"
        keep = ~_dilate(inside, margin)
        assert not changed[keep].any(), f"{changed[keep].sum()} kept pixels changed"
    return check


def _dilate(mask: np.ndarray, r: int) -> np.ndarray:
    if r <= 0:
        return mask
    ys, xs = np.nonzero(mask)
    out = np.zeros_like(mask)
    out[max(0, ys.min() - r):ys.max() + r + 1, max(0, xs.min() - r):xs.max() + r + 1] = True
    return out


def box_region(a):
    a[BOX[1]:BOX[3], BOX[0]:BOX[2]] = True
    return a


def left_half(a):
    a[:, : a.shape[1] // 2 - 4] = True
    return a


# --- the corpus -------------------------------------------------------------------------------

def _param_cases():
    """Every parameter with a wrong type, out of range or absurd (JSON and multipart)."""
    P = "invalid_parameter"
    cases = []
    bad_values = [  # field, JSON value (or raw token), says
        ("steps", -5, "between 1 and 150"), ("steps", 0, "between 1 and 150"), ("steps", 151, "150"),
        ("steps", 2.5, "integer"), ("steps", "20", "integer"), ("steps", True, "integer"),
        ("steps", [20], "integer"), ("steps", {"value": 20}, "integer"),
        ("cfg_scale", 0.5, "between 1.0 and 20.0"), ("cfg_scale", 21, "20"), ("cfg_scale", "7", "number"),
        ("denoising_strength", -0.1, "between 0.0 and 1.0"), ("denoising_strength", 1.5, "1.0"),
        ("denoising_strength", "0.5", "number"),
        ("seed", "abc", "integer"), ("seed", 1.5, "integer"), ("seed", 2 ** 64, "at most"), ("seed", True, "integer"),
        ("seed", [1], "integer"),
        ("batch_size", 0, "between 1 and 8"), ("batch_size", 9, "8"), ("batch_size", 2.2, "integer"),
        ("batch_count", -1, "between 1 and 8"), ("batch_count", 9, "8"),
        ("width", 63, "between 64 and 2048"), ("width", 2049, "2048"), ("width", "512", "integer"),
        ("height", 0, "between 64 and 2048"),
        ("grow_mask_by", -1, "between 0 and 64"), ("grow_mask_by", 65, "64"),
        ("clip_skip", 0, "between 1 and 12"), ("clip_skip", 13, "12"),
        ("mask_blur", -1, "between 0 and 64"), ("mask_blur", 65, "64"),
        ("inpaint_padding", 1025, "1024"),
        ("random_seed", "yes", "true or false"), ("random_seed", 1, "true or false"),
        ("karras_sigmas", 1, "true or false"), ("mask_invert", "no", "true or false"), ("paste_back", 0, "true or false"),
        ("inpaint_mode", "blur", "fill"), ("inpaint_area", "everything", "only_masked"),
        ("prompt", 12345, "string"), ("prompt", ["a cabin"], "string"), ("prompt", "a\u0000b", "NUL"),
        ("negative_prompt", {"text": "x"}, "string"), ("negative_prompt", "x" * 20_001, "20000"),
        ("sampler_name", 5, "string"), ("sampler_name", "x" * 201, "limit"),
        ("model_name", ["x.safetensors"], "string"),
    ]
    for i, (name, value, says) in enumerate(bad_values):
        short = json.dumps(value)[:12].strip('"') or "empty"
        # alternate the two request forms, so both carry every kind of mistake
        build = js({name: value}) if i % 2 == 0 else form_img({**BASE, name: value})
        cases.append(Case(f"param-{name}-{short}", "parameter", build, 400, P, field=name, says=(says,)))

    # absurd: 1 MB prompt, NaN, 1e309 (parses as infinity), -Infinity, a 5000-digit number
    mb = "x" * (1024 * 1024)
    cases += [
        Case("param-prompt-1MB-json", "parameter", js({"prompt": mb}), 400, P, field="prompt", says=("20000",)),
        Case("param-prompt-1MB-multipart", "parameter", form_img({**BASE, "prompt": mb}), 400, P, field="prompt"),
        Case("param-steps-NaN-json", "parameter", js(raw='"steps": NaN'), 400, P, field="steps", says=("finite",)),
        Case("param-steps-NaN-multipart", "parameter", form_img('{"prompt": "x", "steps": NaN}'), 400, P,
             field="steps"),
        Case("param-cfg-1e309-json", "parameter", js(raw='"cfg_scale": 1e309'), 400, P, field="cfg_scale",
             says=("finite",)),
        Case("param-denoise-NaN-multipart", "parameter", form_img('{"prompt": "x", "denoising_strength": NaN}'),
             400, P, field="denoising_strength"),
        Case("param-seed-1e309-json", "parameter", js(raw='"seed": 1e309'), 400, P, field="seed"),
        Case("param-height-1e309-multipart", "parameter", form_img('{"prompt": "x", "height": 1e309}'), 400, P,
             field="height"),
        Case("param-cfg--Infinity-json", "parameter", js(raw='"cfg_scale": -Infinity'), 400, P, field="cfg_scale"),
        Case("param-steps-negative-multipart", "parameter", form_img({**BASE, "steps": -20}), 400, P, field="steps"),
        Case("param-seed-huge-int-json", "parameter", js(raw='"seed": ' + "9" * 4000), 400, P, field="seed"),
        Case("param-steps-5000-digits-json", "parameter", js(raw='"steps": ' + "9" * 5000), 400, "invalid_json"),
        # required, and null = not set
        Case("param-prompt-missing", "parameter", form_img({"steps": 2}), 400, "missing_parameter", field="prompt"),
        Case("param-prompt-null-json", "parameter", js({"prompt": None}), 400, "missing_parameter", field="prompt"),
        # values checked against ComfyUI's object_info
        Case("param-model-unknown", "parameter", js({"model_name": "nope.safetensors"}), 400, "unknown_model",
             field="model_name", says=("tiny-sd15-random.safetensors",)),
        Case("param-model-traversal", "parameter", form_img({**BASE, "model_name": "../../etc/passwd"}), 400,
             "unknown_model", field="model_name"),
        Case("param-sampler-unknown", "parameter", js({"sampler_name": "PLMS"}), 400, "unknown_sampler",
             field="sampler_name", says=("euler",)),
        Case("param-scheduler-unknown", "parameter", form_img({**BASE, "scheduler": "nope"}), 400,
             "unknown_scheduler", field="scheduler", says=("karras",)),
        Case("param-lora-not-object", "parameter", js({"lora": "x"}), 400, P, field="lora"),
        Case("param-lora-unknown", "parameter", js({"lora": [{"lora_name": "nope.safetensors"}]}), 400,
             "unknown_lora", field="lora"),
        Case("param-lora-enabled-not-bool", "parameter", form_img({**BASE, "lora": [{"enabled": "yes"}]}), 400, P,
             field="lora[0].enabled"),
        Case("param-controlnet-number", "parameter", js({"controlnet": 5}), 400, P, field="controlnet"),
        # a nested field's error names its whole path
        Case("param-lora-strength-string", "parameter", js({"lora": {"lora_name": "a", "strength_model": "x"}}),
             400, P, field="lora.strength_model"),
        Case("param-lora-list-strength-range", "parameter",
             js({"lora": [{"lora_name": "a"}, {"lora_name": "b", "strength_clip": 101}]}), 400, P,
             field="lora[1].strength_clip"),
        Case("param-controlnet-weight-range", "parameter",
             js({"controlnet": {"units": [{"model": "c", "weight": 3}]}}), 400, P, field="controlnet.units[0].weight"),
        Case("param-controlnet-threshold-string", "parameter",
             js({"controlnet": {"units": [{"model": "c", "threshold_a": "low"}]}}), 400, P,
             field="controlnet.units[0].threshold_a"),
        # bounded lists (docs/api.md): 16 LoRAs, 10 ControlNet units, counted before any name is looked up
        Case("param-lora-17", "parameter", js({"lora": [{"lora_name": f"l{i}.safetensors"} for i in range(17)]}),
             400, P, field="lora"),
        Case("param-controlnet-11-units", "parameter",
             js({"controlnet": {"units": [{"model": f"c{i}.safetensors"} for i in range(11)]}}), 400, P,
             field="controlnet.units"),
        Case("param-controlnet-units-string", "parameter", js({"controlnet": {"units": "x"}}), 400, P,
             field="controlnet.units"),
        Case("param-custom-workflow-not-json", "parameter", js({"custom_workflow": "{not json"}), 400,
             "invalid_custom_workflow", field="custom_workflow"),
        Case("param-custom-workflow-bad-node", "parameter", form_img({**BASE, "custom_workflow": {"1": 5}}), 400,
             "invalid_custom_workflow", field="custom_workflow"),
        # absurd nesting, where the JSON parser copes but a recursive walk would not
        Case("param-hires-fix-nested-900", "parameter",
             js(raw='"hires_fix": ' + "[" * 900 + "true" + "]" * 900), 400, P, field="hires_fix", says=("nested",)),
        Case("param-custom-workflow-nested-500", "parameter",
             form_img('{"prompt": "x", "custom_workflow": {"1": {"class_type": "LoadImage", "inputs": {"a": '
                      + "[" * 500 + "]" * 500 + "}}}}"), 400, P, field="custom_workflow"),
        Case("param-custom-workflow-string-nested-100000", "parameter",
             js({"custom_workflow": "[" * 100_000}), 400, "invalid_custom_workflow", field="custom_workflow"),
    ]
    return cases


def _shape_cases():
    img = small_png
    return [
        Case("shape-text-plain", "content type", raw_body("text/plain", b"hello"), 415, "unsupported_content_type"),
        Case("shape-no-content-type", "content type", raw_body(None, b'{"prompt": "x"}'), 415,
             "unsupported_content_type"),
        Case("shape-urlencoded", "content type", raw_body("application/x-www-form-urlencoded", b"prompt=x&steps=2"),
             415, "unsupported_content_type"),
        Case("shape-xml", "content type", raw_body("application/xml", b"<prompt>x</prompt>"), 415,
             "unsupported_content_type"),
        Case("shape-octet-stream-png", "content type", lambda: Req("image/png", small_png()), 415,
             "unsupported_content_type"),
        Case("shape-multipart-no-boundary", "content type", raw_body("multipart/form-data", b"--x\r\n\r\n"), 400,
             "missing_image"),
        # multipart: missing or empty parts
        Case("multipart-no-image", "missing part", form(BASE, None), 400, "missing_image"),
        Case("multipart-image-as-text-field", "missing part",
             form(BASE, None, extra=[("image", b"iVBORw0KGgo=", None, None)]), 400, "missing_image"),
        Case("multipart-empty-image", "missing part", form(BASE, b""), 400, "missing_image"),
        Case("multipart-no-params", "missing part", form(None, img), 400, "missing_params"),
        Case("multipart-mask-as-text-field", "missing part",
             form(BASE, img, extra=[("mask", "data:image/png;base64," + b64(box_mask()), None, None)]), 400,
             "invalid_mask"),
        Case("multipart-empty-mask", "missing part", form(BASE, img, b""), 400, "invalid_mask"),
        # a small body with more parts than the form parser takes: 413, but not "larger than N bytes"
        Case("multipart-1500-parts", "size", form(BASE, img, extra=[(f"f{i}", "x", None, None) for i in range(1500)]),
             413, "request_too_large", says=("parts",)),
        # params not JSON / not an object
        Case("params-not-json", "params", form("{prompt: x}", img), 400, "invalid_params"),
        Case("params-empty-string", "params", form("", img), 400, "invalid_params"),
        Case("params-array", "params", form('["prompt", "x"]', img), 400, "invalid_params"),
        Case("params-string", "params", form('"a cabin"', img), 400, "invalid_params"),
        Case("params-null", "params", form("null", img), 400, "invalid_params"),
        Case("params-number", "params", form("42", img), 400, "invalid_params"),
        Case("params-nested-100000", "params", form("[" * 100_000, img), 400, "invalid_params"),
        # Werkzeug would decode these with U+FFFD in place of the accent: refused instead
        Case("params-latin1", "params", form(None, img, extra=[("params", '{"prompt": "caf\u00e9"}'.encode("latin-1"),
                                                                None, None)]), 400, "invalid_params", says=("UTF-8",)),
        # JSON body not JSON / not an object
        Case("json-not-json", "params", raw_body("application/json", b"{prompt: x"), 400, "invalid_json"),
        Case("json-empty-body", "params", raw_body("application/json", b""), 400, "invalid_json"),
        Case("json-array", "params", raw_body("application/json", b'[{"prompt": "x"}]'), 400, "invalid_params"),
        Case("json-bad-utf8", "params", raw_body("application/json", b'{"prompt": "\xff\xfe"}'), 400, "invalid_json"),
        # JSON is UTF-8 (RFC 8259): a UTF-16 body, which json.loads would guess and read, is refused
        Case("json-utf16", "params", raw_body("application/json", '{"prompt": "x"}'.encode("utf-16")), 400,
             "invalid_json"),
        Case("json-utf16-le-no-bom", "params", raw_body("application/json", '{"prompt": "x"}'.encode("utf-16-le")),
             400, "invalid_json"),
        Case("json-nested-100000", "params", raw_body("application/json", b"[" * 100_000), 400, "invalid_json"),
        Case("json-object-nested-100000", "params",
             raw_body("application/json", b'{"prompt": "x", "a": ' + b"[" * 100_000), 400, "invalid_json"),
        Case("json-no-input-image", "missing part", js(image=None), 400, "missing_image"),
        Case("json-input-image-empty", "missing part", js(image=""), 400, "missing_image"),
        Case("json-input-image-number", "base64", js({"input_image": 42}, image=None), 400, "invalid_parameter",
             field="input_image"),
    ]


def _image_cases():
    png = M.png
    solid = M.solid
    cases = [
        Case("image-text", "not an image", form(BASE, b"GIF89a? no, just text"), 400, "invalid_image"),
        Case("image-text-json", "not an image", js(image=b"hello, I am not an image"), 400, "invalid_image"),
        Case("image-svg", "not an image", form(BASE, b"<svg xmlns='http://www.w3.org/2000/svg'/>",
                                              image_name="x.svg", image_type="image/svg+xml"), 400, "invalid_image"),
        Case("image-png-signature-only", "not an image", form(BASE, M.PNG_SIGNATURE), 400, "invalid_image"),
        Case("image-truncated-png", "truncated", form(BASE, lambda: M.truncated(png(M.stripes((M.RED, M.BLUE))))),
             400, "invalid_image"),
        Case("image-truncated-jpeg", "truncated",
             js(image=lambda: M.truncated(M.encode(M.stripes((M.RED, M.BLUE), (64, 64)), "JPEG"))), 400,
             "invalid_image"),
        Case("image-png-bad-crc", "corrupt", form(BASE, lambda: M.png_with_bad_crc(solid())), 400, "invalid_image",
             says=("corrupt",)),
        Case("image-ztxt-bomb", "corrupt",
             form(BASE, lambda: M.png_insert_before_iend(solid(), M.chunk(b"zTXt", b"k\0\0" + __import__("zlib")
                                                                          .compress(b"a" * 20_000_000)))),
             400, "invalid_image"),
        Case("image-png-50000x50000", "bomb", form(BASE, lambda: M.png_declaring(50_000, 50_000)), 413,
             "image_too_large", says=("40000000",)),
        Case("image-jpeg-50000x50000", "bomb", js(image=lambda: M.jpeg_declaring(50_000, 50_000)), 413,
             "image_too_large"),
        Case("image-animated-gif", "animated", form(BASE, M.animated_gif, image_name="anim.png"), 415,
             "unsupported_image_type", says=("GIF",)),
        Case("image-bmp", "format", js(image=lambda: M.encode(solid(), "BMP")), 415, "unsupported_image_type"),
        Case("image-cmyk-tiff", "format", form(BASE, lambda: M.encode(solid().convert("CMYK"), "TIFF")), 415,
             "unsupported_image_type"),
        # base64 and data URLs (JSON form)
        Case("b64-garbage", "base64", js(image="%%% not base64 %%%"), 400, "invalid_base64", field="input_image"),
        Case("b64-url-safe-alphabet", "base64", js(image="-_-_AAAA"), 400, "invalid_base64"),
        Case("b64-bad-length", "base64", js(image="AAAAA"), 400, "invalid_base64"),
        Case("b64-only-padding", "base64", js(image="===="), 400, "invalid_base64"),
        Case("dataurl-text-plain", "data url", js(image="data:text/plain;base64," + b64(b"hello")), 415,
             "unsupported_media_type", field="input_image"),
        Case("dataurl-gif-mime", "data url", js(image=lambda: "data:image/gif;base64," + b64(M.animated_gif())),
             415, "unsupported_media_type"),
        Case("dataurl-no-mime", "data url", js(image=lambda: "data:;base64," + b64(small_png())), 415,
             "unsupported_media_type"),
        Case("dataurl-not-base64", "data url", js(image="data:image/png,%89PNG"), 400, "invalid_base64"),
        Case("dataurl-empty", "data url", js(image="data:image/png;base64,"), 400, "missing_image"),
        Case("dataurl-png-mime-jpeg-content", "data url",
             js(IDENTITY, image=lambda: "data:image/png;base64," + b64(M.encode(solid((32, 32), M.GREEN), "JPEG",
                                                                                 quality=95))),
             200, check=is_solid(M.GREEN, tol=8)),
        # valid after all: odd modes and formats give the right pixels
        Case("valid-16-bit-png", "valid", form(IDENTITY, M.sixteen_bit_grey), 200,
             check=is_stripes([(0,) * 3, (128,) * 3, (255,) * 3], (48, 32))),
        Case("valid-palette-png", "valid", js(IDENTITY, image=M.palette), 200,
             check=is_stripes([M.RED, M.GREEN, M.BLUE], (48, 32))),
        # half transparent: as it looks on white (grey + (255 - grey) x 127/255), not the hidden grey
        Case("valid-la-png", "valid", form(IDENTITY, M.grey_alpha), 200,
             check=is_stripes([(147,) * 3, (227,) * 3], (32, 32), tol=1)),
        Case("valid-rgba-transparent-on-white", "valid",
             js(IDENTITY, image=lambda: M.png(M.stripes(((*M.RED, 255), (*M.GREEN, 0)), (32, 16), mode="RGBA"))),
             200, check=is_stripes([M.RED, (255, 255, 255)], (32, 16))),
        Case("valid-palette-transparent-on-white", "valid",
             js(IDENTITY, image=_palette_with_transparent_index), 200,
             check=is_stripes([M.RED, (255, 255, 255)], (32, 16))),
        Case("valid-1-bit-png", "valid", js(IDENTITY, image=lambda: png(M.stripes((0, 255), (32, 16), mode="1"))),
             200, check=is_stripes([(0,) * 3, (255,) * 3], (32, 16))),
        Case("valid-cmyk-jpeg", "valid", form(IDENTITY, M.cmyk_jpeg, image_name="x.png"), 200,
             check=is_solid(M.GREEN, tol=8)),
        Case("valid-exif-rotated-jpeg", "valid", js(IDENTITY, image=M.exif_rotated_jpeg), 200,
             check=rotated_exif((24, 40), M.RED, M.BLUE)),
        Case("valid-exif-rotated-jpeg-multipart", "valid", form(IDENTITY, lambda: M.exif_rotated_jpeg(8)), 200,
             check=rotated_exif((24, 40), M.BLUE, M.RED)),
        Case("valid-webp-alpha", "valid",
             js(IDENTITY, image=lambda: M.encode(solid((32, 32), (*M.BLUE, 255), "RGBA"), "WEBP", lossless=True)),
             200, check=is_solid(M.BLUE)),
        Case("valid-apng-first-frame", "animated", form(IDENTITY, M.apng), 200, says=("animated",),
             check=is_solid(M.RED)),
        Case("valid-animated-webp-first-frame", "animated",
             js(IDENTITY, image=lambda: M.encode(solid((32, 32), M.GREEN), "WEBP", lossless=True, save_all=True,
                                                 append_images=[solid((32, 32), M.RED)])),
             200, says=("animated",), check=is_solid(M.GREEN)),
        Case("valid-png-garbage-exif", "corrupt", form(IDENTITY, lambda: M.png_with_garbage_exif(solid())), 200,
             says=("EXIF",), check=is_solid(M.RED)),
        # file names are never used: traversal, NUL bytes, unicode, absurd lengths
        Case("filename-traversal", "file name",
             form(IDENTITY, small_png, box_mask, image_name="../../../../tmp/evil.png",
                  mask_name="../../config.py"), 200),
        Case("filename-nul", "file name", form(IDENTITY, small_png, image_name=b"a\x00b.png\x00.sh"), 200,
             check=is_solid(M.RED)),
        Case("filename-unicode", "file name",
             form(IDENTITY, small_png, image_name="\u00e9t\u00e9 \u2603 \u202eeman.png"), 200, check=is_solid(M.RED)),
        Case("filename-raw-utf8-and-slashes", "file name",
             form(IDENTITY, small_png, image_name="\u0441\u043d\u0435\u0433/..\\..\\x.png".encode()), 200,
             check=is_solid(M.RED)),
        Case("filename-absolute-and-long", "file name", form(IDENTITY, small_png, image_name="/etc/" + "a" * 3000),
             200, check=is_solid(M.RED)),
    ]
    return cases


def _mask_cases():
    grad = gradient_png
    cases = [
        Case("mask-jpeg-renamed-png", "mask type",
             form(BASE, grad, lambda: M.encode(M.keep_mask(IMG_SIZE, BOX).convert("RGB"), "JPEG"),
                  mask_name="mask.png", mask_type="image/png"), 415, "mask_not_png"),
        Case("mask-text", "mask type", form(BASE, grad, b"black = inpaint"), 415, "mask_not_png"),
        Case("mask-gif-animated", "mask type", form(BASE, grad, M.animated_gif), 415, "mask_not_png"),
        Case("mask-truncated-png", "truncated", form(BASE, grad, lambda: M.truncated(box_mask())), 400,
             "invalid_mask"),
        Case("mask-bad-crc", "corrupt", form(BASE, grad, lambda: M.png_with_bad_crc(M.keep_mask(IMG_SIZE, BOX))),
             400, "invalid_mask"),
        Case("mask-50000x50000", "bomb", form(BASE, grad, lambda: M.png_declaring(50_000, 50_000, mode_byte=0)),
             413, "mask_too_large"),
        Case("mask-10MiB-plus-1", "size", form(BASE, grad, lambda: M.padded(box_mask(), MASK_LIMIT + 1)), 413,
             "mask_too_large", says=(str(MASK_LIMIT),)),
        Case("mask-10MiB-plus-1-json", "size", js(image=grad, mask=lambda: M.padded(box_mask(), MASK_LIMIT + 1)),
             413, "mask_too_large"),
        Case("mask-all-white", "empty", form(BASE, grad, lambda: M.png(Image.new("L", IMG_SIZE, 255))), 400,
             "mask_empty"),
        # resize mode 1 crops 200 x 100 to its middle 100 x 100: a mask in the left corner is cut away
        Case("mask-cropped-away-by-resize-mode-1", "empty",
             form({**BASE, "resize_mode": 1, "width": 104, "height": 104},
                  lambda: M.png(M.solid((200, 100), M.RED)), lambda: M.png(M.keep_mask((200, 100), (0, 0, 20, 20)))),
             400, "mask_empty", field="resize_mode"),
        Case("mask-all-transparent", "empty", js(image=grad, mask=lambda: M.png(Image.new("RGBA", IMG_SIZE, 0))),
             400, "mask_empty"),
        Case("mask-all-black-inverted", "empty",
             form({**BASE, "mask_invert": True}, grad, lambda: M.png(Image.new("L", IMG_SIZE, 0))), 400,
             "mask_empty"),
        Case("mask-dataurl-jpeg", "data url",
             js(image=grad, mask=lambda: "data:image/jpeg;base64," + b64(M.encode(M.solid(), "JPEG"))), 415,
             "unsupported_media_type", field="mask_image"),
        Case("mask-dataurl-webp-mime", "data url", js(image=grad, mask=lambda: "data:image/webp;base64," + b64(box_mask())),
             415, "unsupported_media_type", field="mask_image"),
        Case("mask-not-base64", "base64", js(image=grad, mask="!!!!not base64!!!!"), 400, "invalid_base64",
             field="mask_image"),
        Case("mask-number", "base64", js({"mask_image": 5}, image=grad), 400, "invalid_parameter", field="mask_image"),
        Case("mask-alias-jpeg-bytes", "mask type",
             js(image=grad, mask=lambda: M.encode(M.solid(), "JPEG"), mask_key="mask"), 415, "mask_not_png"),
        # valid after all
        Case("valid-mask-exactly-10MiB", "size", form(EXACT_MASK, grad, lambda: M.padded(box_mask(), MASK_LIMIT)),
             200, check=inpainted(box_region)),
        Case("valid-mask-palette", "valid", form(EXACT_MASK, grad, lambda: box_mask("P")), 200,
             check=inpainted(box_region)),
        Case("valid-mask-16-bit", "valid",
             js(EXACT_MASK, image=grad, mask=_mask16),
             200, check=inpainted(box_region)),
        Case("valid-mask-la-transparent-keeps", "valid", form(EXACT_MASK, grad, _mask_la), 200,
             check=inpainted(box_region)),
        # colour-key transparency (tRNS), as PNG optimisers write binary-alpha masks: transparent = keep
        Case("valid-mask-grey-colour-key", "valid", form(EXACT_MASK, grad, lambda: _mask_colour_key("L")), 200,
             check=inpainted(box_region)),
        Case("valid-mask-rgb-colour-key", "valid", js(EXACT_MASK, image=grad, mask=lambda: _mask_colour_key("RGB")),
             200, check=inpainted(box_region)),
        Case("valid-mask-16-bit-colour-key", "valid", form(EXACT_MASK, grad, lambda: _mask_colour_key("I;16")), 200,
             check=inpainted(box_region)),
        Case("valid-mask-1-bit", "valid", js(EXACT_MASK, image=grad, mask=lambda: box_mask("1")), 200,
             check=inpainted(box_region)),
        Case("valid-mask-apng-first-frame", "animated", form(EXACT_MASK, grad, _mask_apng), 200,
             says=("animated",), check=inpainted(box_region)),
        Case("valid-mask-other-aspect-ratio", "aspect ratio",
             form(EXACT_MASK, grad, lambda: M.png(M.keep_mask((32, 64), (0, 0, 16, 64)))), 200,
             # the mask scaled 2x has a soft edge: x=31 and x=32 are 75 % and 25 % inpainted
             says=("resized", "aspect ratio"), check=inpainted(left_half, margin=5)),
        Case("valid-mask-half-size", "aspect ratio",
             js(EXACT_MASK, image=grad, mask=lambda: M.png(M.keep_mask((32, 24), (8, 4, 20, 16)))), 200,
             says=("resized",), check=inpainted(box_region, margin=2)),
    ]
    return cases


def _mask16() -> bytes:
    im = Image.new("I;16", IMG_SIZE, 65535)
    im.paste(0, BOX)
    return M.png(im)


def _palette_with_transparent_index() -> bytes:
    """A palette PNG: index 0 red (left half), index 1 blue (right half), index 1 transparent (tRNS)."""
    im = M.stripes((0, 1), (32, 16), mode="P")
    im.putpalette([*M.RED, *M.BLUE])
    return M.png(im, transparency=1)


def _mask_la() -> bytes:
    """Black everywhere; opaque only in the box, transparent (= keep) elsewhere."""
    alpha = Image.new("L", IMG_SIZE, 0)
    alpha.paste(255, BOX)
    return M.png(Image.merge("LA", (Image.new("L", IMG_SIZE, 0), alpha)))


def _mask_colour_key(mode) -> bytes:
    """Black everywhere; the box opaque (black = inpaint), the rest transparent through the tRNS
    colour key, which here is black as well: only the transparency tells the two apart."""
    black, grey = {"L": (0, 60), "RGB": ((0, 0, 0), (60, 60, 60)), "I;16": (0, 60 * 257)}[mode]
    im = Image.new(mode, IMG_SIZE, black)
    im.paste(grey, BOX)  # dark grey, opaque: mostly inpainted
    return M.png(im, transparency=black)


def _mask_apng() -> bytes:
    first = M.keep_mask(IMG_SIZE, BOX).convert("RGB")
    second = Image.new("RGB", IMG_SIZE, 0)  # all black: would inpaint everything
    return M.encode(first, "PNG", save_all=True, append_images=[second])


CASES = _shape_cases() + _param_cases() + _image_cases() + _mask_cases()
ERROR_CASES = [c for c in CASES if not c.ok]
VALID_CASES = [c for c in CASES if c.ok]
assert len({c.id for c in CASES}) == len(CASES), "case ids must be unique"
