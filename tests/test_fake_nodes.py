"""The fake ComfyUI's node classes for issue 14 (hires fix, refiner, tiled VAE, VAE override) and
issue 15 (inpainting), and the facerestore_cf opt-in: catalog, validation and pixel model.

Validation errors are compared with the shapes of the captured 0.3.40 rejections
(tests/fixtures/comfyui_captures.json); the pixel model is the fake's own (README.md of the fake).
"""
from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import requests
from PIL import Image

from dreamlayer.comfyui.fake import FakeComfyUI
from dreamlayer.comfyui.fake.nodes import upscale_model_scale, vae_tint
from test_fake_comfyui import CAPS, INPUTS, post_prompt, put_inputs, run

CKPT = "tiny-sd15-random.safetensors"
REFINER = "tiny-sd15-refiner-random.safetensors"
INPAINT_CKPT = "tiny-sd15-inpainting-random.safetensors"
VAE = "tiny-vae-random.safetensors"


# --- helpers ----------------------------------------------------------------------------------

def node(class_type, **inputs):
    return {"class_type": class_type, "inputs": inputs}


def base(ckpt=CKPT) -> dict:
    """Checkpoint "1" and one text encoding "2"."""
    return {"1": node("CheckpointLoaderSimple", ckpt_name=ckpt), "2": node("CLIPTextEncode", text="x", clip=["1", 1])}


def ksampler(model, latent, seed=7, steps=4, denoise=1.0, positive=("2", 0), negative=("2", 0)):
    return node("KSampler", model=list(model), seed=seed, steps=steps, cfg=7.0, sampler_name="euler",
                scheduler="normal", positive=list(positive), negative=list(negative), latent_image=list(latent),
                denoise=denoise)


def advanced(model, latent, start, end, add_noise="enable", leftover="disable", seed=7, steps=4):
    return node("KSamplerAdvanced", model=list(model), add_noise=add_noise, noise_seed=seed, steps=steps, cfg=7.0,
                sampler_name="euler", scheduler="normal", positive=["2", 0], negative=["2", 0],
                latent_image=list(latent), start_at_step=start, end_at_step=end,
                return_with_leftover_noise=leftover)


def show(prompt: dict, out_id: str, image) -> None:
    """A PreviewImage of `image` (a link) under id out_id."""
    prompt[out_id] = node("PreviewImage", images=list(image))


def show_latent(prompt: dict, out_id: str, latent, vae=("1", 2)) -> None:
    prompt[out_id + "d"] = node("VAEDecode", samples=list(latent), vae=list(vae))
    show(prompt, out_id, (out_id + "d", 0))


def execute(fake, prompt, client="nodes"):
    """Run over HTTP + WS; ({output node id: [uint8 RGB arrays as int16]}, messages)."""
    _, msgs = run(fake, prompt, client)
    errors = [m["data"] for m in msgs if isinstance(m, dict) and m["type"] == "execution_error"]
    assert not errors, (errors[0]["node_type"], errors[0]["exception_message"])
    images = {}
    for m in msgs:
        if isinstance(m, dict) and m["type"] == "executed":
            images[m["data"]["node"]] = [
                np.asarray(Image.open(Path(fake.folders.by_type(i["type"])) / i["subfolder"] / i["filename"])
                           .convert("RGB")).astype(np.int16) for i in m["data"]["output"]["images"]]
    return images, msgs


def one(images, out_id) -> np.ndarray:
    return images[out_id][0]


def progress_of(msgs, node_id) -> list:
    return [(m["data"]["value"], m["data"]["max"]) for m in msgs
            if isinstance(m, dict) and m["type"] == "progress" and m["data"]["node"] == node_id]


def runs_of(fake, class_type) -> dict:
    return {r["node"]: r for r in fake.node_runs if r["class_type"] == class_type}


def src_pixels() -> np.ndarray:
    return np.asarray(Image.open(INPUTS / "probe_src_64.png").convert("RGB")).astype(np.int16)


def object_info(fake) -> dict:
    return requests.get(fake.url + "/object_info", timeout=5).json()


# --- catalog ------------------------------------------------------------------------------------

def test_new_classes_carry_comfyui_0340_inputs_and_outputs(fake_comfy):
    info = object_info(fake_comfy)
    req = {name: info[name]["input"]["required"] for name in info}
    assert req["VAEEncodeTiled"]["tile_size"] == ["INT", {"default": 512, "min": 64, "max": 4096, "step": 64}]
    assert req["VAEDecodeTiled"]["tile_size"] == ["INT", {"default": 512, "min": 64, "max": 4096, "step": 32}]
    for name in ("VAEEncodeTiled", "VAEDecodeTiled"):
        assert req[name]["overlap"] == ["INT", {"default": 64, "min": 0, "max": 4096, "step": 32}]
        assert list(req[name])[2:] == ["tile_size", "overlap", "temporal_size", "temporal_overlap"]
    assert req["LatentUpscaleBy"]["scale_by"] == ["FLOAT", {"default": 1.5, "min": 0.01, "max": 8.0, "step": 0.01}]
    assert req["ImageScaleBy"]["scale_by"] == ["FLOAT", {"default": 1.0, "min": 0.01, "max": 8.0, "step": 0.01}]
    assert req["LatentUpscaleBy"]["upscale_method"][0][-1] == "bislerp"
    assert req["ImageScaleBy"]["upscale_method"][0][-1] == "lanczos"
    assert info["ImageUpscaleWithModel"]["input_order"]["required"] == ["upscale_model", "image"]
    assert info["InpaintModelConditioning"]["input_order"]["required"] == [
        "positive", "negative", "vae", "pixels", "mask", "noise_mask"]
    assert info["InpaintModelConditioning"]["output"] == ["CONDITIONING", "CONDITIONING", "LATENT"]
    assert info["InpaintModelConditioning"]["output_name"] == ["positive", "negative", "latent"]
    assert req["InpaintModelConditioning"]["noise_mask"][1]["default"] is True
    assert info["DifferentialDiffusion"]["output"] == ["MODEL"]
    assert info["DifferentialDiffusion"]["python_module"] == "comfy_extras.nodes_differential_diffusion"
    assert list(req["FeatherMask"]) == ["mask", "left", "top", "right", "bottom"]
    assert req["ThresholdMask"]["value"] == ["FLOAT", {"default": 0.5, "min": 0.0, "max": 1.0, "step": 0.01}]
    assert req["VAELoader"]["vae_name"] == [[]] and req["UpscaleModelLoader"]["model_name"] == [[]]
    assert "FaceRestoreCFWithModel" not in info and "FaceRestoreModelLoader" not in info  # custom: off


