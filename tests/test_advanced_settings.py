"""The Img2Img tab's advanced settings as pure functions: parsing, name resolution, sizes, and
the workflow edits (refiner, hires fix, VAE, tiling, face restoration, resize modes)."""
import dataclasses

import numpy as np
import pytest
from PIL import Image

from dreamlayer.errors import InvalidParameter
from dreamlayer.img2img import advanced_params as A
from dreamlayer.img2img import decoding, passes
from dreamlayer.img2img import params as P
from dreamlayer.img2img.resize import resize_image
from dreamlayer.img2img.workflow import build_img2img_workflow, load_template, nodes_of

CKPTS = ["base.safetensors", "refiner.safetensors"]


def parse(**kw):
    return P.parse_params({"prompt": "x", "seed": 3, **kw})


def choices_of(info: dict):
    """A ComfyUI with these nodes and input lists (None for a node it lacks)."""
    def choices(node, name):
        if node not in info:
            return None
        return info[node].get(name, []) if name else []
    return choices


CORE = {n: {} for n in ("KSampler", "KSamplerAdvanced", "CheckpointLoaderSimple", "CLIPTextEncode", "LatentUpscale",
                        "ImageScale", "VAEEncode", "VAEDecode", "VAEEncodeTiled", "VAEDecodeTiled",
                        "ImageUpscaleWithModel")}
CORE["UpscaleModelLoader"] = {"model_name": ["4x-UltraSharp.pth", "RealESRGAN_x2.pth"]}
CORE["VAELoader"] = {"vae_name": ["vae-ft-mse.safetensors"]}


def resolve(adv, info=CORE):
    return A.resolve_advanced(adv, choices=choices_of(info), checkpoints=CKPTS)


# --- parsing ---------------------------------------------------------------------------------

def test_hires_reads_the_pages_keys_and_defaults():
    adv = parse(hires_fix_enabled=True).advanced
    assert adv.hires == A.HiresFix("upscale-by", 2.5, 4000, 4000, "4x-ultrasharp", 15, 0.5)
    adv = parse(hires_fix=True, hires_fix_upscale_method="resize-to", hires_fix_resize_width=800,
                hires_fix_resize_height=600, hires_fix_hires_steps=7, hires_fix_denoising_strength=0.3).advanced
    assert (adv.hires.method, adv.hires.resize_width, adv.hires.steps, adv.hires.denoise) == ("resize-to", 800, 7, 0.3)


@pytest.mark.parametrize("key,value", [("hires_fix_upscale_factor", 10.5), ("hires_fix_hires_steps", 0),
                                       ("hires_fix_resize_width", 9000), ("tile_size", 32), ("tile_overlap", -1),
                                       ("refiner_switch_at", 1.5), ("codeformer_weight", 2),
                                       ("hires_fix_upscale_method", "double"), ("face_restoration_model", "x"),
                                       ("resize_mode", 7), ("resize_mode", "stretch")])
def test_out_of_range_values_are_refused_even_with_the_feature_off(key, value):
    with pytest.raises(InvalidParameter) as info:
        parse(**{key: value})
    assert info.value.details["field"] == key


def test_tile_overlap_must_stay_under_half_the_tile():
    assert parse(tiling=True, tile_size=128, tile_overlap=63).advanced.tiling == A.Tiling(128, 63)
    with pytest.raises(InvalidParameter, match="half"):
        parse(tiling=True, tile_size=128, tile_overlap=64)
    assert parse(tiling=False, tile_size=128, tile_overlap=64).advanced.tiling is None


def test_refiner_needs_a_model_and_a_switch_above_zero():
    with pytest.raises(InvalidParameter) as info:
        parse(refiner_enabled=True, refiner_model="none")
    assert info.value.code == "unknown_refiner"
    with pytest.raises(InvalidParameter):
        parse(refiner_enabled=True, refiner_model="refiner.safetensors", refiner_switch_at=0)
    assert parse(refiner_enabled=False, refiner_switch_at=0).advanced.refiner is None


@pytest.mark.parametrize("value,mode", [(None, 0), (0, 0), (3, 3), ("2", 2), ("Crop and resize", 1),
                                        ("just resize (latent upscale)", 3), ("crop_resize", 1)])
def test_resize_mode_by_number_or_a1111_label(value, mode):
    assert parse(resize_mode=value).advanced.resize_mode == mode


