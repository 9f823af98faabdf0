"""LoRA, ControlNet and custom workflows through the service and the fake ComfyUI, alone and
with an inpainting mask. A 200 means the fake's ComfyUI validation accepted the workflow."""
import base64
import io
import json
from urllib.parse import urlsplit

import pytest
from PIL import Image

from images import box_mask, gradient, png

LORA = "tiny-lora-random.safetensors"
CN = "tiny-controlnet-random.safetensors"
W, H = 64, 48


def post(client, params, mask=False):
    data = {"params": json.dumps({"prompt": "a red cube", "negative_prompt": "blurry", "steps": 2, "seed": 3,
                                  **params}),
            "image": (io.BytesIO(png(gradient(W, H))), "i.png")}
    if mask:
        data["mask"] = (io.BytesIO(png(box_mask((W, H), (8, 8, 40, 32)))), "m.png")
    return client.post("/api/img2img", data=data, content_type="multipart/form-data")


def ok(resp):
    body = resp.get_json()
    assert resp.status_code == 200, body
    return body["workflow"]


def of(wf, cls):
    return {k: v for k, v in wf.items() if v["class_type"] == cls}


def image_loaders(wf):
    """The LoadImage nodes of images (the input, ControlNet hints), not the mask file's."""
    return {k: v for k, v in of(wf, "LoadImage").items() if not v["inputs"]["image"].endswith("_mask.png")}


def loads_mask(wf) -> bool:
    """The mask file is loaded (one LoadImage: its MASK inpaints, its red channel pastes back)."""
    return len(of(wf, "LoadImage")) - len(image_loaders(wf)) == 1


def leftovers(fake):
    return [p for p in fake.input_dir.rglob("*") if p.is_file()]


@pytest.mark.parametrize("mask", [False, True])
def test_lora_sits_between_checkpoint_and_its_consumers(client, mask):
    wf = ok(post(client, {"lora": {"enabled": True, "lora_name": LORA, "strength_model": 0.7,
                                   "strength_clip": 0.5}}, mask=mask))
    (lid, lora), = of(wf, "LoraLoader").items()
    (cid, _), = of(wf, "CheckpointLoaderSimple").items()
    assert lora["inputs"] == {"model": [cid, 0], "clip": [cid, 1], "lora_name": LORA, "strength_model": 0.7,
                              "strength_clip": 0.5}
    for ks in of(wf, "KSampler").values():
        assert ks["inputs"]["model"] == [lid, 0]
    for enc in of(wf, "CLIPTextEncode").values():
        assert enc["inputs"]["clip"] == [lid, 1]
    assert ("VAEEncodeForInpaint" in {n["class_type"] for n in wf.values()}) == mask


def test_chained_loras(client):
    wf = ok(post(client, {"lora": [{"enabled": True, "lora_name": LORA, "strength_model": 1.0, "strength_clip": 1.0},
                                   {"enabled": False, "lora_name": "ignored.safetensors"},
                                   {"lora_name": LORA, "strength_model": -0.5}]}))
    loras = of(wf, "LoraLoader")
    assert len(loras) == 2
    first, second = sorted(loras, key=int)
    assert loras[second]["inputs"]["model"] == [first, 0] and loras[second]["inputs"]["strength_model"] == -0.5


def test_disabled_or_null_lora_adds_nothing(client):
    assert of(ok(post(client, {"lora": None})), "LoraLoader") == {}
    assert of(ok(post(client, {"lora": {"enabled": False, "lora_name": "x"}})), "LoraLoader") == {}


def test_unknown_lora_lists_the_installed_ones(client, fake_comfy):
    resp = post(client, {"lora": {"enabled": True, "lora_name": "nope.safetensors"}})
    body = resp.get_json()
    assert resp.status_code == 400 and body["code"] == "unknown_lora" and LORA in body["message"]
    assert fake_comfy.prompts == []


def unit(**kw):
    return {"enabled": True, "model": CN, "preprocessor": "none", "control_type": "canny", "weight": 0.8,
            "guidance_start": 0.1, "guidance_end": 0.9, **kw}