def test_model_files_fill_their_loader_enums_at_object_info_time(fake_comfy):
    fake_comfy.add_model("upscale_models", "tiny-esrgan-2x-random.pth")
    fake_comfy.add_model("upscale_models", "4x-UltraSharp.pth")
    fake_comfy.add_model("upscale_models", "notes.txt")  # ComfyUI lists model extensions only
    fake_comfy.add_model("checkpoints", REFINER)
    fake_comfy.add_model("vae", VAE)
    req = lambda info, cls: info[cls]["input"]["required"]  # noqa: E731
    info = object_info(fake_comfy)
    assert req(info, "UpscaleModelLoader")["model_name"] == [["4x-UltraSharp.pth", "tiny-esrgan-2x-random.pth"]]
    assert req(info, "CheckpointLoaderSimple")["ckpt_name"][0] == [CKPT, REFINER]
    assert req(info, "VAELoader")["vae_name"] == [[VAE]]
    # VAELoader offers "taesd" once both halves are in vae_approx, after the sorted files
    fake_comfy.add_model("vae_approx", "taesd_decoder.pth")
    assert req(object_info(fake_comfy), "VAELoader")["vae_name"] == [[VAE]]
    fake_comfy.add_model("vae_approx", "taesd_encoder.safetensors")
    fake_comfy.add_model("vae", "a-first.safetensors")
    assert req(object_info(fake_comfy), "VAELoader")["vae_name"] == [["a-first.safetensors", VAE, "taesd"]]
    models = lambda folder: requests.get(f"{fake_comfy.url}/models/{folder}", timeout=5).json()  # noqa: E731
    assert models("vae") == ["a-first.safetensors", VAE]
    assert models("vae_approx") == ["taesd_decoder.pth", "taesd_encoder.safetensors"]
    assert models("upscale_models") == ["4x-UltraSharp.pth", "tiny-esrgan-2x-random.pth"]
    prompt = {"1": node("VAELoader", vae_name="taesd"), "3": node("EmptyLatentImage", width=64, height=64,
                                                                    batch_size=1)}
    show_latent(prompt, "9", ("3", 0), vae=("1", 0))
    assert post_prompt(fake_comfy, prompt).status_code == 200
    with pytest.raises(ValueError):
        fake_comfy.add_model("facerestore_models", "codeformer.pth")  # that folder comes with the custom pack


@pytest.mark.parametrize("name, scale", [
    ("tiny-esrgan-2x-random.pth", 2), ("4x-UltraSharp.pth", 4), ("RealESRGAN_x2plus.pth", 2),
    ("RealESRGAN_x4plus_anime_6B.pth", 4), ("BSRGANx2.pth", 2), ("8x_NMKD-Superscale_150000_G.pth", 8),
    ("1x-ITF-SkinDiffDetail.pth", 1), ("sub/2x_AniScale.safetensors", 2), ("4x_NMKD-Siax_200k.pth", 4),
    ("ESRGAN.pth", 4), ("model_200k.pth", 4)])
def test_upscale_model_scale_comes_from_the_file_name(name, scale):
    assert upscale_model_scale(name) == scale


# --- validation: ComfyUI's error shapes -------------------------------------------------------

def _shape(obj):
    """Keys (recursively) and value types, to compare an error with a captured one of its kind."""
    if isinstance(obj, dict):
        return {k: _shape(v) for k, v in obj.items()}
    return "list" if isinstance(obj, list) else type(obj).__name__


def _prompt_for(class_type: str) -> tuple[dict, str]:
    """A small valid prompt whose node "4" is of class_type (output "9")."""
    p = base()
    p["3"] = node("EmptyLatentImage", width=64, height=64, batch_size=1)
    p["5"] = node("SolidMask", value=1.0, width=16, height=16)
    p["6"] = node("MaskToImage", mask=["5", 0])
    if class_type == "LatentUpscaleBy":
        p["4"] = node(class_type, samples=["3", 0], upscale_method="bilinear", scale_by=1.5)
        show_latent(p, "9", ("4", 0))
    elif class_type == "ImageScaleBy":
        p["4"] = node(class_type, image=["6", 0], upscale_method="bilinear", scale_by=2.0)
        show(p, "9", ("4", 0))
    elif class_type == "VAEEncodeTiled":
        p["4"] = node(class_type, pixels=["6", 0], vae=["1", 2], tile_size=512, overlap=64, temporal_size=64,
                      temporal_overlap=8)
        show_latent(p, "9", ("4", 0))
    elif class_type == "VAEDecodeTiled":
        p["4"] = node(class_type, samples=["3", 0], vae=["1", 2], tile_size=512, overlap=64, temporal_size=64,
                      temporal_overlap=8)
        show(p, "9", ("4", 0))
    elif class_type == "FeatherMask":
        p["4"] = node(class_type, mask=["5", 0], left=2, top=2, right=2, bottom=2)
        p["7"] = node("MaskToImage", mask=["4", 0])
        show(p, "9", ("7", 0))
    elif class_type == "ThresholdMask":
        p["4"] = node(class_type, mask=["5", 0], value=0.5)
        p["7"] = node("MaskToImage", mask=["4", 0])
        show(p, "9", ("7", 0))
    elif class_type == "KSamplerAdvanced":
        p["4"] = advanced(("1", 0), ("3", 0), 0, 10000)
        show_latent(p, "9", ("4", 0))
    elif class_type == "InpaintModelConditioning":
        p["4"] = node(class_type, positive=["2", 0], negative=["2", 0], vae=["1", 2], pixels=["6", 0],
                      mask=["5", 0], noise_mask=True)
        p["8"] = ksampler(("1", 0), ("4", 2), positive=("4", 0), negative=("4", 1))
        show_latent(p, "9", ("8", 0))
    return p, "4"