@pytest.mark.parametrize("vae", [None, "", "None", "Automatic"])
def test_no_vae_means_the_checkpoints_own(vae):
    assert parse(vae_name=vae).advanced.vae_name is None


# --- names ComfyUI knows -----------------------------------------------------------------------

@pytest.mark.parametrize("requested,found", [("4x-ultrasharp", "4x-UltraSharp.pth"), ("4x-UltraSharp.pth", "4x-UltraSharp.pth"),
                                             ("realesrgan x2", "RealESRGAN_x2.pth"), ("esrgan-4x", None)])
def test_upscale_models_are_found_by_case_insensitive_stem(requested, found):
    assert A.match_model(requested, CORE["UpscaleModelLoader"]["model_name"]) == found


def test_an_ambiguous_stem_matches_nothing():
    assert A.match_model("a", ["A.pth", "a.safetensors"]) is None


@pytest.mark.parametrize("name,kind,method", [("Latent", "latent", "bilinear"), ("latent-bicubic", "latent", "bicubic"),
                                              ("Latent (nearest-exact)", "latent", "nearest-exact"),
                                              ("Lanczos", "pixel", "lanczos"), ("none", "pixel", "lanczos"),
                                              ("nearest", "pixel", "nearest-exact"),
                                              ("4x-ultrasharp", "model", "4x-UltraSharp.pth")])
def test_the_upscaler_resolves_to_a_model_or_a_built_in(name, kind, method):
    adv, _ = resolve(parse(hires_fix=True, hires_fix_upscaler=name).advanced)
    assert adv.hires.upscaler == A.Upscaler(kind, method)


def test_an_antialiased_latent_upscaler_says_it_is_approximated():
    _, warnings = resolve(parse(hires_fix=True, hires_fix_upscaler="latent-antialiased").advanced)
    assert len(warnings) == 1 and "antialias" in warnings[0]


def test_an_unknown_upscaler_lists_installed_and_built_in():
    with pytest.raises(InvalidParameter) as info:
        resolve(parse(hires_fix=True, hires_fix_upscaler="SwinIR").advanced)
    assert info.value.code == "unknown_upscaler"
    assert "4x-UltraSharp.pth" in info.value.details["allowed"] and "Latent" in info.value.details["allowed"]


@pytest.mark.parametrize("kw,code", [({"refiner_enabled": True, "refiner_model": "sdxl-1.0"}, "unknown_refiner"),
                                     ({"vae_name": "kl-f8.pt"}, "unknown_vae")])
def test_unknown_refiner_and_vae_list_what_is_installed(kw, code):
    with pytest.raises(InvalidParameter) as info:
        resolve(parse(**kw).advanced)
    assert info.value.code == code and info.value.details["allowed"]


def test_face_restoration_without_the_custom_nodes_names_them_and_the_package():
    with pytest.raises(InvalidParameter) as info:
        resolve(parse(restore_faces=True).advanced)
    assert info.value.code == "custom_node_missing"
    assert info.value.details["missing_nodes"] == ["FaceRestoreModelLoader", "FaceRestoreCFWithModel"]
    assert "facerestore_cf" in info.value.details["package"]


def test_face_restoration_picks_the_installed_model_of_the_kind_asked():
    info = {**CORE, "FaceRestoreCFWithModel": {},
            "FaceRestoreModelLoader": {"model_name": ["codeformer-v0.1.0.pth", "GFPGANv1.4.pth"]}}
    adv, _ = resolve(parse(restore_faces=True, face_restoration_model="gfpgan").advanced, info)
    assert adv.face_restore.model == "GFPGANv1.4.pth"


def test_a_comfyui_without_the_tiled_nodes_is_told_so_before_queueing():
    info = {k: v for k, v in CORE.items() if k != "VAEEncodeTiled"}
    with pytest.raises(InvalidParameter) as info_:
        resolve(parse(tiling=True).advanced, info)
    assert info_.value.code == "node_missing" and info_.value.details["missing_nodes"] == ["VAEEncodeTiled"]


