"""Inpainting controls end to end, at pixel level, through the fake ComfyUI (whose latent is the
image itself, so what the service does around the run is visible exactly)."""
import io
import itertools
import json

import numpy as np
import pytest
import requests
from PIL import Image

from images import box_mask, gradient, png
from waiting import wait_until

W, H = 101, 77          # deliberately not multiples of 8
BOX = (30, 20, 70, 55)  # black = inpaint


def run(client, params, mask=True, src=None, mask_image=None):
    src = src or gradient(W, H)
    data = {"params": json.dumps({"prompt": "p", "steps": 2, "seed": 5, **params}),
            "image": (io.BytesIO(png(src)), "i.png")}
    if mask:
        data["mask"] = (io.BytesIO(png(mask_image or box_mask((W, H), BOX))), "m.png")
    resp = client.post("/api/img2img", data=data, content_type="multipart/form-data")
    body = resp.get_json()
    assert resp.status_code == 200, body
    out = client.get("/images/" + body["comfy_response"]["generated_images"][0]["filename"])
    assert out.status_code == 200
    return np.asarray(Image.open(io.BytesIO(out.data)).convert("RGB"), dtype=np.int16), body


def region(box, grow=0):
    m = np.zeros((H, W), bool)
    m[max(0, box[1] - grow):box[3] + grow, max(0, box[0] - grow):box[2] + grow] = True
    return m


SRC = np.asarray(gradient(W, H), dtype=np.int16)


def test_paste_back_without_blur_is_exact_outside_and_changed_inside(client):
    out, body = run(client, {"mask_blur": 0})
    assert out.shape == SRC.shape
    inside = region(BOX)
    assert (out[~inside] == SRC[~inside]).all()
    assert (out[inside] != SRC[inside]).any(-1).mean() > 0.9


@pytest.mark.parametrize("blur", [2, 6])
def test_blurred_paste_back_is_exact_beyond_three_blur_radii(client, blur):
    out, _ = run(client, {"mask_blur": blur})
    far = ~region(BOX, 3 * blur)
    assert (out[far] == SRC[far]).all()


def test_blur_gives_intermediate_values_only_along_the_edge(client):
    blur = 4
    sharp, _ = run(client, {"mask_blur": 0})
    soft, _ = run(client, {"mask_blur": blur})
    differs = (soft != sharp).any(-1)
    band = region(BOX, 3 * blur) & ~region((BOX[0] + 3 * blur, BOX[1] + 3 * blur, BOX[2] - 3 * blur,
                                            BOX[3] - 3 * blur))
    assert differs.any() and not (differs & ~band).any()


def test_mask_invert_swaps_the_regions(client):
    out, _ = run(client, {"mask_blur": 0, "mask_invert": True})
    inside = region(BOX)
    assert (out[inside] == SRC[inside]).all()
    assert (out[~inside] != SRC[~inside]).any(-1).mean() > 0.9


def test_only_masked_keeps_everything_outside_and_the_original_size(client, fake_comfy):
    out, body = run(client, {"inpaint_area": "only_masked", "inpaint_padding": 8, "width": 64, "height": 64,
                             "mask_blur": 0})
    assert out.shape == SRC.shape
    inside = region(BOX)
    assert (out[~inside] == SRC[~inside]).all()
    assert (out[inside] != SRC[inside]).any(-1).mean() > 0.9
    loaded = [n for n in body["workflow"].values() if n["class_type"] == "LoadImage"]
    assert len(loaded) == 2  # the input and the mask file, nothing else: ComfyUI generated the crop, at exactly width x height
    _, prompt, _ = fake_comfy.prompts[-1]
    outputs = fake_comfy.output_dir.glob(f"img2img_{body['run_id']}_0_*.png")
    assert [Image.open(p).size for p in outputs] == [(64, 64)]


def test_original_mode_honours_denoise(client):
    inside = region(BOX)
    change = {}
    for denoise in (0.3, 0.9):
        out, body = run(client, {"inpaint_mode": "original", "denoising_strength": denoise, "mask_blur": 0})
        ks = [n for n in body["workflow"].values() if n["class_type"] == "KSampler"][0]["inputs"]
        assert ks["denoise"] == denoise
        assert "InpaintModelConditioning" in {n["class_type"] for n in body["workflow"].values()}
        assert (out[~inside] == SRC[~inside]).all()
        change[denoise] = np.abs(out[inside] - SRC[inside]).mean()
    assert 0 < change[0.3] < change[0.9]


def test_width_height_without_mask_are_the_output_size(client):
    out, _ = run(client, {"width": 72, "height": 66}, mask=False)
    assert out.shape == (66, 72, 3)