def _expected_error(kind: str, name: str, spec: list, value, converted):
    config = [spec[0], spec[1]]
    if kind == "min":
        return {"type": "value_smaller_than_min", "message": f"Value {converted} smaller than min of {spec[1]['min']}",
                "details": name, "extra_info": {"input_name": name, "input_config": config,
                                                "received_value": converted}}
    if kind == "max":
        return {"type": "value_bigger_than_max", "message": f"Value {converted} bigger than max of {spec[1]['max']}",
                "details": name, "extra_info": {"input_name": name, "input_config": config,
                                                "received_value": converted}}
    try:
        {"INT": int, "FLOAT": float}[spec[0]](value)
    except ValueError as ex:
        msg = str(ex)
    return {"type": "invalid_input_type", "message": f"Failed to convert an input value to a {spec[0]} value",
            "details": f"{name}, {value}, {msg}", "extra_info": {"input_name": name, "input_config": config,
                                                                 "received_value": value, "exception_message": msg}}


CAPTURED_KIND = {"min": "int_below_min", "max": "float_above_max", "type": "bad_int_type"}

VALIDATION_CASES = [
    ("LatentUpscaleBy", "scale_by", "min", 0.001), ("LatentUpscaleBy", "scale_by", "max", 8.5),
    ("LatentUpscaleBy", "scale_by", "type", "big"),
    ("ImageScaleBy", "scale_by", "min", 0), ("ImageScaleBy", "scale_by", "max", 9),
    ("ImageScaleBy", "scale_by", "type", "x2"),
    ("VAEEncodeTiled", "tile_size", "min", 32), ("VAEEncodeTiled", "tile_size", "max", 4097),
    ("VAEEncodeTiled", "tile_size", "type", "big"), ("VAEEncodeTiled", "overlap", "min", -32),
    ("VAEEncodeTiled", "temporal_overlap", "min", 2),
    ("VAEDecodeTiled", "tile_size", "min", 48), ("VAEDecodeTiled", "overlap", "max", 8192),
    ("VAEDecodeTiled", "temporal_size", "type", "1.5"),
    ("FeatherMask", "left", "min", -1), ("FeatherMask", "bottom", "max", 16385), ("FeatherMask", "top", "type", "a"),
    ("ThresholdMask", "value", "min", -0.1), ("ThresholdMask", "value", "max", 1.01),
    ("ThresholdMask", "value", "type", "half"),
    ("KSamplerAdvanced", "start_at_step", "min", -1), ("KSamplerAdvanced", "end_at_step", "max", 10001),
    ("KSamplerAdvanced", "noise_seed", "type", "seven"),
]


@pytest.mark.parametrize("class_type, name, kind, value", VALIDATION_CASES,
                         ids=[f"{c[0]}-{c[1]}-{c[2]}" for c in VALIDATION_CASES])
def test_out_of_range_and_wrong_type_values_are_rejected_like_comfyui(fake_comfy, class_type, name, kind, value):
    prompt, node_id = _prompt_for(class_type)
    assert post_prompt(fake_comfy, copy.deepcopy(prompt)).status_code == 200  # the template itself is valid
    fake_comfy.wait_idle()
    prompt[node_id]["inputs"][name] = value
    r = post_prompt(fake_comfy, prompt)
    assert r.status_code == 400 and r.headers["Content-Type"] == "application/json; charset=utf-8"
    spec = fake_comfy.object_info[class_type]["input"]["required"][name]
    converted = value if kind == "type" else {"INT": int, "FLOAT": float}[spec[0]](value)
    error = _expected_error(kind, name, spec, value, converted)
    body = r.json()
    assert body == {"error": {"type": "prompt_outputs_failed_validation", "message": "Prompt outputs failed validation",
                              "details": "", "extra_info": {}},
                    "node_errors": {node_id: {"errors": [error], "dependent_outputs": ["9"],
                                              "class_type": class_type}}}
    captured = CAPS["prompt_errors"][CAPTURED_KIND[kind]]["body"]
    assert _shape(body) == _shape({**captured, "node_errors": {node_id: next(iter(captured["node_errors"].values()))}})


@pytest.mark.parametrize("class_type, name, value", [
    ("VAEEncodeTiled", "tile_size", 100), ("VAEDecodeTiled", "tile_size", 100), ("VAEDecodeTiled", "overlap", 33),
    ("ImageScaleBy", "scale_by", 1.234), ("ThresholdMask", "value", 0.333), ("InpaintModelConditioning",
                                                                              "noise_mask", "no")])
def test_step_is_not_validated_and_booleans_convert_anything(fake_comfy, class_type, name, value):
    """0.3.40's validate_inputs checks min and max only; BOOLEAN is bool(value) ("no" is True)."""
    prompt, node_id = _prompt_for(class_type)
    prompt[node_id]["inputs"][name] = value
    r = post_prompt(fake_comfy, prompt)
    assert r.status_code == 200, r.text
    queued = fake_comfy.prompts[-1][1][node_id]["inputs"][name]
    assert queued is True if name == "noise_mask" else queued == value
    fake_comfy.wait_idle()
    assert requests.get(f"{fake_comfy.url}/history/{r.json()['prompt_id']}", timeout=5).json()[
        r.json()["prompt_id"]]["status"]["status_str"] == "success"