# --- sizes ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("method,factor,rw,rh,work,target", [
    ("upscale-by", 2.5, 0, 0, (512, 512), (1280, 1280)),
    ("upscale-by", 1.5, 0, 0, (100, 60), (152, 88)),
    ("upscale-by", 1, 0, 0, (64, 48), (64, 48)),    # a side under 64 stays: no squaring up
    ("resize-to", 1, 1000, 700, (512, 512), (1000, 704)),
])
def test_hires_target_is_a1111s_rounded_to_multiples_of_8(method, factor, rw, rh, work, target):
    hires = A.HiresFix(method, factor, rw, rh, "Latent", 10, 0.5)
    assert passes.hires_target(hires, work) == target


def test_the_hires_canvas_carries_the_padding_along():
    assert passes.canvas_for((200, 120), (100, 60), (100, 60)) == (200, 120)
    canvas = passes.canvas_for((200, 120), (101, 61), (104, 64))
    assert canvas[0] >= 200 * 104 / 101 and canvas[1] >= 120 * 64 / 61 and canvas[0] % 8 == canvas[1] % 8 == 0
    # off the 8-px grid (resize mode 3's exact sizes): covered, never rounded down into the padding
    assert passes.canvas_for((100, 70), (64, 48), (64, 48)) == (104, 72)
    assert passes.canvas_for((64, 64), (41, 41), (48, 48)) == (80, 80)   # 74.9 px: 80 (to the nearest 8: 72)


@pytest.mark.parametrize("steps,denoise,switch,expected", [(20, 1.0, 0.8, (20, 0, 16)), (20, 0.5, 0.8, (40, 20, 36)),
                                                          (10, 0.75, 0.5, (13, 3, 8)), (4, 1.0, 0.01, (4, 0, 1))])
def test_refiner_steps_sample_what_ksampler_with_denoise_samples(steps, denoise, switch, expected):
    assert passes.refiner_steps(steps, denoise, switch) == expected


# --- workflows ----------------------------------------------------------------------------------

def built(mask=False, **kw):
    params = parse(model_name="base.safetensors", **kw)
    adv, _ = resolve(params.advanced)
    params = P.replace(params, advanced=adv)
    return build_img2img_workflow(params, image_name="in.png", mask_name="m.png" if mask else None,
                                  filename_prefix="t", seed=11, inpaint_mode="original",
                                  hires_size=(160, 160) if adv.hires else None)


def test_the_refiner_takes_over_the_same_latent_at_the_switch():
    wf = built(refiner_enabled=True, refiner_model="refiner.safetensors", refiner_switch_at=0.6, steps=10,
               denoising_strength=0.5)
    assert not nodes_of(wf, "KSampler")
    base, ref = (wf[n]["inputs"] for n in nodes_of(wf, "KSamplerAdvanced"))
    assert (base["start_at_step"], base["end_at_step"], base["steps"]) == (10, 16, 20)
    assert base["add_noise"] == "enable" and base["return_with_leftover_noise"] == "enable"
    assert ref["add_noise"] == "disable" and ref["return_with_leftover_noise"] == "disable"
    assert ref["start_at_step"] == 16 and ref["latent_image"][0] in nodes_of(wf, "KSamplerAdvanced")
    refiner_ckpt = wf[ref["model"][0]]
    assert refiner_ckpt["inputs"]["ckpt_name"] == "refiner.safetensors"
    assert wf[ref["positive"][0]]["inputs"]["clip"][0] == ref["model"][0]  # its own CLIP encodes the prompt
    assert wf[ref["positive"][0]]["inputs"]["text"] == "x"
    (decode,) = nodes_of(wf, "VAEDecode")
    assert wf[decode]["inputs"]["samples"][0] == nodes_of(wf, "KSamplerAdvanced")[1]
    assert wf[decode]["inputs"]["vae"][0] != ref["model"][0]  # decoded by the base checkpoint's VAE


def test_refiner_at_switch_one_leaves_the_base_model_alone():
    wf = built(refiner_enabled=True, refiner_model="refiner.safetensors", refiner_switch_at=1.0)
    assert nodes_of(wf, "KSampler") and not nodes_of(wf, "KSamplerAdvanced")


@pytest.mark.parametrize("upscaler,nodes", [("Latent", ["LatentUpscale"]),
                                            ("Lanczos", ["VAEDecode", "ImageScale", "VAEEncode"]),
                                            ("4x-ultrasharp", ["UpscaleModelLoader", "ImageUpscaleWithModel",
                                                               "ImageScale", "VAEEncode"])])