def test_without_width_height_the_output_has_the_input_size_even_off_multiples_of_8(client):
    out, _ = run(client, {}, mask=False)
    assert out.shape == SRC.shape


@pytest.mark.parametrize("mode,area,paste,invert", list(itertools.product(
    ["fill", "original"], ["whole", "only_masked"], [True, False], [False, True])))
def test_every_combination_runs_at_the_size_a1111_gives(client, mode, area, paste, invert):
    """"whole": width x height is the output size (the mask follows the image, as in A1111);
    "only masked": they are the crop's generation size, and the output keeps the input's."""
    out, body = run(client, {"inpaint_mode": mode, "inpaint_area": area, "paste_back": paste,
                             "mask_invert": invert, "width": 64, "height": 96})
    assert out.shape == ((96, 64, 3) if area == "whole" else SRC.shape)


def _saved_by_comfyui(fake_comfy, body) -> bytes:
    """The file ComfyUI saved for the request's prompt, as its /history lists it. The service
    answers from the outputs announced over the WebSocket, so the entry may not be written yet."""
    prompt_id = body["comfy_response"]["prompt_id"]
    entry = wait_until(lambda: requests.get(f"{fake_comfy.url}/history/{prompt_id}", timeout=5).json().get(prompt_id),
                       what=f"ComfyUI's /history entry of prompt {prompt_id}")
    (node_output,) = [o for o in entry["outputs"].values() if o.get("images")]
    image = node_output["images"][0]
    return (fake_comfy.output_dir / image["subfolder"] / image["filename"]).read_bytes()


@pytest.mark.parametrize("params", [{"mask_blur": 4}, {"mask_blur": 0, "inpaint_mode": "original"},
                                    {"paste_back": False}])
def test_whole_image_inpainting_is_finished_by_comfyui_and_served_as_saved(client, fake_comfy, params):
    """The paste-back and the crop of the padding are nodes of the workflow: the service serves
    ComfyUI's file byte for byte (it never decodes it)."""
    out, body = run(client, params)
    assert out.shape == SRC.shape
    classes = [n["class_type"] for n in body["workflow"].values()]
    assert classes.count("ImageCrop") == 1  # 101x77 was padded to 104x80
    assert classes.count("ImageCompositeMasked") == (0 if params.get("paste_back") is False else 1)
    served = client.get("/images/" + body["comfy_response"]["generated_images"][0]["filename"]).data
    assert served == _saved_by_comfyui(fake_comfy, body)


def test_only_masked_is_still_pasted_back_by_the_service(client, fake_comfy):
    out, body = run(client, {"inpaint_area": "only_masked", "width": 64, "height": 64, "mask_blur": 0})
    classes = [n["class_type"] for n in body["workflow"].values()]
    assert "ImageCompositeMasked" not in classes and "ImageCrop" not in classes
    served = client.get("/images/" + body["comfy_response"]["generated_images"][0]["filename"]).data
    assert served != _saved_by_comfyui(fake_comfy, body)
    assert Image.open(io.BytesIO(_saved_by_comfyui(fake_comfy, body))).size == (64, 64)
    assert out.shape == SRC.shape


def test_every_image_of_a_batch_is_pasted_back(client, fake_comfy):
    data = {"params": json.dumps({"prompt": "p", "steps": 2, "seed": 5, "mask_blur": 0, "batch_size": 3}),
            "image": (io.BytesIO(png(gradient(W, H))), "i.png"),
            "mask": (io.BytesIO(png(box_mask((W, H), BOX))), "m.png")}
    body = client.post("/api/img2img", data=data, content_type="multipart/form-data").get_json()
    images = body["comfy_response"]["generated_images"]
    assert len(images) == 3
    inside = region(BOX)
    outs = [np.asarray(Image.open(io.BytesIO(client.get("/images/" + i["filename"]).data)).convert("RGB"),
                       dtype=np.int16) for i in images]
    for out in outs:
        assert out.shape == SRC.shape
        assert (out[~inside] == SRC[~inside]).all()
        assert (out[inside] != SRC[inside]).any(-1).mean() > 0.9
    assert not (outs[0] == outs[1]).all()  # three different generations, each pasted back


def test_a_comfyui_without_the_compositing_nodes_gets_the_service_side_paste_back(app, client, fake_comfy):
    info = dict(fake_comfy.object_info)
    del info["ImageCompositeMasked"]
    fake_comfy.object_info = info
    app.extensions["img2img"].client.object_info(refresh=True)
    out, body = run(client, {"mask_blur": 0})
    assert "ImageCompositeMasked" not in [n["class_type"] for n in body["workflow"].values()]
    inside = region(BOX)
    assert out.shape == SRC.shape and (out[~inside] == SRC[~inside]).all()
    assert (out[inside] != SRC[inside]).any(-1).mean() > 0.9