@pytest.mark.parametrize("class_type, name, link, received", [
    ("ImageUpscaleWithModel", "upscale_model", ["1", 0], "MODEL"),
    ("DifferentialDiffusion", "model", ["1", 2], "VAE"),
    ("InpaintModelConditioning", "mask", ["6", 0], "IMAGE"),
    ("VAEDecodeTiled", "samples", ["6", 0], "IMAGE"),
])
def test_links_of_the_wrong_type_are_rejected_like_comfyui(fake_comfy, class_type, name, link, received):
    p = base()
    p["3"] = node("EmptyLatentImage", width=64, height=64, batch_size=1)
    p["5"] = node("SolidMask", value=1.0, width=16, height=16)
    p["6"] = node("MaskToImage", mask=["5", 0])
    p["4"] = {"ImageUpscaleWithModel": node(class_type, upscale_model=["1", 0], image=["6", 0]),
              "DifferentialDiffusion": node(class_type, model=["1", 2]),
              "VAEDecodeTiled": node(class_type, samples=["6", 0], vae=["1", 2], tile_size=512, overlap=64,
                                     temporal_size=64, temporal_overlap=8)}.get(class_type)
    if class_type == "InpaintModelConditioning":
        p["4"] = node(class_type, positive=["2", 0], negative=["2", 0], vae=["1", 2], pixels=["6", 0], mask=link,
                      noise_mask=True)
    if class_type == "DifferentialDiffusion":
        p["7"] = ksampler(("4", 0), ("3", 0))
    elif class_type == "InpaintModelConditioning":
        p["7"] = ksampler(("1", 0), ("4", 2), positive=("4", 0), negative=("4", 1))
    if "7" in p:
        show_latent(p, "9", ("7", 0))
    else:
        show(p, "9", ("4", 0))
    body = post_prompt(fake_comfy, p).json()
    spec = fake_comfy.object_info[class_type]["input"]["required"][name]
    want = {"type": "return_type_mismatch", "message": "Return type mismatch between linked nodes",
            "details": f"{name}, received_type({received}) mismatch input_type({spec[0]})",
            "extra_info": {"input_name": name, "input_config": [spec[0], {}], "received_type": received,
                           "linked_node": link}}
    assert body["node_errors"]["4"]["errors"] == [want]
    captured = CAPS["prompt_errors"]["link_wrong_type"]["body"]["node_errors"]["7"]
    assert _shape(body["node_errors"]["4"]["errors"]) == _shape(captured["errors"])


def test_loader_enums_reject_unknown_files_with_the_list(fake_comfy):
    fake_comfy.add_model("vae", VAE)
    prompt = {"1": node("VAELoader", vae_name="missing.safetensors"), "2": node("UpscaleModelLoader",
                                                                                model_name="4x.pth"),
              "3": node("SolidMask", value=1.0, width=8, height=8), "4": node("MaskToImage", mask=["3", 0]),
              "5": node("ImageUpscaleWithModel", upscale_model=["2", 0], image=["4", 0]),
              "6": node("VAEEncode", pixels=["5", 0], vae=["1", 0])}
    show_latent(prompt, "9", ("6", 0), vae=("1", 0))
    body = post_prompt(fake_comfy, prompt).json()
    assert body["node_errors"]["1"]["errors"] == [{
        "type": "value_not_in_list", "message": "Value not in list",
        "details": f"vae_name: 'missing.safetensors' not in ['{VAE}']",
        # get_input_info gives {} as extra_info when the spec has none
        "extra_info": {"input_name": "vae_name", "input_config": [[VAE], {}], "received_value": "missing.safetensors"}}]
    assert body["node_errors"]["2"]["errors"][0]["details"] == "model_name: '4x.pth' not in []"
    assert _shape(body["node_errors"]["1"]) == _shape(CAPS["prompt_errors"]["bad_ckpt_name"]["body"]["node_errors"]["1"])


# --- pixel model: sizes ---------------------------------------------------------------------------

def test_image_upscale_with_model_uses_the_native_scale(fake_comfy):
    put_inputs(fake_comfy, "probe_src_64.png")
    for name in ("tiny-esrgan-2x-random.pth", "4x-UltraSharp.pth"):
        fake_comfy.add_model("upscale_models", name)
    prompt = {"1": node("LoadImage", image="probe_src_64.png"),
              "2": node("UpscaleModelLoader", model_name="tiny-esrgan-2x-random.pth"),
              "3": node("ImageUpscaleWithModel", upscale_model=["2", 0], image=["1", 0]),
              "4": node("UpscaleModelLoader", model_name="4x-UltraSharp.pth"),
              "5": node("ImageUpscaleWithModel", upscale_model=["4", 0], image=["1", 0])}
    show(prompt, "8", ("3", 0))
    show(prompt, "9", ("5", 0))
    images, msgs = execute(fake_comfy, prompt)
    src = src_pixels()
    x2, x4 = one(images, "8"), one(images, "9")
    assert x2.shape == (128, 128, 3) and x4.shape == (256, 256, 3)
    assert np.array_equal(x2[::2, ::2], src) and np.array_equal(x2[1::2, 1::2], src)
    assert np.array_equal(x4[3::4, ::4], src)
    assert progress_of(msgs, "3") == [(1, 1)]  # one 512px tile: comfy.utils.ProgressBar(1)
    assert {n: r["scale"] for n, r in runs_of(fake_comfy, "ImageUpscaleWithModel").items()} == {"3": 2, "5": 4}


def test_upscale_progress_counts_512px_tiles(fake_comfy):
    fake_comfy.add_model("upscale_models", "x2.pth")
    prompt = {"1": node("SolidMask", value=0.5, width=1000, height=600), "2": node("MaskToImage", mask=["1", 0]),
              "3": node("UpscaleModelLoader", model_name="x2.pth"),
              "4": node("ImageUpscaleWithModel", upscale_model=["3", 0], image=["2", 0]),
              "5": node("ImageScale", image=["4", 0], upscale_method="nearest-exact", width=10, height=0,
                        crop="disabled")}
    show(prompt, "9", ("5", 0))
    images, msgs = execute(fake_comfy, prompt)
    # get_tiled_scale_steps(1000, 600, 512, 512, 32): ceil(968/480) cols * ceil(568/480) rows = 3 * 2
    assert progress_of(msgs, "4") == [(i, 6) for i in range(1, 7)]
    assert one(images, "9").shape == (6, 10, 3)


