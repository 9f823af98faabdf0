"""The Img2Img tab's advanced settings end to end (docs/api.md, "Advanced settings"): the real Flask
app, over HTTP, into the fake ComfyUI. Each test looks at what came out (the served PNGs: sizes and
pixels) and at what the fake received (``fake_comfy.prompts``) and executed (``fake_comfy.node_runs``).

The fake's pixel model (dreamlayer/comfyui/fake/README.md) makes this exact: the latent is the image
itself, every VAE encodes as the identity, a VAELoader VAE tints its decodes, KSampler with denoise 0
returns its latent untouched, an upscale model repeats each pixel N x N (N from its file name), and
facerestore_cf "restores" the centre box. The pure functions are tested in test_advanced_settings.py.
"""
from __future__ import annotations

import base64
import io
import json
from urllib.parse import urlsplit

import numpy as np
import pytest
import requests
from PIL import Image

from dreamlayer.comfyui.fake import FakeComfyUI
from dreamlayer.config.img2img import Config
from dreamlayer.img2img.app import create_app, shutdown
from images import box_mask, gradient, png

W, H = 64, 48
BOX = (16, 12, 48, 36)            # black = inpaint (left, top, right, bottom)
BASE = "tiny-sd15-random.safetensors"        # the fake's only checkpoint until add_model
REFINER = "tiny-sd15-refiner-random.safetensors"
ULTRASHARP = "4x-UltraSharp.pth"             # the page's default id "4x-ultrasharp" names it
ESRGAN_2X = "RealESRGAN_x2plus.pth"          # the fake reads the scale from the name: 2
VAE = "vae-ft-mse-840000.safetensors"
CODEFORMER = "codeformer-v0.1.0.pth"
GFPGAN = "GFPGANv1.4.pth"
SRC = gradient(W, H)
SRC_A = np.asarray(SRC, dtype=np.int16)
BASIC = {"prompt": "a red cube", "negative_prompt": "blurry", "steps": 2, "seed": 11}


# --- requests and what came back -------------------------------------------------------------

