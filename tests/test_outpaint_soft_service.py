"""Outpainting, soft inpainting, InpaintModelConditioning and mask shaping end to end, at pixel
level, through the fake ComfyUI (its latent is the image itself, so the service's work shows
exactly; an "inpainting" checkpoint copies what its masked image shows it)."""
import base64
import io
import json

import numpy as np
import pytest
from PIL import Image, ImageDraw

from images import box_mask, gradient, png

W, H = 64, 48
BOX = (20, 12, 44, 36)  # black = inpaint
SRC = np.asarray(gradient(W, H), dtype=np.int16)
INPAINTING_CKPT = "tiny-sd15-inpainting-random.safetensors"


def post(client, params, mask=None, as_json=False):
    params = {"prompt": "p", "steps": 2, "seed": 5, "mask_blur": 0, **params}
    if as_json:
        body = {**params, "input_image": "data:image/png;base64," + base64.b64encode(png(gradient(W, H))).decode()}
        if mask is not None:
            body["mask_image"] = "data:image/png;base64," + base64.b64encode(png(mask)).decode()
        return client.post("/api/img2img", json=body)
    data = {"params": json.dumps(params), "image": (io.BytesIO(png(gradient(W, H))), "i.png")}
    if mask is not None:
        data["mask"] = (io.BytesIO(png(mask)), "m.png")
    return client.post("/api/img2img", data=data, content_type="multipart/form-data")


def images(client, resp):
    body = resp.get_json()
    assert resp.status_code == 200, body
    out = []
    for item in body["comfy_response"]["generated_images"]:
        got = client.get("/images/" + item["filename"])
        assert got.status_code == 200
        out.append(np.asarray(Image.open(io.BytesIO(got.data)).convert("RGB"), dtype=np.int16))
    return out, body


def error(resp, status, code):
    body = resp.get_json()
    assert resp.status_code == status and body["code"] == code, body
    return body


def leftovers(fake):
    return [p for p in fake.input_dir.rglob("*") if p.is_file()]


def classes(body):
    return [n["class_type"] for n in body["workflow"].values()]


def changed(a, b):
    return (a != b).any(-1)


# --- outpainting -------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["fill", "original"])
@pytest.mark.parametrize("as_json", [False, True])
def test_outpaint_grows_the_canvas_and_keeps_the_original_exactly(client, fake_comfy, mode, as_json):
    out = {"left": 16, "top": 0, "right": 5, "bottom": 8}  # right: rounded up to 8
    (img,), body = images(client, post(client, {"outpaint": out, "inpaint_mode": mode, "denoising_strength": 1.0},
                                       as_json=as_json))
    assert img.shape == (H + 8, W + 16 + 8, 3)
    assert any("rounded up to 8" in w for w in body.get("warnings", []))
    inner = img[0:H, 16:16 + W]
    assert (inner == SRC).all()  # no mask: the original area is kept bit for bit
    border = np.ones(img.shape[:2], bool)
    border[0:H, 16:16 + W] = False
    fill = np.asarray(Image.open(io.BytesIO(_padded_png(out))).convert("RGB"), dtype=np.int16)
    assert changed(img[border], fill[border]).mean() > 0.9  # the border was generated
    assert leftovers(fake_comfy) == []