def test_latent_and_image_scale_sizes(fake_comfy):
    put_inputs(fake_comfy, "probe_src_64.png")
    prompt = base()
    prompt["3"] = node("EmptyLatentImage", width=100, height=70, batch_size=1)  # latent 12 x 8
    for out_id, scale in (("11", 1.5), ("12", 1.25), ("13", 0.5)):
        prompt[out_id + "u"] = node("LatentUpscaleBy", samples=["3", 0], upscale_method="nearest-exact",
                                    scale_by=scale)
        show_latent(prompt, out_id, (out_id + "u", 0))
    prompt["4"] = node("LoadImage", image="probe_src_64.png")
    for out_id, scale in (("21", 0.5), ("22", 1.3)):
        prompt[out_id + "s"] = node("ImageScaleBy", image=["4", 0], upscale_method="bilinear", scale_by=scale)
        show(prompt, out_id, (out_id + "s", 0))
    for out_id, (w, h, crop) in {"31": (50, 30, "disabled"), "32": (0, 40, "disabled"),
                                 "33": (48, 16, "center")}.items():
        prompt[out_id + "s"] = node("ImageScale", image=["4", 0], upscale_method="area", width=w, height=h,
                                    crop=crop)
        show(prompt, out_id, (out_id + "s", 0))
    images, _ = execute(fake_comfy, prompt)
    size = lambda out_id: one(images, out_id).shape[1::-1]  # noqa: E731 - (width, height)
    assert size("11") == (144, 96)   # round(12 * 1.5) x round(8 * 1.5) latent cells
    assert size("12") == (120, 80)   # 15 x 10
    assert size("13") == (48, 32)    # 6 x 4
    assert size("21") == (32, 32) and size("22") == (83, 83)  # round(64 * 1.3) = 83
    assert size("31") == (50, 30) and size("32") == (40, 40) and size("33") == (48, 16)


def test_lanczos_is_pillows_8_bit_lanczos_as_in_comfy_utils(fake_comfy):
    """comfy.utils.lanczos hands Pillow 8-bit images: a loaded PNG scaled with "lanczos" (and
    saved) is bit for bit Pillow's LANCZOS resize of it, also where Pillow's 8-bit passes clamp
    the overshoot of a sharp edge (a float resize differs there by tens of levels)."""
    name = "lanczos_probe.png"
    src = Image.new("RGB", (64, 48))
    src.putdata([((x * 7) % 256, (y * 11) % 256, ((x + y) * 5) % 256) for y in range(48) for x in range(64)])
    src.save(fake_comfy.input_dir / name)
    prompt = {"1": node("LoadImage", image=name)}
    for out_id, (w, h, crop) in {"11": (128, 96, "disabled"), "12": (45, 31, "disabled"),
                                 "13": (128, 128, "center")}.items():
        prompt[out_id + "s"] = node("ImageScale", image=["1", 0], upscale_method="lanczos", width=w, height=h,
                                    crop=crop)
        show(prompt, out_id, (out_id + "s", 0))
    images, _ = execute(fake_comfy, prompt)
    expected = {"11": src.resize((128, 96), Image.LANCZOS), "12": src.resize((45, 31), Image.LANCZOS),
                "13": src.crop((8, 0, 56, 48)).resize((128, 128), Image.LANCZOS)}  # centre crop 48 x 48
    for out_id, im in expected.items():
        assert (one(images, out_id) == np.asarray(im, dtype=np.int16)).all(), out_id


# --- pixel model: samplers ------------------------------------------------------------------------

def test_refiner_split_mixes_each_checkpoints_share_of_the_steps(fake_comfy):
    """Base [0, 3) with leftover noise, refiner [3, 4) without adding noise: 3/4 of the result is the
    base checkpoint's, 1/4 the refiner's; a single pass, the swapped split and the noisy intermediate
    all look different."""
    fake_comfy.add_model("checkpoints", REFINER)
    p = base()
    p["3"] = node("CheckpointLoaderSimple", ckpt_name=REFINER)
    p["4"] = node("EmptyLatentImage", width=64, height=64, batch_size=1)
    p["5"] = advanced(("1", 0), ("4", 0), 0, 3, leftover="enable")
    p["6"] = advanced(("3", 0), ("5", 0), 3, 10000, add_noise="disable")
    show_latent(p, "10", ("6", 0))                                            # the split
    p["7"] = advanced(("1", 0), ("4", 0), 0, 10000)
    show_latent(p, "11", ("7", 0))                                            # base alone
    p["8"] = advanced(("3", 0), ("4", 0), 0, 10000)
    show_latent(p, "12", ("8", 0))                                            # refiner alone
    p["13"] = advanced(("3", 0), ("4", 0), 0, 3, leftover="enable")
    p["14"] = advanced(("1", 0), ("13", 0), 3, 10000, add_noise="disable")
    show_latent(p, "15", ("14", 0))                                           # swapped roles
    show_latent(p, "16", ("5", 0))                                            # the base's noisy output
    p["17"] = advanced(("1", 0), ("4", 0), 0, 3, leftover="disable")
    show_latent(p, "18", ("17", 0))                                           # base stopped early, denoised
    images, msgs = execute(fake_comfy, p)
    split, a, b, swapped, noisy, early = (one(images, k).astype(float) for k in ("10", "11", "12", "15", "16", "18"))
    assert np.abs(split - (0.75 * a + 0.25 * b)).max() <= 2
    assert np.abs(swapped - (0.25 * a + 0.75 * b)).max() <= 2
    for other in (a, b, swapped, noisy):
        assert np.abs(split - other).mean() > 2
    assert np.abs(a - b).mean() > 8  # each checkpoint leaves its own mark
    assert np.abs(early - a).max() <= 1  # force_full_denoise: the last step goes to sigma 0
    runs = runs_of(fake_comfy, "KSamplerAdvanced")
    assert (runs["5"]["ckpt"], runs["5"]["steps"], runs["5"]["leftover_noise"]) == (CKPT, 3, 0.25)
    assert (runs["6"]["ckpt"], runs["6"]["steps"], runs["6"]["add_noise"], runs["6"]["leftover_noise"]) == (
        REFINER, 1, False, 0.0)
    assert progress_of(msgs, "5") == [(1, 3), (2, 3), (3, 3)] and progress_of(msgs, "6") == [(1, 1)]


def test_ksampler_advanced_step_window_edges(fake_comfy):
    p = base()
    p["4"] = node("EmptyLatentImage", width=64, height=64, batch_size=1)
    p["5"] = advanced(("1", 0), ("4", 0), 4, 10000)      # start at the last step: nothing to do
    p["6"] = advanced(("1", 0), ("4", 0), 3, 2)          # start after end: latent unchanged
    p["7"] = advanced(("1", 0), ("4", 0), 2, 10000, add_noise="disable")  # clean latent, no noise: mild redraw
    p["8"] = advanced(("1", 0), ("4", 0), 0, 10000)
    for out_id, sampler in (("15", "5"), ("16", "6"), ("17", "7"), ("18", "8")):
        show_latent(p, out_id, (sampler, 0))
    images, msgs = execute(fake_comfy, p)
    grey = np.full((64, 64, 3), 127)
    assert np.array_equal(one(images, "15"), grey) and np.array_equal(one(images, "16"), grey)
    assert progress_of(msgs, "5") == [] and progress_of(msgs, "6") == []
    mild = np.abs(one(images, "17") - grey).mean()
    assert 1 < mild < np.abs(one(images, "18") - grey).mean() / 2
    assert progress_of(msgs, "7") == [(1, 2), (2, 2)]