def data_url(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


def post(client, params, *, mask=None, src=SRC, form="multipart"):
    """POST /api/img2img in the multipart form (image, mask, params) or the frontend's JSON form
    (the parameters at the top level, the images as data URLs in input_image / mask_image)."""
    params = {**BASIC, **params}
    if form == "json":
        body = {**params, "input_image": data_url(png(src))}
        if mask is not None:
            body["mask_image"] = data_url(png(mask))
        return client.post("/api/img2img", data=json.dumps(body), content_type="application/json")
    data = {"params": json.dumps(params), "image": (io.BytesIO(png(src)), "i.png")}
    if mask is not None:
        data["mask"] = (io.BytesIO(png(mask)), "m.png")
    return client.post("/api/img2img", data=data, content_type="multipart/form-data")


def ok(resp) -> dict:
    body = resp.get_json()
    assert resp.status_code == 200, body
    return body


def refused(resp, status: int, code: str) -> dict:
    body = resp.get_json()
    assert resp.status_code == status and body["code"] == code, body
    return body


def download(client, body) -> list:
    """Every image of the answer, fetched from the URL the service gave (its own /images/...),
    as int16 arrays (H, W, 3)."""
    out = []
    for image in body["comfy_response"]["generated_images"]:
        url = urlsplit(image["url"])
        assert url.path == "/images/" + image["filename"]
        got = client.get(url.path)
        assert got.status_code == 200 and got.mimetype == "image/png"
        with Image.open(io.BytesIO(got.data)) as im:
            assert im.format == "PNG"
            out.append(np.asarray(im.convert("RGB"), dtype=np.int16))
    return out


def generate(client, params, **kw) -> tuple:
    """(the only image, the answer) of a successful request."""
    body = ok(post(client, params, **kw))
    (image,) = download(client, body)
    return image, body


def runs(fake, *classes, prompt_id=None) -> list:
    return [r for r in fake.node_runs if r["class_type"] in classes
            and (prompt_id is None or r["prompt_id"] == prompt_id)]


def classes_ran(fake, prompt_id=None) -> list:
    return [r["class_type"] for r in fake.node_runs if prompt_id is None or r["prompt_id"] == prompt_id]


def received(fake) -> dict:
    """The last workflow the fake received."""
    return fake.prompts[-1][1]


def of(workflow, cls) -> dict:
    return {k: v for k, v in workflow.items() if v["class_type"] == cls}


def leftovers(fake) -> list:
    return [p for p in fake.input_dir.rglob("*") if p.is_file()]


def region(size, box, grow=0) -> np.ndarray:
    """A boolean (h, w) array, True inside ``box`` grown by ``grow`` px."""
    m = np.zeros((size[1], size[0]), bool)
    m[max(0, box[1] - grow):box[3] + grow, max(0, box[0] - grow):box[2] + grow] = True
    return m


def scaled_box(box, factor):
    return tuple(int(v * factor) for v in box)


def lanczos(im: Image.Image, size) -> np.ndarray:
    return np.asarray(im.resize(size, Image.LANCZOS), dtype=np.int16)


# --- 1. output sizes -------------------------------------------------------------------------

HIRES = {"hires_fix": True, "hires_fix_upscale_method": "upscale-by", "hires_fix_upscale_factor": 2,
         "hires_fix_hires_steps": 3, "hires_fix_denoising_strength": 0.5}


@pytest.mark.parametrize("upscaler,kind,method", [
    ("Lanczos", "pixel", "lanczos"), ("None", "pixel", "lanczos"), ("Nearest", "pixel", "nearest-exact"),
    ("bicubic", "pixel", "bicubic"), ("Latent", "latent", "bilinear"), ("latent-bicubic", "latent", "bicubic"),
    ("Latent (nearest-exact)", "latent", "nearest-exact"), ("Latent (area)", "latent", "area"),
    ("4x-ultrasharp", "model", ULTRASHARP), (ESRGAN_2X, "model", ESRGAN_2X),
])
def test_hires_upscale_by_doubles_a_64x48_input(client, fake_comfy, service_config, upscaler, kind, method):
    for name in (ULTRASHARP, ESRGAN_2X):
        fake_comfy.add_model("upscale_models", name)
    body = ok(post(client, {**HIRES, "hires_fix_upscaler": upscaler}))
    (image,) = body["comfy_response"]["generated_images"]
    assert image["url"] == f"{service_config.public_base_url}/images/{image['filename']}"
    (out,) = download(client, body)
    assert out.shape == (96, 128, 3)
    pid = body["comfy_response"]["prompt_id"]
    # the first pass at the input's size, then the second over the upscaled result
    assert [(r["steps"], r["ckpt"]) for r in runs(fake_comfy, "KSampler", prompt_id=pid)] == [(2, BASE), (3, BASE)]
    wf = received(fake_comfy)
    if kind == "latent":
        (up,) = of(wf, "LatentUpscale").values()
        assert (up["inputs"]["upscale_method"], up["inputs"]["width"], up["inputs"]["height"]) == (method, 128, 96)
        assert "LatentUpscale" in classes_ran(fake_comfy, pid) and "ImageScale" not in classes_ran(fake_comfy, pid)
    else:
        (scale,) = of(wf, "ImageScale").values()
        assert (scale["inputs"]["width"], scale["inputs"]["height"]) == (128, 96)
        assert "LatentUpscale" not in classes_ran(fake_comfy, pid)
        if kind == "pixel":
            assert scale["inputs"]["upscale_method"] == method
            assert not runs(fake_comfy, "ImageUpscaleWithModel")
        else:  # the model at its native scale, then ImageScale to the exact size
            (up,) = runs(fake_comfy, "ImageUpscaleWithModel")
            assert (up["model_name"], up["scale"]) == (method, 4 if method == ULTRASHARP else 2)
            upscaled = wf[scale["inputs"]["image"][0]]
            assert upscaled["class_type"] == "ImageUpscaleWithModel"
    assert leftovers(fake_comfy) == []


@pytest.mark.parametrize("upscaler", ["Lanczos", "Latent", "4x-ultrasharp"])
@pytest.mark.parametrize("asked,size", [((160, 120), (160, 120)), ((100, 70), (96, 72)), ((128, 128), (128, 128))])
def test_hires_resize_to_gives_exactly_that_size_in_multiples_of_8(client, fake_comfy, upscaler, asked, size):
    fake_comfy.add_model("upscale_models", ULTRASHARP)
    out, body = generate(client, {**HIRES, "hires_fix_upscaler": upscaler, "hires_fix_upscale_method": "resize-to",
                                  "hires_fix_upscale_factor": 7, "hires_fix_resize_width": asked[0],
                                  "hires_fix_resize_height": asked[1]})
    assert out.shape == (size[1], size[0], 3)
    assert len(runs(fake_comfy, "KSampler")) == 2


@pytest.mark.parametrize("upscaler", ["Lanczos", "Latent"])
def test_hires_upscale_by_1_keeps_the_size_and_the_whole_picture(client, fake_comfy, upscaler):
    """A second pass at the first one's size (A1111 allows 1x): 64 x 48 stays 64 x 48, every side
    already a multiple of 8 -- not squared up to 64 x 64 and centre-cropped."""
    out, _ = generate(client, {**HIRES, "hires_fix_upscaler": upscaler, "hires_fix_upscale_factor": 1,
                               "mask_blur": 0}, mask=box_mask((W, H), BOX))
    assert out.shape == (H, W, 3)
    inside = region((W, H), BOX, 1)
    assert (out[~inside] == SRC_A[~inside]).all()


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("upscaler,size", [("Lanczos", (48, 48)), ("Latent", None), ("latent-bicubic", None)])
def test_a_hires_fix_under_64_px_is_made_in_pixels_or_refused(client, fake_comfy, masked, upscaler, size):
    """40 x 40 upscaled by 1.2 is 48 x 48. ComfyUI's LatentUpscale makes each side at least 64 px
    whatever it is asked, so a latent upscaler would give 64 x 64 with the picture squeezed into
    the crop: a 400 saying so, before anything is staged; a pixel upscaler gives 48 x 48."""
    params = {**HIRES, "hires_fix_upscaler": upscaler, "hires_fix_upscale_factor": 1.2}
    mask = box_mask((40, 40), (10, 10, 30, 30)) if masked else None
    resp = post(client, params, src=gradient(40, 40), mask=mask)
    if size is None:
        body = refused(resp, 400, "unsupported_combination")
        assert body["field"] == "hires_fix_upscaler" and "48x48" in body["message"] and "64" in body["message"]
        assert "Lanczos" in body["message"]  # what to use instead
        assert fake_comfy.prompts == [] and leftovers(fake_comfy) == []
    else:
        (out,) = download(client, ok(resp))
        assert out.shape == (size[1], size[0], 3)
        assert len(runs(fake_comfy, "KSampler")) == 2


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("src,asked,canvas", [
    (gradient(64, 48), (100, 70), (104, 72)),   # the latent's 8-px grid: covered, then cropped
    (gradient(60, 44), (100, 70), (112, 80)),   # padded to 64 x 48 for the VAE: the padding scales along
    (gradient(60, 44), (128, 96), (144, 112)),
])
def test_resize_mode_3_gives_exactly_the_size_asked(client, fake_comfy, masked, src, asked, canvas):
    """Resize mode 3 stretches the (padded) latent to cover ``width`` x ``height`` and crops the
    decoded image to exactly that size (ComfyUI's latent has whole 8-px cells)."""
    mask = box_mask(src.size, (16, 12, 40, 30)) if masked else None
    body = ok(post(client, {"resize_mode": 3, "width": asked[0], "height": asked[1], "inpaint_mode": "original"},
                   src=src, mask=mask))
    (out,) = download(client, body)
    assert out.shape == (asked[1], asked[0], 3)
    wf = received(fake_comfy)
    assert [(n["inputs"]["width"], n["inputs"]["height"]) for n in of(wf, "LatentUpscale").values()] == [canvas]
    # the picture covers the crop: canvas x (picture / padded) >= asked, on each side
    padded = (-(-src.size[0] // 8) * 8, -(-src.size[1] // 8) * 8)
    assert all(c * s / p >= a for c, s, p, a in zip(canvas, src.size, padded, asked))


def test_resize_mode_3_to_a_side_under_64_px_is_refused(client, fake_comfy):
    """Only the width asked: the height stays the input's 40 px, which ComfyUI's LatentUpscale
    would make 64."""
    body = refused(post(client, {"resize_mode": 3, "width": 96}, src=gradient(40, 40)), 400,
                   "unsupported_combination")
    assert body["field"] == "resize_mode" and "96x40" in body["message"] and "resize_mode 0" in body["message"]
    assert fake_comfy.prompts == [] and leftovers(fake_comfy) == []


def test_a_latent_hires_fix_at_1x_under_64_px_upscales_nothing(client, fake_comfy):
    """At 1x the second pass samples the first one's latent as it is: no LatentUpscale (which
    would make 40 px 64)."""
    out, _ = generate(client, {**HIRES, "hires_fix_upscaler": "Latent", "hires_fix_upscale_factor": 1},
                      src=gradient(40, 40))
    assert out.shape == (40, 40, 3)
    assert not of(received(fake_comfy), "LatentUpscale") and len(runs(fake_comfy, "KSampler")) == 2


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("params", [
    {"hires_fix_upscale_method": "resize-to", "hires_fix_resize_width": 8192, "hires_fix_resize_height": 8192},
    {"hires_fix_upscale_method": "upscale-by", "hires_fix_upscale_factor": 10, "width": 512, "height": 512},
])
def test_an_oversized_hires_target_is_refused_before_anything_is_staged(client, fake_comfy, masked, params):
    body = refused(post(client, {**HIRES, "hires_fix_upscaler": "Lanczos", **params},
                        mask=box_mask((W, H), BOX) if masked else None), 400, "output_too_large")
    assert body["field"] == "hires_fix" and body["maximum"] == 4096 * 4096
    assert fake_comfy.prompts == [] and leftovers(fake_comfy) == []


@pytest.fixture
def small_limit(service_config):
    """A service whose MAX_OUTPUT_PIXELS is 96 x 96 (docs/configuration.md)."""
    app = create_app(service_config.replace(max_output_pixels=96 * 96))
    yield app.test_client()
    shutdown(app)


@pytest.mark.parametrize("params, src, mask, field", [
    ({"width": 128, "height": 80}, SRC, None, "width"),                       # resized in pixels
    ({"width": 128, "height": 80, "resize_mode": 3}, SRC, None, "width"),     # stretched in the latent
    ({}, gradient(128, 80), None, "image"),                                  # the input's own size
    ({}, gradient(128, 80), box_mask((128, 80), (8, 8, 40, 40)), "image"),   # inpainted whole
    ({"inpaint_area": "only_masked", "width": 128, "height": 80}, SRC, box_mask((W, H), BOX), "width"),
])
def test_max_output_pixels_bounds_the_requested_size(small_limit, fake_comfy, params, src, mask, field):
    """docs/configuration.md: MAX_OUTPUT_PIXELS bounds the requested size too, not only the hires
    fix's: a larger image is a 400 before anything reaches ComfyUI."""
    body = refused(post(small_limit, params, src=src, mask=mask), 400, "output_too_large")
    assert body["field"] == field and body["maximum"] == 96 * 96 and "MAX_OUTPUT_PIXELS" in body["message"]
    assert fake_comfy.prompts == [] and leftovers(fake_comfy) == []


def test_max_output_pixels_lets_the_size_at_the_limit_through(small_limit):
    out, _ = generate(small_limit, {"width": 96, "height": 96}, mask=box_mask((W, H), BOX))
    assert out.shape == (96, 96, 3)
    out, _ = generate(small_limit, {"inpaint_area": "only_masked", "width": 96, "height": 96},
                      src=gradient(128, 80), mask=box_mask((128, 80), (8, 8, 40, 40)))
    assert out.shape == (80, 128, 3)  # only the crop is generated; the input's size is kept


# --- 2. the hires fix with a mask (whole-picture inpainting) -----------------------------------

def blur_reach(blur: int) -> int:
    """docs/inpainting.md: the paste-back blur changes pixels within 3 x (mask_blur + 2) px."""
    return 3 * (blur + 2) if blur else 0


@pytest.mark.parametrize("blur", [0, 2])
@pytest.mark.parametrize("mode", ["fill", "original"])
@pytest.mark.parametrize("upscaler", ["Lanczos", "Latent", "4x-ultrasharp"])
def test_hires_with_a_mask_pastes_back_the_input_scaled_to_the_output(client, fake_comfy, upscaler, mode, blur):
    """docs/api.md: the input and the paste-back weights are scaled in the workflow as the generation
    was (ImageScale "lanczos", which is Pillow's LANCZOS in 8 bits), so the unmasked pixels of the
    128 x 96 output are exactly Pillow's LANCZOS resize of the 64 x 48 input."""
    fake_comfy.add_model("upscale_models", ULTRASHARP)
    small = (24, 18, 40, 30)
    out, body = generate(client, {**HIRES, "hires_fix_upscaler": upscaler, "inpaint_mode": mode, "mask_blur": blur},
                         mask=box_mask((W, H), small))
    size = (2 * W, 2 * H)
    assert out.shape == (size[1], size[0], 3)
    expected = lanczos(SRC, size)
    box = scaled_box(small, 2)
    # beyond the (scaled) blur's reach and the bilinear scaling of the weights' edge (1 px)
    keep = ~region(size, box, 2 * blur_reach(blur) + 1)
    assert keep.mean() > 0.3
    assert (out[keep] == expected[keep]).all()
    # a bilinear resize (or none of the input at all) would not match
    assert (out[keep] != np.asarray(SRC.resize(size, Image.BILINEAR), dtype=np.int16)[keep]).any()
    inside = region(size, (box[0] + 2, box[1] + 2, box[2] - 2, box[3] - 2))
    assert (out[inside] != expected[inside]).any(-1).mean() > 0.9
    # the second pass was limited to the masked area too
    wf = body["workflow"]
    (second,) = [n for n in of(wf, "KSampler").values() if n["inputs"]["steps"] == 3]
    latent = wf[second["inputs"]["latent_image"][0]]
    assert latent["class_type"] in ("SetLatentNoiseMask", "LatentUpscale", "InpaintModelConditioning")
    assert leftovers(fake_comfy) == []


def test_hires_of_an_input_off_multiples_of_8_scales_its_padding_along(client, fake_comfy):
    """101 x 77 is padded to 104 x 80 by repeating the edge pixels (docs/inpainting.md); the hires
    fix scales that to its canvas (208 x 160) and crops the 200 x 152 target (2 x, rounded to
    multiples of 8): the unmasked pixels are exactly that."""
    size, box = (101, 77), (30, 20, 70, 55)
    src = gradient(*size)
    out, body = generate(client, {**HIRES, "hires_fix_upscaler": "Lanczos", "mask_blur": 0}, src=src,
                         mask=box_mask(size, box))
    assert out.shape == (152, 200, 3)
    padded = Image.fromarray(np.pad(np.asarray(src), ((0, 3), (0, 3), (0, 0)), mode="edge"))
    expected = lanczos(padded, (208, 160))[:152, :200]
    keep = ~region((200, 152), scaled_box(box, 2), 3)
    assert (out[keep] == expected[keep]).all()
    assert [(n["inputs"]["width"], n["inputs"]["height"]) for n in of(body["workflow"], "ImageCrop").values()] == [
        (200, 152)]


def test_hires_resize_to_another_aspect_covers_and_crops_the_centre(client, fake_comfy):
    """64 x 48 to 128 x 128: scaled to cover (170.7 x 128) and centre-cropped, never stretched;
    the paste-back shows it: the unmasked pixels are the input's middle 48 x 48, scaled."""
    out, _ = generate(client, {**HIRES, "hires_fix_upscaler": "Lanczos", "hires_fix_upscale_method": "resize-to",
                               "hires_fix_resize_width": 128, "hires_fix_resize_height": 128, "mask_blur": 0},
                      mask=box_mask((W, H), BOX))
    assert out.shape == (128, 128, 3)
    expected = lanczos(SRC.crop((8, 0, 56, 48)), (128, 128))
    f = 128 / 48
    box = (int((BOX[0] - 8) * f), int(BOX[1] * f), int((BOX[2] - 8) * f) + 1, int(BOX[3] * f) + 1)
    keep = ~region((128, 128), box, 2)
    assert (out[keep] == expected[keep]).all()
    assert (out[keep] != lanczos(SRC, (128, 128))[keep]).any()   # not a stretch


# --- 3. the refiner --------------------------------------------------------------------------

@pytest.mark.parametrize("steps,denoise,switch,window", [
    # KSampler(steps, denoise) runs the last `steps` of an int(steps / denoise)-step schedule: so do the two
    (4, 1.0, 0.75, {"total": 4, "start": 0, "switch": 3, "levels": (1.0, 0.25, 0.0), "runs": (3, 1)}),
    (4, 0.5, 0.5, {"total": 8, "start": 4, "switch": 6, "levels": (0.5, 0.25, 0.0), "runs": (2, 2)}),
    (5, 1.0, 0.2, {"total": 5, "start": 0, "switch": 1, "levels": (1.0, 0.8, 0.0), "runs": (1, 4)}),
])
def test_refiner_takes_over_the_same_latent_at_the_switch(client, fake_comfy, steps, denoise, switch, window):
    fake_comfy.add_model("checkpoints", REFINER)
    params = {"steps": steps, "denoising_strength": denoise, "refiner_enabled": True, "refiner_model": REFINER,
              "refiner_switch_at": switch}
    out, body = generate(client, params)
    pid = body["comfy_response"]["prompt_id"]
    base, refiner = runs(fake_comfy, "KSamplerAdvanced", prompt_id=pid)
    assert not runs(fake_comfy, "KSampler", prompt_id=pid)
    high, mid, low = window["levels"]
    assert (base["ckpt"], base["steps"], base["add_noise"]) == (BASE, window["runs"][0], True)
    assert (base["start_level"], base["end_level"]) == pytest.approx((high, mid))
    assert base["leftover_noise"] == pytest.approx(mid) and mid > 0      # handed over noisy
    assert (refiner["ckpt"], refiner["steps"], refiner["add_noise"]) == (REFINER, window["runs"][1], False)
    assert (refiner["start_level"], refiner["end_level"], refiner["leftover_noise"]) == pytest.approx((mid, low, 0))
    wf = received(fake_comfy)
    samplers = sorted(of(wf, "KSamplerAdvanced").values(), key=lambda n: n["inputs"]["start_at_step"])
    assert [(n["inputs"]["steps"], n["inputs"]["start_at_step"], n["inputs"]["end_at_step"],
             n["inputs"]["add_noise"], n["inputs"]["return_with_leftover_noise"]) for n in samplers] == [
        (window["total"], window["start"], window["switch"], "enable", "enable"),
        (window["total"], window["switch"], 10000, "disable", "disable")]
    # the refiner encodes the prompts with its own CLIP
    ref_ckpt = [k for k, n in of(wf, "CheckpointLoaderSimple").items() if n["inputs"]["ckpt_name"] == REFINER]
    positive = wf[samplers[1]["inputs"]["positive"][0]]
    assert positive["inputs"] == {"text": BASIC["prompt"], "clip": [ref_ckpt[0], 1]}
    # and leaves its mark: the same request without the refiner gives another image
    plain, _ = generate(client, {"steps": steps, "denoising_strength": denoise})
    assert (out != plain).any()


def test_a_latent_hires_of_a_very_different_aspect_is_refused_not_failed_in_comfyui(client, fake_comfy):
    """LatentUpscale centre-crops the latent to the target's aspect in latent cells: 96x64 (12x8
    cells) to 64x512 keeps none, and ComfyUI fails ("Input and output sizes should be greater
    than 0"; found on a real ComfyUI 0.3.40). Pixel upscalers crop pixels and run."""
    src = gradient(96, 64)
    resize = {"hires_fix": True, "hires_fix_upscale_method": "resize-to", "hires_fix_resize_width": 64,
              "hires_fix_resize_height": 512, "hires_fix_hires_steps": 2}
    resp = post(client, {**resize, "hires_fix_upscaler": "Latent"}, src=src)
    body = resp.get_json()
    assert (resp.status_code, body["code"], body["field"]) == (400, "unsupported_combination", "hires_fix_upscaler")
    assert fake_comfy.prompts == []
    assert post(client, {**resize, "hires_fix_upscaler": "Lanczos"}, src=src).status_code == 200


def test_the_fake_fails_a_latent_crop_to_nothing_as_comfyui_does(fake_comfy):
    from fake_fixtures import execution_error
    error = execution_error(fake_comfy, {
        "1": {"class_type": "EmptyLatentImage", "inputs": {"width": 96, "height": 64, "batch_size": 1}},
        "2": {"class_type": "LatentUpscale", "inputs": {"samples": ["1", 0], "upscale_method": "nearest-exact",
                                                        "width": 64, "height": 512, "crop": "center"}},
        "3": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": BASE}},
        "4": {"class_type": "VAEDecode", "inputs": {"samples": ["2", 0], "vae": ["3", 2]}},
        "5": {"class_type": "PreviewImage", "inputs": {"images": ["4", 0]}}})
    assert error.node_type == "LatentUpscale"
    assert "Input and output sizes should be greater than 0, but got input (H: 8, W: 0)" in str(error)


def test_a_tiny_denoise_keeps_the_schedule_within_comfyuis_limit(client, fake_comfy):
    """steps / denoise is the length of ComfyUI's schedule: over KSamplerAdvanced's 10000 the
    refiner's workflow was refused (502), and KSampler with denoise 1e-12 tried to allocate 4 TB
    (both found on a real ComfyUI 0.3.40). Such a denoise is raised to steps / 10000, said in a
    warning."""
    fake_comfy.add_model("checkpoints", REFINER)
    _, body = generate(client, {"steps": 20, "denoising_strength": 0.001, "refiner_enabled": True,
                                "refiner_model": REFINER, "refiner_switch_at": 0.5})
    assert all(n["inputs"]["steps"] <= 10000 for n in of(received(fake_comfy), "KSamplerAdvanced").values())
    assert any("denoising_strength 0.001 was raised to 0.002" in w for w in body["warnings"]), body["warnings"]
    _, body = generate(client, {"steps": 1, "denoising_strength": 1e-12, **HIRES,
                                "hires_fix_upscaler": "Lanczos", "hires_fix_denoising_strength": 1e-9})
    denoises = sorted(n["inputs"]["denoise"] for n in of(received(fake_comfy), "KSampler").values())
    assert denoises == pytest.approx([1 / 10000, 3 / 10000])  # steps 1, hires steps 3
    assert any("hires_fix_denoising_strength 1e-09 was raised" in w for w in body["warnings"])
    _, body = generate(client, {"steps": 20, "denoising_strength": 0.0})  # 0 stays 0: nothing sampled
    assert [n["inputs"]["denoise"] for n in of(received(fake_comfy), "KSampler").values()] == [0.0]


def test_refiner_with_a_mask_keeps_the_unmasked_pixels(client, fake_comfy):
    fake_comfy.add_model("checkpoints", REFINER)
    out, body = generate(client, {"steps": 4, "refiner_enabled": True, "refiner_model": REFINER,
                                  "refiner_switch_at": 0.5, "mask_blur": 0, "inpaint_mode": "original",
                                  "denoising_strength": 1.0}, mask=box_mask((W, H), BOX))
    assert [r["ckpt"] for r in runs(fake_comfy, "KSamplerAdvanced")] == [BASE, REFINER]
    inside = region((W, H), BOX)
    assert (out[~inside] == SRC_A[~inside]).all()
    assert (out[inside] != SRC_A[inside]).any(-1).mean() > 0.9


def test_with_the_hires_fix_the_refiner_samples_the_second_pass(client, fake_comfy):
    fake_comfy.add_model("checkpoints", REFINER)
    out, _ = generate(client, {**HIRES, "hires_fix_upscaler": "Lanczos", "steps": 4, "refiner_enabled": True,
                               "refiner_model": REFINER, "refiner_switch_at": 0.5})
    assert out.shape == (96, 128, 3)
    assert [(r["class_type"], r["ckpt"]) for r in runs(fake_comfy, "KSampler", "KSamplerAdvanced")] == [
        ("KSamplerAdvanced", BASE), ("KSamplerAdvanced", REFINER), ("KSampler", REFINER)]


@pytest.mark.parametrize("refiner", ["nope.safetensors", "none"])
def test_an_unknown_or_missing_refiner_is_refused_listing_the_checkpoints(client, fake_comfy, refiner):
    fake_comfy.add_model("checkpoints", REFINER)
    body = refused(post(client, {"refiner_enabled": True, "refiner_model": refiner}, mask=box_mask((W, H), BOX)),
                   400, "unknown_refiner")
    assert body["field"] == "refiner_model"
    if refiner != "none":
        assert body["allowed"] == sorted([BASE, REFINER])
        assert BASE in body["message"] and REFINER in body["message"]
    assert fake_comfy.prompts == [] and leftovers(fake_comfy) == []


# --- 4. VAE override -------------------------------------------------------------------------

def tinted(plain: np.ndarray, vae: str) -> np.ndarray:
    """What a VAELoader VAE makes of pixels the checkpoint's VAE decodes as ``plain`` (the fake:
    decoded * 0.8 + colour * 0.2)."""
    from dreamlayer.comfyui.fake.nodes import VAE_TINT, vae_tint
    return plain * (1 - VAE_TINT) + vae_tint(vae) * 255 * VAE_TINT


@pytest.mark.parametrize("masked", [False, True])
def test_the_vae_override_decodes_with_that_vae(client, fake_comfy, masked):
    fake_comfy.add_model("vae", VAE)
    mask = box_mask((W, H), BOX) if masked else None
    params = {"mask_blur": 0}
    plain, _ = generate(client, params, mask=mask)
    out, body = generate(client, {**params, "vae_name": VAE}, mask=mask)
    changed = region((W, H), BOX) if masked else np.ones((H, W), bool)
    # the generated pixels carry the VAE's tint (8-bit truncation: less than 2 levels off)
    assert np.abs(out[changed] - tinted(plain[changed], VAE)).max() < 2
    assert np.abs(out[changed] - plain[changed]).mean() > 5
    if masked:  # the paste-back is the input, untouched by any VAE
        assert (out[~changed] == SRC_A[~changed]).all()
    wf = received(fake_comfy)
    (loader,) = of(wf, "VAELoader")
    assert wf[loader]["inputs"] == {"vae_name": VAE}
    vae_inputs = [n["inputs"]["vae"] for n in wf.values() if "vae" in n["inputs"]]
    assert vae_inputs and all(v == [loader, 0] for v in vae_inputs)


def test_the_vae_override_feeds_every_encode_and_decode_of_hires_and_tiling(client, fake_comfy):
    fake_comfy.add_model("vae", VAE)
    out, _ = generate(client, {**HIRES, "hires_fix_upscaler": "Lanczos", "vae_name": "vae-ft-mse-840000",
                               "tiling": True, "tile_size": 128, "tile_overlap": 16}, mask=box_mask((W, H), BOX))
    assert out.shape == (96, 128, 3)
    wf = received(fake_comfy)
    (loader,) = of(wf, "VAELoader")   # found by its stem
    vae_users = {k: n for k, n in wf.items() if "vae" in n["inputs"]}
    assert {n["class_type"] for n in vae_users.values()} >= {"VAEEncodeForInpaint", "VAEEncodeTiled", "VAEDecodeTiled"}
    assert all(n["inputs"]["vae"] == [loader, 0] for n in vae_users.values())


@pytest.mark.parametrize("vae", ["None", "Automatic", ""])
def test_no_vae_means_the_checkpoints_own(client, fake_comfy, vae):
    fake_comfy.add_model("vae", VAE)
    ok(post(client, {"vae_name": vae}))
    assert not of(received(fake_comfy), "VAELoader") and "VAELoader" not in classes_ran(fake_comfy)


def test_an_unknown_vae_is_refused_listing_the_installed_ones(client, fake_comfy):
    fake_comfy.add_model("vae", VAE)
    body = refused(post(client, {"vae_name": "missing-vae.safetensors"}, mask=box_mask((W, H), BOX)),
                   400, "unknown_vae")
    assert body["field"] == "vae_name" and body["allowed"] == [VAE] and VAE in body["message"]
    assert fake_comfy.prompts == [] and leftovers(fake_comfy) == []


# --- 5. tiled VAE ----------------------------------------------------------------------------

TILED = {"tiling": True, "tile_size": 128, "tile_overlap": 32}


def tile_runs(fake) -> list:
    return [(r["class_type"], r["tile_size"], r["overlap"]) for r in runs(fake, "VAEEncodeTiled", "VAEDecodeTiled")]


def test_tiling_alone_tiles_the_encode_and_the_decode_and_changes_no_pixel(client, fake_comfy):
    plain, _ = generate(client, {})
    out, body = generate(client, TILED)
    pid = body["comfy_response"]["prompt_id"]
    assert tile_runs(fake_comfy) == [("VAEEncodeTiled", 128, 32), ("VAEDecodeTiled", 128, 32)]
    assert all(r["tiles"] >= 1 for r in runs(fake_comfy, "VAEEncodeTiled", "VAEDecodeTiled"))
    assert not {"VAEEncode", "VAEDecode"} & set(classes_ran(fake_comfy, pid))
    assert (out == plain).all()   # tiles are a memory matter, not a look
    assert body["warnings"] == []


def test_an_overlap_over_a_quarter_of_the_tile_is_a_quarter_in_the_decoder_with_a_warning(client, fake_comfy):
    _, body = generate(client, {"tiling": True, "tile_size": 128, "tile_overlap": 40})
    assert tile_runs(fake_comfy) == [("VAEEncodeTiled", 128, 40), ("VAEDecodeTiled", 128, 32)]
    assert any("tile_size // 4 = 32" in w for w in body["warnings"]), body["warnings"]


def test_an_overlap_of_half_the_tile_is_refused(client, fake_comfy):
    body = refused(post(client, {"tiling": True, "tile_size": 128, "tile_overlap": 64}), 400, "invalid_parameter")
    assert body["field"] == "tile_overlap" and fake_comfy.prompts == []


@pytest.mark.parametrize("mode,encodes", [("fill", ["VAEEncodeForInpaint"]), ("original", ["VAEEncodeTiled"])])
def test_tiling_with_a_mask(client, fake_comfy, mode, encodes):
    out, body = generate(client, {**TILED, "inpaint_mode": mode, "mask_blur": 0}, mask=box_mask((W, H), BOX))
    pid = body["comfy_response"]["prompt_id"]
    ran = classes_ran(fake_comfy, pid)
    assert [c for c in ran if c.startswith("VAEEncode")] == encodes
    assert [c for c in ran if c.startswith("VAEDecode")] == ["VAEDecodeTiled"]
    assert {(t, o) for _, t, o in tile_runs(fake_comfy)} == {(128, 32)}
    untiled_warning = any("no tiled VAEEncodeForInpaint" in w for w in body["warnings"])
    assert untiled_warning == (mode == "fill")
    inside = region((W, H), BOX)
    assert (out[~inside] == SRC_A[~inside]).all() and (out[inside] != SRC_A[inside]).any(-1).mean() > 0.9


@pytest.mark.parametrize("upscaler,tiled", [("Lanczos", ["VAEEncodeTiled", "VAEDecodeTiled", "VAEEncodeTiled",
                                                           "VAEDecodeTiled"]),
                                            ("Latent", ["VAEEncodeTiled", "VAEDecodeTiled"])])
def test_tiling_with_the_hires_fix_tiles_every_encode_and_decode(client, fake_comfy, upscaler, tiled):
    out, body = generate(client, {**HIRES, "hires_fix_upscaler": upscaler, **TILED})
    assert out.shape == (96, 128, 3)
    pid = body["comfy_response"]["prompt_id"]
    assert sorted(c for c in classes_ran(fake_comfy, pid) if c.startswith("VAE")) == sorted(tiled)
    assert {(t, o) for _, t, o in tile_runs(fake_comfy)} == {(128, 32)}


# --- 6. face restoration ---------------------------------------------------------------------

@pytest.fixture
def face_comfy(tmp_path):
    """A fake ComfyUI with the facerestore_cf custom node pack and a CodeFormer model."""
    with FakeComfyUI(tmp_path / "comfy_faces", custom_nodes=("facerestore_cf",)) as fake:
        fake.add_model("facerestore_models", CODEFORMER)
        yield fake


@pytest.fixture
def face_client(face_comfy, tmp_path):
    config = Config(comfy_api_url=face_comfy.url, comfyui_input_dir=face_comfy.input_dir,
                    served_images_dir=tmp_path / "served_faces", public_base_url="http://127.0.0.1:5004",
                    comfy_timeout_s=20)
    return create_app(config).test_client()


FACE = {"restore_faces": True, "face_restoration_model": "codeformer", "codeformer_weight": 0.3}
FACE_BOX = (16, 12, 48, 36)   # the fake's "face": the middle half of each side of a 64 x 48 image


def test_codeformer_restores_the_final_image_with_its_fidelity(face_client, face_comfy):
    plain, _ = generate(face_client, {})
    out, body = generate(face_client, FACE)
    (run,) = runs(face_comfy, "FaceRestoreCFWithModel")
    assert (run["model_name"], run["weight"], run["face_box"]) == (CODEFORMER, pytest.approx(1 - 0.3 / 2),
                                                                   [12, 16, 36, 48])
    assert not runs(face_comfy, "ImageBlend")
    face = region((W, H), FACE_BOX)
    assert (out[~face] == plain[~face]).all()                       # only the face is touched
    assert (out[face] != plain[face]).any(-1).mean() > 0.5
    (restore,) = of(received(face_comfy), "FaceRestoreCFWithModel").values()
    assert restore["inputs"]["codeformer_fidelity"] == 0.3


def test_face_restoration_runs_on_the_hires_output_not_the_first_pass(face_client, face_comfy):
    out, _ = generate(face_client, {**FACE, **HIRES, "hires_fix_upscaler": "Lanczos"})
    assert out.shape == (96, 128, 3)
    (run,) = runs(face_comfy, "FaceRestoreCFWithModel")
    assert run["face_box"] == [24, 32, 72, 96]


def test_face_restoration_comes_before_the_paste_back(face_client, face_comfy):
    """The restored face inside the unmasked area does not survive: the input is pasted back over it."""
    mask_box = (8, 8, 32, 30)   # overlaps the face box partly
    plain, _ = generate(face_client, {"mask_blur": 0}, mask=box_mask((W, H), mask_box))
    out, _ = generate(face_client, {**FACE, "mask_blur": 0}, mask=box_mask((W, H), mask_box))
    assert runs(face_comfy, "FaceRestoreCFWithModel")
    inside, face = region((W, H), mask_box), region((W, H), FACE_BOX)
    assert (out[~inside] == SRC_A[~inside]).all()                    # the face box's unmasked part included
    assert (out[inside & face] != plain[inside & face]).any(-1).mean() > 0.5
    assert (out[inside & ~face] == plain[inside & ~face]).all()


def test_gfpgan_blends_the_restored_image_by_its_weight(face_client, face_comfy):
    face_comfy.add_model("facerestore_models", GFPGAN)
    gfpgan = {**FACE, "face_restoration_model": "gfpgan", "codeformer_weight": 0.5}
    plain, _ = generate(face_client, {})
    full, _ = generate(face_client, {**gfpgan, "gfpgan_weight": 1.0})
    part, body = generate(face_client, {**gfpgan, "gfpgan_weight": 0.3})
    restores = runs(face_comfy, "FaceRestoreCFWithModel")
    assert [r["model_name"] for r in restores] == [GFPGAN, GFPGAN]
    assert len(runs(face_comfy, "ImageBlend")) == 2
    (blend,) = of(received(face_comfy), "ImageBlend").values()
    assert (blend["inputs"]["blend_factor"], blend["inputs"]["blend_mode"]) == (0.3, "normal")
    face = region((W, H), FACE_BOX)
    assert (part[~face] == plain[~face]).all()
    assert np.abs(part[face] - (plain[face] * 0.7 + full[face] * 0.3)).max() < 2
    assert np.abs(part[face] - plain[face]).mean() > 1


def test_a_face_model_of_the_kind_asked_must_be_installed(face_client, face_comfy):
    body = refused(post(face_client, {**FACE, "face_restoration_model": "gfpgan"}), 400, "unknown_face_model")
    assert body["allowed"] == [CODEFORMER] and face_comfy.prompts == [] and leftovers(face_comfy) == []


@pytest.mark.parametrize("form", ["multipart", "json"])
@pytest.mark.parametrize("masked", [False, True])
def test_face_restoration_without_the_custom_nodes_is_refused_naming_them(client, fake_comfy, form, masked):
    body = refused(post(client, FACE, mask=box_mask((W, H), BOX) if masked else None, form=form),
                   400, "custom_node_missing")
    assert body["field"] == "restore_faces"
    assert body["missing_nodes"] == ["FaceRestoreModelLoader", "FaceRestoreCFWithModel"]
    assert "facerestore_cf" in body["package"]
    for name in ("FaceRestoreModelLoader", "FaceRestoreCFWithModel", "facerestore_cf"):
        assert name in body["message"]
    assert fake_comfy.prompts == [] and leftovers(fake_comfy) == []


# --- 7. resize modes -------------------------------------------------------------------------

MODES = [(0, 0), ("Just resize", 0), (1, 1), ("Crop and resize", 1), (2, 2), ("Resize and fill", 2),
         (3, 3), ("Just resize (latent upscale)", 3)]
OUT = (64, 64)   # from 64 x 48: taller, so crop loses the sides and fill adds bands above and below


def resized_input(mode: int) -> np.ndarray:
    """A1111's resize of the 64 x 48 input to 64 x 64, worked out by hand (Pillow)."""
    if mode == 1:   # cover: 85 x 64, centre-cropped: 10 columns off the left, 11 off the right
        return np.asarray(SRC.resize((85, 64), Image.LANCZOS).crop((10, 0, 74, 64)), dtype=np.int16)
    if mode == 2:   # fit: 64 x 48 as it is, 8-row bands of the first and last rows stretched
        return np.concatenate([np.repeat(SRC_A[:1], 8, 0), SRC_A, np.repeat(SRC_A[-1:], 8, 0)])
    return lanczos(SRC, OUT)   # stretch


def box_after(mode: int, box) -> tuple:
    """``box`` of the input in the 64 x 64 output (rounded outwards)."""
    x0, y0, x1, y1 = box
    if mode == 1:
        return int(x0 * 85 / 64) - 10, int(y0 * 4 / 3), int(x1 * 85 / 64) - 9, int(y1 * 4 / 3) + 1
    if mode == 2:
        return x0, y0 + 8, x1, y1 + 8
    return x0, int(y0 * 4 / 3), x1, int(y1 * 4 / 3) + 1


@pytest.mark.parametrize("value,mode", MODES)
def test_resize_modes_without_a_mask(client, fake_comfy, value, mode):
    """Denoise 0 leaves the latent as encoded (the fake's latent is the image), so the output is
    the resized input itself."""
    out, body = generate(client, {"resize_mode": value, "width": OUT[0], "height": OUT[1], "denoising_strength": 0})
    assert out.shape == (OUT[1], OUT[0], 3)
    latent_upscales = of(received(fake_comfy), "LatentUpscale")
    if mode == 3:   # encoded at 64 x 48, the latent stretched (bilinear)
        (up,) = latent_upscales.values()
        assert (up["inputs"]["width"], up["inputs"]["height"], up["inputs"]["upscale_method"],
                up["inputs"]["crop"]) == (64, 64, "bilinear", "disabled")
        assert "LatentUpscale" in classes_ran(fake_comfy)
        assert np.abs(out - np.asarray(SRC.resize(OUT, Image.BILINEAR), dtype=np.int16)).max() <= 1
        return
    assert not latent_upscales
    assert (out == resized_input(mode)).all()
    if mode == 1:   # the sides are gone: no column is the input's first column stretched
        assert (out != lanczos(SRC, OUT)).any()
    if mode == 2:   # the bands are the edge rows, the middle is the input untouched
        assert (out[:8] == SRC_A[0]).all() and (out[56:] == SRC_A[-1]).all() and (out[8:56] == SRC_A).all()


@pytest.mark.parametrize("value,mode", MODES)
def test_resize_modes_with_a_mask_resize_the_mask_with_the_image(client, fake_comfy, value, mode):
    out, body = generate(client, {"resize_mode": value, "width": OUT[0], "height": OUT[1], "mask_blur": 0},
                         mask=box_mask((W, H), BOX))
    assert out.shape == (OUT[1], OUT[0], 3)
    expected = resized_input(mode)
    box = box_after(mode, BOX)
    # the mask is resized like the image (Lanczos, 3 input px = 4 output px of reach past its edge)
    keep = ~region(OUT, box, 4)
    assert keep.mean() > 0.4
    assert (out[keep] == expected[keep]).all()
    inside = region(OUT, (box[0] + 3, box[1] + 3, box[2] - 3, box[3] - 3))
    assert (out[inside] != expected[inside]).any(-1).mean() > 0.9
    assert ("LatentUpscale" in classes_ran(fake_comfy)) == (mode == 3)
    if mode == 2:
        assert (out[:8] == SRC_A[0]).all() and (out[56:] == SRC_A[-1]).all()
    assert leftovers(fake_comfy) == []


def test_resize_mode_must_be_known(client, fake_comfy):
    body = refused(post(client, {"resize_mode": "Stretch a lot", "width": 64, "height": 64}), 400,
                   "invalid_parameter")
    assert body["field"] == "resize_mode" and "Crop and resize" in body["allowed"]


# --- 8. batches ------------------------------------------------------------------------------

@pytest.mark.parametrize("batch", ["batch_size", "batch_count"])
@pytest.mark.parametrize("feature", ["hires", "refiner", "hires+refiner", "hires+mask"])
def test_two_images_of_the_right_size_with_hires_and_refiner(client, fake_comfy, batch, feature):
    fake_comfy.add_model("checkpoints", REFINER)
    params = {batch: 2, "steps": 4, "mask_blur": 0}
    if "hires" in feature:
        params.update(HIRES, hires_fix_upscaler="Lanczos")
    if "refiner" in feature:
        params.update(refiner_enabled=True, refiner_model=REFINER, refiner_switch_at=0.5)
    masked = "mask" in feature
    body = ok(post(client, params, mask=box_mask((W, H), BOX) if masked else None))
    outs = download(client, body)
    size = (128, 96) if "hires" in feature else (W, H)
    assert len(outs) == 2 and all(o.shape == (size[1], size[0], 3) for o in outs)
    assert (outs[0] != outs[1]).any()
    assert len(fake_comfy.prompts) == (2 if batch == "batch_count" else 1)
    samplers = [(r["class_type"], r["ckpt"]) for r in runs(fake_comfy, "KSampler", "KSamplerAdvanced")]
    per_run = [("KSamplerAdvanced", BASE), ("KSamplerAdvanced", REFINER)] if "refiner" in feature else [
        ("KSampler", BASE)]
    if "hires" in feature:
        per_run = per_run + [("KSampler", REFINER if "refiner" in feature else BASE)]
    assert samplers == per_run * len(fake_comfy.prompts)
    if masked:
        expected = lanczos(SRC, size)
        keep = ~region(size, scaled_box(BOX, 2), 2)
        for o in outs:
            assert (o[keep] == expected[keep]).all()


# --- 9. the frontend's request shapes ----------------------------------------------------------

#: What DreamLayer's Img2Img page sends with every request (its 37 keys, UI defaults; see
#: tests/test_params.py), made small for the fake: 64 x 64 (the least width / height), 2 steps, one image.
FW = 64
FSRC = gradient(FW, FW)
FRONTEND = {
    "prompt": "a red cube", "negative_prompt": "blurry", "model_name": BASE, "sampler_name": "euler",
    "scheduler": "normal", "steps": 2, "cfg_scale": 7.0, "denoising_strength": 0.75, "width": FW, "height": FW,
    "batch_size": 1, "batch_count": 1, "seed": -1, "random_seed": True, "clip_skip": 1,
    "tiling": False, "tile_size": 512, "tile_overlap": 64, "hires_fix": False, "karras_sigmas": False,
    "lora": None, "restore_faces": False, "face_restoration_model": "codeformer", "codeformer_weight": 0.5,
    "gfpgan_weight": 0.5, "hires_fix_enabled": False, "hires_fix_upscale_method": "upscale-by",
    "hires_fix_upscale_factor": 2.5, "hires_fix_hires_steps": 15, "hires_fix_denoising_strength": 0.5,
    "hires_fix_resize_width": 4000, "hires_fix_resize_height": 4000, "hires_fix_upscaler": "4x-ultrasharp",
    "refiner_enabled": False, "refiner_model": "none", "refiner_switch_at": 0.8, "custom_workflow": None,
}


def send(client, changes: dict, form: str, mask=None):
    """The page's request with ``changes``: JSON with a data-URL ``input_image`` (its own form), or
    the same keys as multipart ``params``."""
    params = {**FRONTEND, **changes}
    assert len(FRONTEND) == 37
    if form == "json":
        body = {**params, "input_image": data_url(png(FSRC))}
        if mask is not None:
            body["mask_image"] = data_url(png(mask))
        return client.post("/api/img2img", data=json.dumps(body), headers={"Content-Type": "application/json"})
    data = {"params": json.dumps(params), "image": (io.BytesIO(png(FSRC)), "input.png")}
    if mask is not None:
        data["mask"] = (io.BytesIO(png(mask)), "mask.png")
    return client.post("/api/img2img", data=data, content_type="multipart/form-data")


def hires_pass(wf) -> dict:
    """The inputs of the hires fix's KSampler: the one whose latent comes from an upscale."""
    (second,) = [n for n in of(wf, "KSampler").values()
                 if wf[n["inputs"]["latent_image"][0]]["class_type"] in ("VAEEncode", "LatentUpscale")]
    return second["inputs"]


def scale_size(wf) -> tuple:
    (scale,) = of(wf, "ImageScale").values()
    return scale["inputs"]["width"], scale["inputs"]["height"]


def check_hires(wf, fake, out=None, size=(160, 160), steps=15, denoise=0.5):   # 2.5 x 64 x 64 by default
    assert len(of(wf, "KSampler")) == 2 and scale_size(wf) == size
    assert (hires_pass(wf)["steps"], hires_pass(wf)["denoise"]) == (steps, denoise)
    assert [r["steps"] for r in runs(fake, "KSampler")] == [2, steps]


def check_pages_default_upscaler(wf, fake, out):
    check_hires(wf, fake)
    (loader,) = of(wf, "UpscaleModelLoader").values()
    assert loader["inputs"]["model_name"] == ULTRASHARP
    assert [(r["model_name"], r["scale"]) for r in runs(fake, "ImageUpscaleWithModel")] == [(ULTRASHARP, 4)]


def check_latent_bicubic(wf, fake, out):
    assert [n["inputs"]["upscale_method"] for n in of(wf, "LatentUpscale").values()] == ["bicubic"]
    assert not of(wf, "ImageScale") and hires_pass(wf)["steps"] == 15


def check_refiner(wf, fake, out):
    # steps 4 at denoise 0.75: the last 4 of a 5-step schedule, switching after 2 of them
    assert sorted((n["inputs"]["steps"], n["inputs"]["start_at_step"], n["inputs"]["end_at_step"])
                  for n in of(wf, "KSamplerAdvanced").values()) == [(5, 1, 3), (5, 3, 10000)]
    assert [r["ckpt"] for r in runs(fake, "KSamplerAdvanced")] == [BASE, REFINER]


def check_no_refiner(wf, fake, out):
    assert not of(wf, "KSamplerAdvanced") and [r["ckpt"] for r in runs(fake, "KSampler")] == [BASE]


def check_tiling(wf, fake, out):
    assert sorted((n["class_type"], n["inputs"]["tile_size"], n["inputs"]["overlap"])
                  for n in wf.values() if "tile_size" in n["inputs"]) == [("VAEDecodeTiled", 256, 48),
                                                                          ("VAEEncodeTiled", 256, 48)]
    assert not of(wf, "VAEEncode") and not of(wf, "VAEDecode")


def check_vae(wf, fake, out):
    assert [n["inputs"]["vae_name"] for n in of(wf, "VAELoader").values()] == [VAE]


def check_no_vae(wf, fake, out):
    assert not of(wf, "VAELoader")


def check_latent_resize(wf, fake, out):
    assert [(n["inputs"]["width"], n["inputs"]["height"], n["inputs"]["crop"])
            for n in of(wf, "LatentUpscale").values()] == [(96, 72, "disabled")]


def check_latent_resize_off_the_grid(wf, fake, out):
    # 100 x 70 is not on the latent's 8-px grid: the latent is stretched to cover it (104 x 72)
    # and the decoded image cropped to exactly that size, right and bottom
    assert [(n["inputs"]["width"], n["inputs"]["height"], n["inputs"]["crop"])
            for n in of(wf, "LatentUpscale").values()] == [(104, 72, "disabled")]
    assert [(n["inputs"]["width"], n["inputs"]["height"], n["inputs"]["x"], n["inputs"]["y"])
            for n in of(wf, "ImageCrop").values()] == [(100, 70, 0, 0)]


def check_crop_and_resize(wf, fake, out):
    assert not of(wf, "LatentUpscale")   # modes 0-2 are done by the service before the encode
    # denoise 0: the output is the resized input, 64 x 64 scaled to cover 96 x 72 (96 x 96) and
    # centre-cropped: 12 rows off the top and the bottom
    assert (out == np.asarray(FSRC.resize((96, 96), Image.LANCZOS).crop((0, 12, 96, 84)), dtype=np.int16)).all()


def check_resize_and_fill(wf, fake, out):
    assert not of(wf, "LatentUpscale")
    # fitted as 72 x 72 in the middle, 12-column bands of its first and last columns stretched
    fitted = np.asarray(FSRC.resize((72, 72), Image.LANCZOS), dtype=np.int16)
    assert (out[:, 12:84] == fitted).all()
    assert (out[:, :12] == fitted[:, :1]).all() and (out[:, 84:] == fitted[:, -1:]).all()


LANCZOS_HIRES = {"hires_fix": True, "hires_fix_upscaler": "Lanczos"}
CONTROLS = {
    # id: (the page's values, models ComfyUI must have, check(workflow, fake), output size)
    "hires_fix": (LANCZOS_HIRES, (), check_hires, (160, 160)),
    "hires_fix_enabled": ({"hires_fix_enabled": True, "hires_fix_upscaler": "lanczos"}, (), check_hires, (160, 160)),
    "hires_fix with the page's defaults": ({"hires_fix": True}, [("upscale_models", ULTRASHARP)],
                                           check_pages_default_upscaler, (160, 160)),
    "hires_fix_upscale_method": (
        {**LANCZOS_HIRES, "hires_fix_upscale_method": "resize-to", "hires_fix_resize_width": 96,
         "hires_fix_resize_height": 80}, (), lambda wf, fake, out: check_hires(wf, fake, size=(96, 80)), (96, 80)),
    "hires_fix_upscale_factor": ({**LANCZOS_HIRES, "hires_fix_upscale_factor": 1.5}, (),
                                 lambda wf, fake, out: check_hires(wf, fake, size=(96, 96)), (96, 96)),
    "hires_fix_hires_steps": ({**LANCZOS_HIRES, "hires_fix_hires_steps": 7}, (),
                              lambda wf, fake, out: check_hires(wf, fake, steps=7), (160, 160)),
    "hires_fix_denoising_strength": ({**LANCZOS_HIRES, "hires_fix_denoising_strength": 0.35}, (),
                                     lambda wf, fake, out: check_hires(wf, fake, denoise=0.35), (160, 160)),
    "hires_fix_upscaler": ({"hires_fix": True, "hires_fix_upscaler": "latent-bicubic"}, (), check_latent_bicubic,
                           (160, 160)),
    "refiner_enabled": ({"steps": 4, "refiner_enabled": True, "refiner_model": REFINER, "refiner_switch_at": 0.5},
                        [("checkpoints", REFINER)], check_refiner, (FW, FW)),
    "refiner_enabled false": ({"refiner_enabled": False, "refiner_model": REFINER}, [("checkpoints", REFINER)],
                              check_no_refiner, (FW, FW)),
    "tiling": ({"tiling": True, "tile_size": 256, "tile_overlap": 48}, (), check_tiling, (FW, FW)),
    "vae_name": ({"vae_name": VAE}, [("vae", VAE)], check_vae, (FW, FW)),
    "vae_name Automatic": ({"vae_name": "Automatic"}, [("vae", VAE)], check_no_vae, (FW, FW)),
    "resize_mode 3": ({"resize_mode": 3, "width": 96, "height": 72}, (), check_latent_resize, (96, 72)),
    "resize_mode label": ({"resize_mode": "Just resize (latent upscale)", "width": 96, "height": 72}, (),
                          check_latent_resize, (96, 72)),
    "resize_mode 3 off the latent grid": ({"resize_mode": 3, "width": 100, "height": 70}, (),
                                          check_latent_resize_off_the_grid, (100, 70)),
    "resize_mode 1": ({"resize_mode": 1, "width": 96, "height": 72, "denoising_strength": 0}, (),
                      check_crop_and_resize, (96, 72)),
    "resize_mode Crop and resize": ({"resize_mode": "Crop and resize", "width": 96, "height": 72,
                                     "denoising_strength": 0}, (), check_crop_and_resize, (96, 72)),
    "resize_mode Resize and fill": ({"resize_mode": "Resize and fill", "width": 96, "height": 72,
                                     "denoising_strength": 0}, (), check_resize_and_fill, (96, 72)),
}


@pytest.mark.parametrize("form", ["json", "multipart"])
@pytest.mark.parametrize("control", list(CONTROLS))
def test_each_advanced_control_of_the_page_reaches_the_workflow(client, fake_comfy, control, form):
    changes, models, check, size = CONTROLS[control]
    for folder, name in models:
        fake_comfy.add_model(folder, name)
    body = ok(send(client, changes, form))
    assert not [w for w in body["warnings"] if "Unknown parameter" in w]   # every key is read
    (out,) = download(client, body)
    assert out.shape == (size[1], size[0], 3)
    (_, wf, _), = fake_comfy.prompts
    assert wf == json.loads(json.dumps(body["workflow"]))   # what the service answered is what ComfyUI got
    check(wf, fake_comfy, out)


@pytest.mark.parametrize("form", ["json", "multipart"])
@pytest.mark.parametrize("model,weights,expect", [
    ("codeformer", {"codeformer_weight": 0.3}, {"FaceRestoreCFWithModel": ("codeformer_fidelity", 0.3)}),
    ("gfpgan", {"gfpgan_weight": 0.7}, {"FaceRestoreCFWithModel": ("codeformer_fidelity", 0.5),
                                        "ImageBlend": ("blend_factor", 0.7)}),
])
def test_the_page_face_restoration_controls_reach_the_custom_nodes(face_client, face_comfy, form, model, weights,
                                                                   expect):
    face_comfy.add_model("facerestore_models", GFPGAN)
    body = ok(send(face_client, {"restore_faces": True, "face_restoration_model": model, **weights}, form,
                   mask=box_mask((FW, FW), BOX)))
    (_, wf, _), = face_comfy.prompts
    for cls, (name, value) in expect.items():
        (node,) = of(wf, cls).values()
        assert node["inputs"][name] == value
    (loader,) = of(wf, "FaceRestoreModelLoader").values()
    assert loader["inputs"]["model_name"] == (GFPGAN if model == "gfpgan" else CODEFORMER)
    assert ("ImageBlend" in classes_ran(face_comfy)) == (model == "gfpgan")
    (out,) = download(face_client, body)
    assert out.shape == (FW, FW, 3)


@pytest.mark.parametrize("form", ["json", "multipart"])
def test_the_page_restore_faces_without_the_custom_nodes_is_a_400(client, fake_comfy, form):
    body = refused(send(client, {"restore_faces": True}, form), 400, "custom_node_missing")
    assert "facerestore_cf" in body["message"] and fake_comfy.prompts == [] and leftovers(fake_comfy) == []


def test_the_pages_hires_request_over_real_http(live_server, fake_comfy):
    """The page's own transport: a JSON POST to the running server (waitress), the answer's URLs
    fetched as the browser does."""
    fake_comfy.add_model("upscale_models", ULTRASHARP)
    body = {**FRONTEND, "hires_fix": True, "restore_faces": False, "input_image": data_url(png(FSRC)),
            "mask_image": data_url(png(box_mask((FW, FW), BOX)))}
    resp = requests.post(f"{live_server.url}/api/img2img", json=body, timeout=30)
    assert resp.status_code == 200, resp.text
    (image,) = resp.json()["comfy_response"]["generated_images"]
    assert image["url"].startswith(live_server.url + "/images/")
    got = requests.get(image["url"], timeout=10)
    assert got.status_code == 200 and got.headers["Content-Type"] == "image/png"
    with Image.open(io.BytesIO(got.content)) as im:
        assert im.size == (160, 160)
    assert [r["scale"] for r in runs(fake_comfy, "ImageUpscaleWithModel")] == [4]
    assert leftovers(fake_comfy) == []