@pytest.mark.parametrize("mask", [False, True])
def test_one_controlnet_unit_on_the_input_image(client, fake_comfy, mask):
    wf = ok(post(client, {"controlnet": {"enabled": True, "units": [unit()]}}, mask=mask))
    (aid, apply), = of(wf, "ControlNetApplyAdvanced").items()
    (lid, _), = image_loaders(wf).items()
    assert apply["inputs"]["image"] == [lid, 0]
    assert (apply["inputs"]["strength"], apply["inputs"]["start_percent"], apply["inputs"]["end_percent"]) == \
        (0.8, 0.1, 0.9)
    (ks,) = of(wf, "KSampler").values()
    assert ks["inputs"]["positive"] == [aid, 0] and ks["inputs"]["negative"] == [aid, 1]
    pos = wf[apply["inputs"]["positive"][0]]
    assert pos["class_type"] == "CLIPTextEncode" and pos["inputs"]["text"] == "a red cube"
    if mask:  # the inpainting encode takes the input image's loader, not a ControlNet image
        (enc,) = of(wf, "VAEEncodeForInpaint").values()
        assert enc["inputs"]["pixels"] == [lid, 0]
    assert leftovers(fake_comfy) == []


def test_two_units_chain_and_own_images_are_staged_and_removed(client, fake_comfy):
    hint = "data:image/png;base64," + base64.b64encode(png(Image.new("RGB", (32, 32), "white"))).decode()
    wf = ok(post(client, {"controlnet": {"enabled": True, "units": [
        unit(input_image=hint, preprocessor="canny", threshold_a=100, threshold_b=200),
        unit(control_type="depth", weight=1.2)]}}, mask=True))
    applies = of(wf, "ControlNetApplyAdvanced")
    assert len(applies) == 2
    first, second = sorted(applies, key=int)
    assert applies[second]["inputs"]["positive"] == [first, 0]
    (canny,) = of(wf, "Canny").values()
    assert canny["inputs"]["low_threshold"] == round(100 / 255, 3)
    assert wf[canny["inputs"]["image"][0]]["class_type"] == "LoadImage"
    assert len(image_loaders(wf)) == 2 and loads_mask(wf)
    assert leftovers(fake_comfy) == []


@pytest.mark.parametrize("low, high", [(200, 100), (0.9, None)])  # None: the default high (0.8)
def test_canny_thresholds_that_cross_are_swapped(client, low, high):
    """The page's two sliders cross freely; ComfyUI's Canny (kornia) fails when low > high: a
    502 at execution, found on a real ComfyUI 0.3.40. OpenCV, behind AUTOMATIC1111, swaps them."""
    thresholds = {"threshold_a": low, **({"threshold_b": high} if high is not None else {})}
    wf = ok(post(client, {"controlnet": {"units": [unit(preprocessor="canny", **thresholds)]}}))
    (canny,) = of(wf, "Canny").values()
    assert canny["inputs"]["low_threshold"] < canny["inputs"]["high_threshold"]


def test_the_fake_fails_canny_with_crossed_thresholds_as_comfyui_does(fake_comfy):
    """What the service now avoids, kept by the fake as real ComfyUI 0.3.40 does it."""
    from fake_fixtures import execution_error
    (fake_comfy.input_dir / "c.png").write_bytes(png(gradient(16, 16)))
    error = execution_error(fake_comfy, {
        "1": {"class_type": "LoadImage", "inputs": {"image": "c.png"}},
        "2": {"class_type": "Canny", "inputs": {"image": ["1", 0], "low_threshold": 0.9, "high_threshold": 0.8}},
        "3": {"class_type": "PreviewImage", "inputs": {"images": ["2", 0]}}})
    assert (error.node_type, error.exception_type) == ("Canny", "kornia.core.exceptions.BaseError")
    assert "low_threshold should be smaller than or equal to the high_threshold. Got: 0.9>0.8" in str(error)


def test_union_models_get_their_type(client, fake_comfy):
    fake_comfy.add_model("controlnet", "tiny-union-controlnet.safetensors")
    wf = ok(post(client, {"controlnet": {"units": [unit(model="tiny-union-controlnet.safetensors",
                                                          control_type="canny")]}}))
    (union,) = of(wf, "SetUnionControlNetType").values()
    assert union["inputs"]["type"] == "canny/lineart/anime_lineart/mlsd"