def test_vaeloader_tints_what_it_decodes(fake_comfy):
    put_inputs(fake_comfy, "probe_src_64.png")
    fake_comfy.add_model("vae", VAE)
    fake_comfy.add_model("vae", "other-vae.safetensors")
    p = base()
    p["4"] = node("LoadImage", image="probe_src_64.png")
    p["5"] = node("VAELoader", vae_name=VAE)
    p["6"] = node("VAELoader", vae_name="other-vae.safetensors")
    p["7"] = node("VAEEncode", pixels=["4", 0], vae=["5", 0])
    show_latent(p, "10", ("7", 0))                 # the checkpoint's VAE decodes
    show_latent(p, "11", ("7", 0), vae=("5", 0))   # the loaded VAE decodes
    show_latent(p, "12", ("7", 0), vae=("6", 0))
    images, _ = execute(fake_comfy, p)
    src = src_pixels().astype(float)
    assert np.abs(one(images, "10") - src).max() <= 1
    for out_id, name in (("11", VAE), ("12", "other-vae.safetensors")):
        expected = src / 255 * 0.8 + vae_tint(name) * 0.2
        assert np.abs(one(images, out_id) - expected * 255).max() <= 1.5
    assert np.abs(one(images, "11") - one(images, "12")).mean() > 5


def test_tiled_vae_nodes_give_the_untiled_pixels_and_report_tiles(fake_comfy):
    put_inputs(fake_comfy, "probe_src_64.png")
    fake_comfy.add_model("vae", VAE)
    p = base()
    p["3"] = node("VAELoader", vae_name=VAE)
    p["4"] = node("LoadImage", image="probe_src_64.png")
    p["5"] = node("VAEEncode", pixels=["4", 0], vae=["1", 2])
    p["6"] = node("VAEEncodeTiled", pixels=["4", 0], vae=["1", 2], tile_size=128, overlap=32, temporal_size=64,
                  temporal_overlap=8)
    show_latent(p, "10", ("5", 0))
    show_latent(p, "11", ("6", 0))
    p["7"] = node("VAEDecodeTiled", samples=["5", 0], vae=["1", 2], tile_size=64, overlap=64, temporal_size=64,
                  temporal_overlap=8)
    show(p, "12", ("7", 0))
    p["8"] = node("VAEDecodeTiled", samples=["5", 0], vae=["3", 0], tile_size=512, overlap=64, temporal_size=64,
                  temporal_overlap=8)
    show(p, "13", ("8", 0))
    show_latent(p, "14", ("5", 0), vae=("3", 0))
    images, msgs = execute(fake_comfy, p)
    assert np.array_equal(one(images, "10"), src_pixels())
    assert np.array_equal(one(images, "11"), one(images, "10")) and np.array_equal(one(images, "12"), one(images, "10"))
    assert np.array_equal(one(images, "13"), one(images, "14"))  # the loaded VAE tints tiled or not
    runs = {**runs_of(fake_comfy, "VAEEncodeTiled"), **runs_of(fake_comfy, "VAEDecodeTiled")}
    # decode: overlap 64 > 64 / 4 becomes 16; latent 8x8, tiles 8 (overlap 2): 1 + 3 (4x16) + 3 (16x4)
    assert (runs["7"]["overlap"], runs["7"]["tiles"]) == (16, 7)
    assert (runs["6"]["tiles"], runs["8"]["tiles"]) == (3, 3)
    assert progress_of(msgs, "7") == [(i, 7) for i in range(1, 8)]
    assert progress_of(msgs, "6") == [(1, 3), (2, 3), (3, 3)]


def test_vae_encode_tiled_divides_by_zero_when_half_a_tile_is_the_overlap(fake_comfy):
    """0.3.40's encode_tiled_ counts tiles of tile_size // 2 with the same overlap: tile 64 with
    overlap 32 on an image wider than 32 pixels raises ZeroDivisionError at run time."""
    prompt, node_id = _prompt_for("VAEEncodeTiled")
    prompt[node_id]["inputs"].update(tile_size=64, overlap=32)
    prompt["5"]["inputs"].update(width=64, height=64)
    _, msgs = run(fake_comfy, prompt, "zd")
    error = next(m["data"] for m in msgs if m["type"] == "execution_error")
    assert (error["node_id"], error["exception_type"], error["exception_message"]) == (
        node_id, "ZeroDivisionError", "division by zero")


# --- pixel model: inpainting ------------------------------------------------------------------------