def _padded_png(out):
    from dreamlayer.img2img.mask_shaping import Outpaint, pad_image
    o = Outpaint(**{k: -(-v // 8) * 8 for k, v in out.items()})
    return png(pad_image(gradient(W, H), o))


def test_outpaint_with_a_mask_inpaints_the_mask_and_the_border(client):
    (img,), _ = images(client, post(client, {"outpaint": {"top": 8, "bottom": 8}}, mask=box_mask((W, H), BOX)))
    assert img.shape == (H + 16, W, 3)
    inner = img[8:8 + H]
    inside = np.zeros((H, W), bool)
    inside[BOX[1]:BOX[3], BOX[0]:BOX[2]] = True
    assert (inner[~inside] == SRC[~inside]).all()
    assert changed(inner[inside], SRC[inside]).mean() > 0.9
    assert changed(img[:8], np.repeat(SRC[:1], 8, axis=0)).mean() > 0.9


def test_outpaint_feathering_blends_into_the_original_near_the_new_side_only(client):
    feather = 12
    (img,), _ = images(client, post(client, {"outpaint": {"left": 8, "feathering": feather},
                                             "denoising_strength": 1.0}))
    inner = img[:, 8:]
    near, far = inner[:, :feather - 2], inner[:, feather:]
    assert changed(near, SRC[:, :feather - 2]).mean() > 0.5
    assert (far == SRC[:, feather:]).all()


def test_outpaint_works_with_batch_and_only_masked(client):
    imgs, _ = images(client, post(client, {"outpaint": {"right": 8}, "batch_size": 2}))
    assert [i.shape for i in imgs] == [(H, W + 8, 3)] * 2
    (img,), _ = images(client, post(client, {"outpaint": {"right": 8}, "inpaint_area": "only_masked",
                                             "width": 64, "height": 64}, mask=box_mask((W, H), BOX)))
    assert img.shape == (H, W + 8, 3)


def test_outpaint_errors_are_clear_and_leave_nothing(client, fake_comfy, app):
    limit = app.extensions["img2img"].config.max_outpaint_px
    body = error(post(client, {"outpaint": {"left": limit + 8}}), 400, "invalid_parameter")
    assert "MAX_OUTPAINT_PX" in body["message"]
    # above ComfyUI's own 16384 too: the limit named is the one that applies
    body = error(post(client, {"outpaint": {"top": 20000}}), 400, "invalid_parameter")
    assert f"between 0 and {limit} (MAX_OUTPAINT_PX)" in body["message"] and body["field"] == "outpaint.top"
    error(post(client, {"outpaint": {"left": 8}, "width": 64, "height": 64}), 400, "unsupported_combination")
    error(post(client, {"outpaint": {"left": -8}}), 400, "invalid_parameter")
    error(post(client, {"outpaint": {"sideways": 8}}), 400, "invalid_parameter")
    error(post(client, {"outpaint": [8]}), 400, "invalid_parameter")
    assert leftovers(fake_comfy) == [] and fake_comfy.prompts == []


# --- soft inpainting ---------------------------------------------------------------------------

def _grey_mask():
    mask = Image.new("L", (W, H), 255)
    ImageDraw.Draw(mask).rectangle((4, 4, 27, 43), fill=128)   # grey: half strength
    ImageDraw.Draw(mask).rectangle((36, 4, 59, 43), fill=0)    # black: full strength
    return mask


def test_soft_inpainting_gives_grey_areas_an_intermediate_change(client, fake_comfy):
    params = {"inpaint_mode": "original", "denoising_strength": 0.9, "steps": 10}
    (soft,), body = images(client, post(client, {**params, "soft_inpainting": True}, mask=_grey_mask()))
    assert "DifferentialDiffusion" in classes(body)
    assert all(r["differential"] for r in fake_comfy.node_runs if r["class_type"] == "KSampler")
    grey = np.abs(soft[8:40, 8:24] - SRC[8:40, 8:24]).mean()
    black = np.abs(soft[8:40, 40:56] - SRC[8:40, 40:56]).mean()
    assert 0 < grey < black
    assert (soft[:, 30:34] == SRC[:, 30:34]).all()  # white keeps
    (hard,), body = images(client, post(client, params, mask=_grey_mask()))
    assert "DifferentialDiffusion" not in classes(body)
    assert not (hard == soft).all()


# --- InpaintModelConditioning ------------------------------------------------------------------

def test_an_inpainting_checkpoint_no_longer_sees_the_original_under_the_mask(client, fake_comfy):
    fake_comfy.add_model("checkpoints", INPAINTING_CKPT)
    params = {"inpaint_mode": "original", "denoising_strength": 1.0, "model_name": INPAINTING_CKPT}
    (img,), body = images(client, post(client, params, mask=box_mask((W, H), BOX)))
    assert "InpaintModelConditioning" in classes(body) and "SetLatentNoiseMask" not in classes(body)
    (run,) = [r for r in fake_comfy.node_runs if r["class_type"] == "KSampler"]
    assert run["inpainting_model"] is True and run["inpainting_model_saw"] == "concat_latent_image"
    inside = (slice(BOX[1] + 2, BOX[3] - 2), slice(BOX[0] + 2, BOX[2] - 2))
    generated = np.abs(img[inside] - SRC[inside]).mean()
    # the same model fed the unmasked original (a tiled encode keeps SetLatentNoiseMask) copies it
    (old,), body = images(client, post(client, {**params, "tiling": True, "tile_size": 64, "tile_overlap": 8},
                                       mask=box_mask((W, H), BOX)))
    assert "SetLatentNoiseMask" in classes(body)
    last = [r for r in fake_comfy.node_runs if r["class_type"] == "KSampler"][-1]
    assert last["inpainting_model_saw"] == "latent_image"
    copied = np.abs(old[inside] - SRC[inside]).mean()
    assert copied < 2 < generated


# --- mask shaping ------------------------------------------------------------------------------

@pytest.mark.parametrize("grow", [3, -3])
def test_mask_grow_moves_the_edge_of_the_changed_area(client, grow):
    (img,), _ = images(client, post(client, {"mask_grow": grow, "denoising_strength": 1.0},
                                    mask=box_mask((W, H), BOX)))
    x0, y0, x1, y1 = BOX[0] - grow, BOX[1] - grow, BOX[2] + grow, BOX[3] + grow
    inside = np.zeros((H, W), bool)
    inside[y0:y1, x0:x1] = True
    assert (img[~inside] == SRC[~inside]).all()
    assert changed(img[inside], SRC[inside]).mean() > 0.9


def test_mask_grow_that_removes_the_whole_mask_is_a_clear_400(client, fake_comfy):
    small = box_mask((W, H), (30, 20, 33, 23))
    error(post(client, {"mask_grow": -2}, mask=small), 400, "mask_empty")
    assert leftovers(fake_comfy) == []


def test_mask_threshold_makes_an_anti_aliased_edge_black_and_white(client):
    mask = box_mask((W, H), BOX)
    ImageDraw.Draw(mask).rectangle((BOX[2], BOX[1], BOX[2] + 3, BOX[3] - 1), fill=200)  # light AA edge
    params = {"inpaint_mode": "original", "denoising_strength": 0.9}
    (soft,), _ = images(client, post(client, params, mask=mask))
    (hard,), _ = images(client, post(client, {**params, "mask_threshold": 128}, mask=mask))
    edge = (slice(BOX[1], BOX[3]), slice(BOX[2], BOX[2] + 4))
    assert changed(soft[edge], SRC[edge]).any()      # grey: partly inpainted
    assert (hard[edge] == SRC[edge]).all()           # >= 128: kept
    (dark,), _ = images(client, post(client, {**params, "mask_threshold": 201}, mask=mask))
    assert changed(dark[edge], SRC[edge]).mean() > 0.9  # < 201: inpainted in full


def test_soft_inpainting_and_a_threshold_contradict_each_other(client, fake_comfy):
    error(post(client, {"soft_inpainting": True, "mask_threshold": 128}, mask=box_mask((W, H), BOX)),
          400, "unsupported_combination")
    assert fake_comfy.prompts == []


def test_outpaint_pads_a_controlnet_units_own_image_like_the_input(app, client, fake_comfy):
    """The unit's image (any size) is resized to the input and padded alike, so the control
    lines up with the padded canvas; the request runs end to end."""
    from dreamlayer.img2img.service import Img2ImgRequest
    hint = Image.new("RGB", (32, 24), (10, 200, 30))
    data_url = "data:image/png;base64," + base64.b64encode(png(hint)).decode()
    params = {"prompt": "p", "steps": 2, "seed": 5, "outpaint": {"left": 8, "bottom": 16},
              "controlnet": {"enabled": True, "units": [{"enabled": True, "model": "tiny-controlnet-random.safetensors",
                                                         "preprocessor": "none", "input_image": data_url}]}}
    prepared = app.extensions["img2img"].prepare(Img2ImgRequest(png(gradient(W, H)), None, params))
    (control,) = prepared.control_images
    assert control.size == prepared.image.size == (W + 8, H + 16)
    assert control.getpixel((0, 0)) == control.getpixel((8, 0)) == (10, 200, 30)  # the edge stretched out
    (img,), body = images(client, post(client, {k: v for k, v in params.items() if k != "prompt"}))
    assert img.shape == (H + 16, W + 8, 3) and "ControlNetApplyAdvanced" in classes(body)
    assert leftovers(fake_comfy) == []