@pytest.mark.parametrize("bad,code", [
    (unit(model="nope.safetensors"), "unknown_controlnet"),
    (unit(preprocessor="dw_openpose_full"), "unsupported_preprocessor"),
    (unit(weight=3), "invalid_parameter"),
    (unit(input_image="not base64!"), "invalid_base64"),
])
def test_controlnet_errors(client, fake_comfy, bad, code):
    resp = post(client, {"controlnet": {"enabled": True, "units": [bad]}})
    assert resp.status_code == 400 and resp.get_json()["code"] == code, resp.get_json()
    assert fake_comfy.prompts == [] and leftovers(fake_comfy) == []


def custom(ids=("3.5", "10:2", "7", "a", "b", "c", "d", "e")):
    ck, pos, neg, load, enc, ks, dec, save = ids
    return {
        ck: {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "whatever.safetensors"}},
        pos: {"class_type": "CLIPTextEncode", "inputs": {"text": "old positive", "clip": [ck, 1]}},
        neg: {"class_type": "CLIPTextEncode", "inputs": {"text": "old negative", "clip": [ck, 1]}},
        load: {"class_type": "LoadImage", "inputs": {"image": "example.png"}},
        enc: {"class_type": "VAEEncode", "inputs": {"pixels": [load, 0], "vae": [ck, 2]}},
        ks: {"class_type": "KSampler", "inputs": {"model": [ck, 0], "positive": [pos, 0], "negative": [neg, 0],
                                                   "latent_image": [enc, 0], "seed": 1, "steps": 30, "cfg": 8.0,
                                                   "sampler_name": "euler", "scheduler": "normal", "denoise": 0.5}},
        dec: {"class_type": "VAEDecode", "inputs": {"samples": [ks, 0], "vae": [ck, 2]}},
        save: {"class_type": "SaveImage", "inputs": {"images": [dec, 0], "filename_prefix": "mine"}},
    }


@pytest.mark.parametrize("wrapped", [False, True])
@pytest.mark.parametrize("mask", [False, True])
def test_custom_workflow_with_odd_ids_gets_our_parameters(client, wrapped, mask):
    cw = custom()
    wf = ok(post(client, {"custom_workflow": {"prompt": cw} if wrapped else cw, "steps": 4, "batch_size": 2},
                 mask=mask))
    assert wf["10:2"]["inputs"]["text"] == "a red cube" and wf["7"]["inputs"]["text"] == "blurry"
    assert wf["3.5"]["inputs"]["ckpt_name"] == "tiny-sd15-random.safetensors"
    assert wf["c"]["inputs"]["steps"] == 4 and wf["c"]["inputs"]["seed"] == 3
    assert wf["a"]["inputs"]["image"].startswith("img2img_")
    assert wf["e"]["inputs"]["filename_prefix"].startswith("img2img_")
    assert len(of(wf, "RepeatLatentBatch")) == 1
    assert loads_mask(wf) == mask


@pytest.mark.parametrize("mask", [False, True])
def test_two_identical_save_nodes_give_one_image_and_leave_nothing_else_served(client, service_config, mask):
    """ComfyUI runs the second of two identical SaveImage nodes from its cache: both announce
    one file. One image in the answer, one file in the served folder (a temporary link stayed)."""
    cw = custom()
    cw["e2"] = json.loads(json.dumps(cw["e"]))
    resp = post(client, {"custom_workflow": cw}, mask=mask)
    assert resp.status_code == 200, resp.get_json()
    images = resp.get_json()["comfy_response"]["generated_images"]
    assert len(images) == 1
    assert sorted(p.name for p in service_config.served_images_dir.iterdir()) == [images[0]["filename"]]


def test_custom_workflow_with_lora_and_controlnet_and_mask(client):
    wf = ok(post(client, {"custom_workflow": custom(), "lora": {"lora_name": LORA},
                          "controlnet": {"units": [unit()]}}, mask=True))
    classes = {n["class_type"] for n in wf.values()}
    assert {"LoraLoader", "ControlNetApplyAdvanced", "VAEEncodeForInpaint"} <= classes and loads_mask(wf)


def test_ui_format_workflow_is_explained(client):
    ui = {"last_node_id": 9, "nodes": [{"id": 1, "type": "KSampler"}], "links": [], "version": 0.4}
    body = post(client, {"custom_workflow": ui}).get_json()
    assert body["code"] == "invalid_custom_workflow" and "API format" in body["message"]