def test_inpaint_model_conditioning_hides_the_masked_area_from_an_inpainting_checkpoint(fake_comfy):
    put_inputs(fake_comfy, "probe_src_64.png", "probe_mask_64.png")
    fake_comfy.add_model("checkpoints", INPAINT_CKPT)
    p = base(INPAINT_CKPT)
    p["3"] = node("CheckpointLoaderSimple", ckpt_name=CKPT)
    p["4"] = node("LoadImage", image="probe_src_64.png")
    p["5"] = node("LoadImageMask", image="probe_mask_64.png", channel="alpha")  # 1 inside 16..47
    p["6"] = node("VAEEncode", pixels=["4", 0], vae=["1", 2])
    p["7"] = node("SetLatentNoiseMask", samples=["6", 0], mask=["5", 0])
    p["8"] = ksampler(("1", 0), ("7", 0))                                       # issue 15's bug
    show_latent(p, "10", ("8", 0))
    p["11"] = node("InpaintModelConditioning", positive=["2", 0], negative=["2", 0], vae=["1", 2],
                   pixels=["4", 0], mask=["5", 0], noise_mask=True)
    p["12"] = ksampler(("1", 0), ("11", 2), positive=("11", 0), negative=("11", 1))
    show_latent(p, "13", ("12", 0))
    p["14"] = ksampler(("3", 0), ("7", 0))                                      # an ordinary checkpoint
    show_latent(p, "15", ("14", 0))
    p["16"] = node("InpaintModelConditioning", positive=["2", 0], negative=["2", 0], vae=["1", 2],
                   pixels=["4", 0], mask=["5", 0], noise_mask=False)
    p["17"] = ksampler(("1", 0), ("16", 2), positive=("16", 0), negative=("16", 1))
    show_latent(p, "18", ("17", 0))
    images, _ = execute(fake_comfy, p)
    src = src_pixels()
    inside = np.zeros((64, 64), dtype=bool)
    inside[16:48, 16:48] = True
    diff = {k: np.abs(one(images, k) - src).max(axis=-1) for k in ("10", "13", "15", "18")}
    assert diff["10"].max() <= 1                       # it saw the old content and drew it again
    assert diff["13"][inside].mean() > 20 and diff["13"][~inside].max() <= 1
    assert diff["15"][inside].mean() > 20              # a 4-channel model never sees the image
    # without the noise mask the whole image is sampled: the model keeps the visible context
    assert diff["18"][inside].mean() > 20 and diff["18"][~inside].max() <= 1
    saw = {n: r["inpainting_model_saw"] for n, r in runs_of(fake_comfy, "KSampler").items()}
    assert saw == {"8": "latent_image", "12": "concat_latent_image", "14": None, "17": "concat_latent_image"}


def test_inpaint_model_conditioning_outputs(fake_comfy):
    """The latent is the unmasked image cropped to multiples of 8, with the (unrounded) mask."""
    put_inputs(fake_comfy, "maskprobe_rgb_32x48.png")
    p = base()
    p["4"] = node("LoadImage", image="maskprobe_rgb_32x48.png")
    p["5"] = node("SolidMask", value=0.5, width=30, height=45)
    p["6"] = node("ImageScale", image=["4", 0], upscale_method="nearest-exact", width=30, height=45, crop="disabled")
    p["7"] = node("InpaintModelConditioning", positive=["2", 0], negative=["2", 0], vae=["1", 2], pixels=["6", 0],
                  mask=["5", 0], noise_mask=True)
    show_latent(p, "10", ("7", 2))
    p["8"] = ksampler(("1", 0), ("7", 2), positive=("7", 0), negative=("7", 1))
    show_latent(p, "11", ("8", 0))
    images, _ = execute(fake_comfy, p)
    assert one(images, "10").shape == (40, 24, 3)  # 45 x 30 -> centred crop to 40 x 24
    assert one(images, "11").shape == (40, 24, 3)
    assert np.abs(one(images, "11") - one(images, "10")).mean() > 5  # mask 0.5: half-strength everywhere


def _dd_prompt(values, differential):
    p = base()
    p["3"] = node("DifferentialDiffusion", model=["1", 0]) if differential else None
    if p["3"] is None:
        del p["3"]
    model = ("3", 0) if differential else ("1", 0)
    p["4"] = node("LoadImage", image="probe_src_64.png")
    p["5"] = node("VAEEncode", pixels=["4", 0], vae=["1", 2])
    for i, v in enumerate(values):
        p[f"m{i}"] = node("SolidMask", value=v, width=64, height=64)
        p[f"n{i}"] = node("SetLatentNoiseMask", samples=["5", 0], mask=[f"m{i}", 0])
        p[f"k{i}"] = ksampler(model, (f"n{i}", 0), steps=4)
        show_latent(p, f"o{i}", (f"k{i}", 0))
    return p


def test_differential_diffusion_thresholds_grey_mask_levels_by_step(fake_comfy):
    """Without it a grey mask value m blends m of the sampled result in; with it a pixel is only
    sampled from the step whose threshold (1, 2/3, 1/3, 0 for 4 steps) it reaches: m = 0.5 gets 1/3,
    m = 0.25 nothing, m = 1 everything."""
    put_inputs(fake_comfy, "probe_src_64.png")
    values = (1.0, 0.5, 0.25, 0.7)
    plain, _ = execute(fake_comfy, _dd_prompt(values, False))
    dd, _ = execute(fake_comfy, _dd_prompt(values, True), "dd")
    src = src_pixels().astype(float)
    full = one(plain, "o0").astype(float)
    assert np.array_equal(one(dd, "o0"), one(plain, "o0"))  # mask 1: the same with or without

    def share(images, i):
        return one(images, f"o{i}").astype(float)

    for i, (without, with_dd) in enumerate(((1, 1), (0.5, 1 / 3), (0.25, 0.0), (0.7, 2 / 3))):
        assert np.abs(share(plain, i) - (src + without * (full - src))).max() <= 2, values[i]
        assert np.abs(share(dd, i) - (src + with_dd * (full - src))).max() <= 2, values[i]
    assert np.abs(share(dd, 2) - src).max() <= 1
    assert [r["differential"] for r in fake_comfy.node_runs if r["class_type"] == "KSampler"] == [False] * 4 + [True] * 4


# --- pixel model: masks -------------------------------------------------------------------------------

def _mask_row(fake, mask_nodes: dict, mask_link, width, y=0):
    prompt = dict(mask_nodes)
    prompt["mi"] = node("MaskToImage", mask=list(mask_link))
    show(prompt, "mo", ("mi", 0))
    images, _ = execute(fake, prompt, "mask")
    img = one(images, "mo")
    assert img.shape[1] == width
    return list(img[y, :, 0])


def test_feather_mask_values_include_comfyuis_right_edge_quirk(fake_comfy):
    solid = {"1": node("SolidMask", value=1.0, width=8, height=8)}
    left = {**solid, "2": node("FeatherMask", mask=["1", 0], left=4, top=0, right=0, bottom=0)}
    assert _mask_row(fake_comfy, left, ("2", 0), 8) == [63, 127, 191, 255, 255, 255, 255, 255]
    both = {**solid, "2": node("FeatherMask", mask=["1", 0], left=4, top=0, right=4, bottom=0)}
    # right loop: x=0 hits column -0 (the first), x=1 the last with 2/4, x=2 the one before with 3/4
    assert _mask_row(fake_comfy, both, ("2", 0), 8) == [15, 127, 191, 255, 255, 255, 191, 127]
    top = {**solid, "2": node("FeatherMask", mask=["1", 0], left=0, top=2, right=0, bottom=0)}
    assert _mask_row(fake_comfy, top, ("2", 0), 8, y=0) == [127] * 8
    big = {**solid, "2": node("FeatherMask", mask=["1", 0], left=100, top=0, right=0, bottom=0)}
    assert _mask_row(fake_comfy, big, ("2", 0), 8) == [31, 63, 95, 127, 159, 191, 223, 255]  # left = min(100, 8)