def test_hires_adds_a_second_pass_over_the_upscaled_first(upscaler, nodes):
    wf = built(hires_fix=True, hires_fix_upscaler=upscaler, hires_fix_hires_steps=6, hires_fix_denoising_strength=0.4,
               cfg_scale=5, sampler_name="dpmpp_2m")
    first, second = nodes_of(wf, "KSampler")
    for node in nodes:
        assert nodes_of(wf, node), node
    s, f = wf[second]["inputs"], wf[first]["inputs"]
    assert (s["steps"], s["denoise"], s["seed"], s["cfg"]) == (6, 0.4, 11, 5)
    assert s["model"] == f["model"] and s["positive"] == f["positive"] and s["sampler_name"] == f["sampler_name"]
    scale = nodes_of(wf, "LatentUpscale", "ImageScale")[0]
    assert (wf[scale]["inputs"]["width"], wf[scale]["inputs"]["height"]) == (160, 160)
    (save,) = nodes_of(wf, "SaveImage")
    final_decode = wf[save]["inputs"]["images"][0]
    assert wf[final_decode]["inputs"]["samples"] == [second, 0]


def test_hires_with_a_mask_limits_the_pixel_pass_to_the_masked_area():
    wf = built(mask=True, hires_fix=True, hires_fix_upscaler="Lanczos")
    masks = [wf[n]["inputs"]["mask"] for n in nodes_of(wf, "SetLatentNoiseMask", "InpaintModelConditioning")]
    assert len(masks) == 2 and masks[0] == masks[1]


def test_a_vae_override_feeds_every_encode_and_decode():
    wf = built(vae_name="vae-ft-mse", hires_fix=True, hires_fix_upscaler="Lanczos")
    (loader,) = nodes_of(wf, "VAELoader")
    assert wf[loader]["inputs"]["vae_name"] == "vae-ft-mse.safetensors"
    coders = nodes_of(wf, "VAEEncode", "VAEDecode")
    assert len(coders) == 4 and all(wf[n]["inputs"]["vae"] == [loader, 0] for n in coders)


def test_tiling_tiles_every_encode_and_decode_with_comfyuis_inputs():
    wf = built(tiling=True, tile_size=256, tile_overlap=32, hires_fix=True, hires_fix_upscaler="Lanczos")
    assert not nodes_of(wf, "VAEEncode", "VAEDecode")
    tiled = nodes_of(wf, "VAEEncodeTiled", "VAEDecodeTiled")
    assert len(tiled) == 4
    for n in tiled:
        assert {k: wf[n]["inputs"][k] for k in ("tile_size", "overlap", "temporal_size", "temporal_overlap")} == \
            {"tile_size": 256, "overlap": 32, "temporal_size": 64, "temporal_overlap": 8}


def test_fill_mode_keeps_its_untiled_inpainting_encode():
    wf, untiled = decoding.apply_tiled_vae(load_template() | {"90": {"class_type": "VAEEncodeForInpaint", "inputs": {}}},
                                           tile_size=512, overlap=64)
    assert untiled == ["90"] and wf["90"]["class_type"] == "VAEEncodeForInpaint"


@pytest.mark.parametrize("model,blend", [("codeformer.pth", None), ("GFPGANv1.4.pth", 0.3)])
def test_face_restoration_sits_between_the_final_decode_and_the_save(model, blend):
    wf = built(hires_fix=True, hires_fix_upscaler="Lanczos")
    wf = decoding.apply_face_restore(wf, model_name=model, fidelity=0.7, blend=blend)
    (restore,) = nodes_of(wf, "FaceRestoreCFWithModel")  # the hires pass's first decode is not restored
    r = wf[restore]["inputs"]
    assert r["codeformer_fidelity"] == 0.7 and wf[r["facerestore_model"][0]]["inputs"]["model_name"] == model
    (save,) = nodes_of(wf, "SaveImage")
    fed = wf[save]["inputs"]["images"][0]
    if blend is None:
        assert fed == restore
    else:
        assert wf[fed]["class_type"] == "ImageBlend" and wf[fed]["inputs"]["blend_factor"] == blend
        assert wf[fed]["inputs"]["image1"] == r["image"]


# --- resize modes (Pillow) ------------------------------------------------------------------------