def test_custom_workflow_without_load_image_is_rejected(client):
    cw = custom()
    cw["a"] = {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}}
    cw["b"]["inputs"]["pixels"] = ["a", 0]
    body = post(client, {"custom_workflow": cw}).get_json()
    assert body["code"] == "invalid_custom_workflow" and "LoadImage" in body["message"]


def with_extra_loader(value, class_type="LoadImage"):
    """custom() plus a second image loader feeding a PreviewImage (a reference image, say)."""
    cw = custom()
    cw["x"] = {"class_type": class_type, "inputs": {"image": value}}
    cw["y"] = {"class_type": "PreviewImage", "inputs": {"images": ["x", 0]}}
    return cw


@pytest.mark.parametrize("where", ["absolute", "dotdot", "output", "temp", "backslashes", "drive"])
def test_custom_workflow_reads_no_file_outside_comfyuis_input_folder(client, fake_comfy, tmp_path, where):
    """ComfyUI's LoadImage opens whatever path exists: an absolute or '../' name, or one annotated
    [output] / [temp], would come back as a served image."""
    secret = tmp_path / "private.png"
    secret.write_bytes(png(gradient(8, 8)))
    (fake_comfy.output_dir / "someone_elses.png").write_bytes(png(gradient(8, 8)))
    value = {"absolute": str(secret), "dotdot": f"../{secret.parent.name}/private.png",
             "output": "someone_elses.png [output]", "temp": "x.png [temp]",
             "backslashes": "..\\private.png", "drive": "C:\\private.png"}[where]
    body = post(client, {"custom_workflow": with_extra_loader(value)}).get_json()
    assert body["code"] == "invalid_custom_workflow" and "'x'" in body["message"], body
    assert fake_comfy.prompts == [] and leftovers(fake_comfy) == []


def test_custom_workflow_cannot_load_from_the_output_folder(client, fake_comfy):
    body = post(client, {"custom_workflow": with_extra_loader("a.png [output]", "LoadImageOutput")}).get_json()
    assert body["code"] == "invalid_custom_workflow" and "output folder" in body["message"], body
    assert fake_comfy.prompts == []


@pytest.mark.parametrize("name", ["ref.png", "refs/ref.png [input]"])
def test_custom_workflow_may_load_a_file_of_comfyuis_input_folder(client, fake_comfy, name):
    (fake_comfy.input_dir / "refs").mkdir(exist_ok=True)
    (fake_comfy.input_dir / name.removesuffix(" [input]")).write_bytes(png(gradient(8, 8)))
    wf = ok(post(client, {"custom_workflow": with_extra_loader(name)}))
    assert wf["x"]["inputs"]["image"] == name


@pytest.mark.parametrize("mask", [False, True])
def test_custom_workflow_side_output_is_served_as_comfyui_made_it(client, fake_comfy, mask):
    """A preview of a reference image is not the request's picture: it was scaled to the request's
    size (and, with a mask, pasted into the input image) like the generated one."""
    (fake_comfy.input_dir / "ref.png").write_bytes(png(gradient(8, 8)))
    body = post(client, {"custom_workflow": with_extra_loader("ref.png")}, mask=mask).get_json()
    sizes = []
    for image in body["comfy_response"]["generated_images"]:
        served = client.get(urlsplit(image["url"]).path)
        assert served.status_code == 200, image
        sizes.append(Image.open(io.BytesIO(served.data)).size)
    assert sorted(sizes) == [(8, 8), (W, H)], sizes


def test_upload_inputs_are_read_from_object_info():
    """Custom nodes' file inputs are found the way ComfyUI marks them (image_upload, …)."""
    from dreamlayer.comfyui.fake.catalog import load_fixture
    from dreamlayer.img2img.workflow import check_file_inputs, upload_inputs, WorkflowError
    info = load_fixture()
    info["VHS_LoadVideo"] = {"input": {"required": {"video": [["a.mp4"], {"video_upload": True}],
                                                    "frames": ["INT", {"default": 0}]}}}
    found = upload_inputs(info)
    assert {("LoadImage", "image"), ("LoadImageMask", "image"), ("VHS_LoadVideo", "video")} <= found
    assert ("CheckpointLoaderSimple", "ckpt_name") not in found  # ComfyUI checks those against its list
    with pytest.raises(WorkflowError, match="'v'"):
        check_file_inputs({"v": {"class_type": "VHS_LoadVideo", "inputs": {"video": "/home/me/a.mp4"}}}, found)