def test_threshold_mask_is_strictly_greater(fake_comfy):
    def row(mask_value, threshold):
        nodes = {"1": node("SolidMask", value=mask_value, width=4, height=4),
                 "2": node("ThresholdMask", mask=["1", 0], value=threshold)}
        return _mask_row(fake_comfy, nodes, ("2", 0), 4)
    assert row(0.5, 0.5) == [0] * 4
    assert row(0.5, 0.49) == [255] * 4
    assert row(0.0, 0.0) == [0] * 4 and row(1.0, 1.0) == [0] * 4


def test_image_pad_for_outpaint_feathering_matches_0340(fake_comfy):
    put_inputs(fake_comfy, "probe_src_64.png")
    nodes = {"1": node("LoadImage", image="probe_src_64.png"),
             "2": node("ImageScale", image=["1", 0], upscale_method="nearest-exact", width=16, height=16,
                       crop="disabled"),
             "3": node("ImagePadForOutpaint", image=["2", 0], left=8, top=0, right=0, bottom=0, feathering=4)}
    # inside, d = distance to the padded (left) edge: ((4 - d) / 4) ** 2 = 1, .5625, .25, .0625, then 0
    assert _mask_row(fake_comfy, nodes, ("3", 1), 24, y=5) == [255] * 9 + [143, 63, 15] + [0] * 12
    nodes["3"]["inputs"]["feathering"] = 8  # 2 * 8 is not < 16: no feathering at all
    assert _mask_row(fake_comfy, nodes, ("3", 1), 24, y=5) == [255] * 8 + [0] * 16


# --- custom nodes (opt-in) ------------------------------------------------------------------------------

def test_facerestore_cf_is_opt_in(tmp_path):
    with FakeComfyUI(tmp_path / "plain") as plain:
        prompt = {"1": node("FaceRestoreModelLoader", model_name="codeformer.pth")}
        r = post_prompt(plain, {**prompt, "2": node("PreviewImage", images=["1", 0])})
        assert r.json()["error"]["message"] == "Cannot execute because node FaceRestoreModelLoader does not exist."
    with pytest.raises(ValueError):
        FakeComfyUI(tmp_path / "x", custom_nodes=("no_such_pack",))


def test_facerestore_cf_nodes_run_when_loaded(tmp_path):
    with FakeComfyUI(tmp_path / "c", custom_nodes=("facerestore_cf",)) as fake:
        info = object_info(fake)
        assert list(info)[-2:] == ["FaceRestoreCFWithModel", "FaceRestoreModelLoader"]
        assert info["FaceRestoreCFWithModel"]["input"]["required"]["codeformer_fidelity"] == [
            "FLOAT", {"default": 0.5, "min": 0.0, "max": 1, "step": 0.05}]
        assert info["FaceRestoreCFWithModel"]["python_module"] == "custom_nodes.facerestore_cf"
        assert info["FaceRestoreModelLoader"]["input"]["required"]["model_name"] == [[]]
        assert requests.get(fake.url + "/models", timeout=5).json()[-2:] == ["facerestore_models",
                                                                              "facedetection_models"]
        fake.add_model("facerestore_models", "codeformer-v0.1.0.pth")
        fake.add_model("upscale_models", "4x-UltraSharp.pth")  # the other "model_name" enum stays apart
        info = object_info(fake)
        assert info["FaceRestoreModelLoader"]["input"]["required"]["model_name"] == [["codeformer-v0.1.0.pth"]]
        assert info["UpscaleModelLoader"]["input"]["required"]["model_name"] == [["4x-UltraSharp.pth"]]
        put_inputs(fake, "probe_src_64.png")
        prompt = {"1": node("LoadImage", image="probe_src_64.png"),
                  "2": node("FaceRestoreModelLoader", model_name="codeformer-v0.1.0.pth"),
                  "3": node("FaceRestoreCFWithModel", facerestore_model=["2", 0], image=["1", 0],
                            facedetection="retinaface_resnet50", codeformer_fidelity=1.5)}
        show(prompt, "9", ("3", 0))
        body = post_prompt(fake, prompt).json()
        assert body["node_errors"]["3"]["errors"][0]["message"] == "Value 1.5 bigger than max of 1"
        prompt["3"]["inputs"]["codeformer_fidelity"] = 0.5
        images, _ = execute(fake, prompt)
        diff = np.abs(one(images, "9") - src_pixels()).max(axis=-1)
        inside = np.zeros((64, 64), dtype=bool)
        inside[16:48, 16:48] = True
        assert diff[~inside].max() == 0 and diff[inside].mean() > 10
        assert runs_of(fake, "FaceRestoreCFWithModel")["3"]["face_box"] == [16, 16, 48, 48]


@pytest.mark.parametrize("mode, expected", [
    ("normal", lambda a, b: b), ("multiply", lambda a, b: a * b), ("screen", lambda a, b: 1 - (1 - a) * (1 - b)),
    ("difference", lambda a, b: a - b)])
def test_image_blend_mixes_by_factor_as_comfyui(mode, expected):
    from dreamlayer.comfyui.fake.nodes import ImageBlend
    rng = np.random.default_rng(1)
    a = rng.random((1, 4, 6, 3), dtype=np.float32)
    b = rng.random((1, 4, 6, 3), dtype=np.float32)
    (out,) = ImageBlend().run(None, a, b, 0.25, mode)
    assert np.allclose(out, np.clip(a * 0.75 + expected(a, b) * 0.25, 0, 1), atol=1e-6)
    (same,) = ImageBlend().run(None, a, b, 0.0, mode)
    assert np.allclose(same, a)