def _striped(size):
    a = np.zeros((size[1], size[0], 3), np.uint8)
    a[:, :, 0] = np.linspace(0, 255, size[0])[None, :]
    a[:, :, 1] = np.linspace(0, 255, size[1])[:, None]
    return Image.fromarray(a)


@pytest.mark.parametrize("mode", [0, 1, 2])
def test_every_resize_mode_gives_the_requested_size(mode):
    assert resize_image(mode, _striped((100, 50)), (64, 64)).size == (64, 64)


def test_crop_and_resize_keeps_the_aspect_and_crops_the_sides():
    out = np.asarray(resize_image(1, _striped((200, 100)), (100, 100))).astype(int)
    # the middle half of a horizontal gradient remains: red from ~64 to ~191, green full range
    assert 50 < out[50, 0, 0] < 80 and 175 < out[50, -1, 0] < 205 and out[0, 50, 1] < 10 and out[-1, 50, 1] > 245


def test_resize_and_fill_stretches_the_edge_rows_into_the_bands():
    out = np.asarray(resize_image(2, _striped((200, 100)), (100, 100))).astype(int)
    # fitted into rows 25..74; the bands repeat the first and last rows
    assert (np.abs(out[:25] - out[25]) <= 2).all() and (np.abs(out[75:] - out[74]) <= 2).all()
    assert out[0, 0, 0] < 10 and out[0, -1, 0] > 245  # full width: nothing cropped


@pytest.mark.parametrize("source, size", [((128, 96), (97, 72)), ((128, 97), (96, 72)), ((96, 128), (73, 96)),
                                           ((128, 96), (99, 72)), ((96, 96), (97, 96))])
def test_resize_and_fill_leaves_no_pixel_unfilled_when_a_band_is_1_px(source, size):
    """Found on a real ComfyUI: 128 x 96 into 97 x 72 fits 96 x 72 with a 1-px band on the right,
    which stayed black (and "inpaint" in the mask: a kept column regenerated)."""
    keep = Image.new("L", source, 255)
    image = Image.new("RGB", source, (200, 120, 40))
    out_keep, out_image = (np.asarray(resize_image(2, im, size)) for im in (keep, image))
    assert out_keep.shape[:2] == out_image.shape[:2] == (size[1], size[0])
    assert (out_keep == 255).all() and (out_image == (200, 120, 40)).all()


@pytest.mark.parametrize("mode", [0, 1, 2])
def test_the_mask_follows_the_image(mode):
    keep = Image.new("L", (200, 100), 255)
    keep.paste(0, (110, 20, 190, 60))
    image = Image.merge("RGB", (keep, keep, keep))
    out_keep = np.asarray(resize_image(mode, keep, (100, 100))).astype(int)
    out_image = np.asarray(resize_image(mode, image, (100, 100)))[:, :, 0].astype(int)
    assert np.abs(out_keep - out_image).max() <= 1 and (out_keep < 128).any() and (out_keep > 128).any()


@pytest.mark.parametrize("kw", [{"resize_mode": 3, "width": 128, "height": 96},
                                {"hires_fix": True, "hires_fix_upscaler": "Lanczos"}])
def test_scaling_on_a_comfyui_without_its_core_nodes_names_the_missing_ones(kw):
    """docs/troubleshooting.md: a core node this ComfyUI lacks is 400 node_missing, listing it."""
    from dreamlayer.img2img.planning import FINISHING_NODES, SCALING_NODES, plan_generation

    params = parse(**kw)
    params = dataclasses.replace(params, advanced=resolve(params.advanced)[0])
    nodes = set(FINISHING_NODES + SCALING_NODES) - {"LatentUpscale", "ImageCrop"}
    with pytest.raises(InvalidParameter) as info:
        plan_generation(params, Image.new("RGB", (64, 48)), None, comfy_nodes=nodes, max_output_pixels=4096 ** 2)
    err = info.value
    assert err.code == "node_missing" and sorted(err.details["missing_nodes"]) == ["ImageCrop", "LatentUpscale"]
    assert err.details["field"] == ("resize_mode" if "resize_mode" in kw else "hires_fix")
    _, _, plan = plan_generation(params, Image.new("RGB", (64, 48)), None,
                                 comfy_nodes=nodes | {"LatentUpscale", "ImageCrop"}, max_output_pixels=4096 ** 2)
    assert plan.final_from_comfyui and plan.scale_steps
