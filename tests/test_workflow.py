"""The pure workflow builder: template filling, mask injection, graph rewiring."""
import copy

import pytest

from dreamlayer.img2img import workflow as W
from dreamlayer.img2img import params as P
from dreamlayer.img2img import graph

CHOICES = dict(checkpoints=["tiny-sd15-random.safetensors"], samplers=["euler", "dpmpp_2m"],
               schedulers=["normal", "karras"])


def gp(**kw):
    data = {"prompt": "a red apple", "negative_prompt": "blurry", "seed": 7, **kw}
    return P.resolve_choices(P.parse_params(data), **CHOICES)


def build(mask=None, mode="fill", **kw):
    return W.build_img2img_workflow(gp(**kw), image_name="in.png", mask_name=mask, filename_prefix="img2img_x_0",
                                    seed=7, inpaint_mode=mode)


def only(wf, class_type):
    ids = W.nodes_of(wf, class_type)
    assert len(ids) == 1, (class_type, ids)
    return ids[0], wf[ids[0]]["inputs"]


def loader_of(wf, name):
    """The one LoadImage node that loads file ``name``."""
    ids = [n for n in W.nodes_of(wf, "LoadImage") if wf[n]["inputs"] == {"image": name}]
    assert len(ids) == 1, (name, ids)
    return ids[0]


def test_template_is_filled():
    wf = build(steps=12, cfg_scale=5.5, denoising_strength=0.4, batch_size=3, sampler_name="DPM++ 2M Karras")
    sid, ks = only(wf, "KSampler")
    assert (ks["seed"], ks["steps"], ks["cfg"], ks["sampler_name"], ks["scheduler"], ks["denoise"]) == \
        (7, 12, 5.5, "dpmpp_2m", "karras", 0.4)
    assert wf[ks["positive"][0]]["inputs"]["text"] == "a red apple"
    assert wf[ks["negative"][0]]["inputs"]["text"] == "blurry"
    assert only(wf, "CheckpointLoaderSimple")[1]["ckpt_name"] == "tiny-sd15-random.safetensors"
    assert only(wf, "LoadImage")[1]["image"] == "in.png"
    assert only(wf, "RepeatLatentBatch")[1]["amount"] == 3
    assert only(wf, "SaveImage")[1]["filename_prefix"] == "img2img_x_0"


def test_template_is_not_mutated_between_builds():
    a = build(steps=3)
    b = build(steps=9)
    assert only(a, "KSampler")[1]["steps"] == 3 and only(b, "KSampler")[1]["steps"] == 9


def test_fill_mask_replaces_the_encode_and_forces_denoise_1():
    wf = build(mask="m.png", denoising_strength=0.5, grow_mask_by=9)
    assert W.nodes_of(wf, "VAEEncode") == []
    assert not W.nodes_of(wf, "LoadImageMask")  # the mask file's LoadImage: MASK = 1 - alpha
    mid, lid = loader_of(wf, "m.png"), loader_of(wf, "in.png")
    eid, enc = only(wf, "VAEEncodeForInpaint")
    ckpt, _ = only(wf, "CheckpointLoaderSimple")
    assert enc == {"pixels": [lid, 0], "vae": [ckpt, 2], "mask": [mid, 1], "grow_mask_by": 9}
    rid, rep = only(wf, "RepeatLatentBatch")
    assert rep["samples"] == [eid, 0]
    assert only(wf, "KSampler")[1]["denoise"] == 1.0


def test_original_mode_keeps_denoise_and_adds_noise_mask():
    """inject_mask_into_workflow alone: VAEEncode -> SetLatentNoiseMask."""
    base = W.transform_to_img2img_workflow(P.parse_params({"prompt": "p", "denoising_strength": 0.3}),
                                           image_name="in.png", filename_prefix="x", seed=1)
    wf = W.inject_mask_into_workflow(base, "m.png", mode="original")
    vid, enc = only(wf, "VAEEncode")
    nid, nm = only(wf, "SetLatentNoiseMask")
    assert nm["samples"] == [vid, 0] and nm["mask"] == [loader_of(wf, "m.png"), 1]
    assert only(wf, "RepeatLatentBatch")[1]["samples"] == [nid, 0]
    assert only(wf, "KSampler")[1]["denoise"] == 0.3


def test_original_mode_is_inpaint_model_conditioning_in_the_built_workflow():
    """The masked image reaches the model's conditioning (inpainting checkpoints read it); the
    latent is the original's with the noise mask, the sampler's prompts go through it."""
    wf = build(mask="m.png", mode="original", denoising_strength=0.3)
    assert not W.nodes_of(wf, "SetLatentNoiseMask", "VAEEncode")
    iid, imc = only(wf, "InpaintModelConditioning")
    sid, ks = only(wf, "KSampler")
    assert imc["pixels"] == [loader_of(wf, "in.png"), 0] and imc["mask"] == [loader_of(wf, "m.png"), 1]
    assert imc["noise_mask"] is True and imc["vae"] == ["1", 2]
    assert [wf[imc[k][0]]["class_type"] for k in ("positive", "negative")] == ["CLIPTextEncode"] * 2
    assert (ks["positive"], ks["negative"]) == ([iid, 0], [iid, 1]) and ks["denoise"] == 0.3
    assert only(wf, "RepeatLatentBatch")[1]["samples"] == [iid, 2]


def test_original_mode_keeps_a_tiled_encode_with_a_noise_mask():
    """InpaintModelConditioning encodes untiled: with tiling on, the tiled encode stays."""
    wf = build(mask="m.png", mode="original", tiling=True, tile_size=256, tile_overlap=32)
    assert not W.nodes_of(wf, "InpaintModelConditioning")
    _, nm = only(wf, "SetLatentNoiseMask")
    assert wf[nm["samples"][0]]["class_type"] == "VAEEncodeTiled"


def test_soft_inpainting_patches_every_sampler_model_once():
    wf = build(mask="m.png", mode="original", soft_inpainting=True)
    did, dd = only(wf, "DifferentialDiffusion")
    assert dd["model"] == ["1", 0] and only(wf, "KSampler")[1]["model"] == [did, 0]
    assert not W.nodes_of(build(mask="m.png", mode="original"), "DifferentialDiffusion")


def test_every_sampler_consuming_the_latent_is_rewired():
    wf = build()
    sid, ks = only(wf, "KSampler")
    second = copy.deepcopy(wf[sid])
    wf["k2"] = second
    wf["d2"] = {"class_type": "VAEDecode", "inputs": {"samples": ["k2", 0], "vae": ["1", 2]}}
    wf["s2"] = {"class_type": "SaveImage", "inputs": {"images": ["d2", 0], "filename_prefix": "p"}}
    out = W.inject_mask_into_workflow(wf, "m.png")
    eid = W.nodes_of(out, "VAEEncodeForInpaint")[0]
    rep = W.nodes_of(out, "RepeatLatentBatch")[0]
    assert out[rep]["inputs"]["samples"] == [eid, 0]
    assert out[sid]["inputs"]["denoise"] == 1.0 and out["k2"]["inputs"]["denoise"] == 1.0


def test_injection_without_an_encoded_image_fails_loudly():
    wf = {"1": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}}}
    with pytest.raises(W.WorkflowError):
        W.inject_mask_into_workflow(wf, "m.png")


def test_injection_does_not_mutate_its_input():
    wf = build()
    before = copy.deepcopy(wf)
    W.inject_mask_into_workflow(wf, "m.png")
    assert wf == before


def test_new_ids_avoid_odd_existing_ids():
    wf = {"3.5": {"class_type": "X", "inputs": {}}, "10:2": {"class_type": "Y", "inputs": {}},
          "7": {"class_type": "Z", "inputs": {}}}
    assert graph.new_node_id(wf) == "8"
    assert graph.new_node_id({"a": {}}) == "1"


def test_clip_skip_inserts_clip_set_last_layer():
    wf = build(clip_skip=2)
    lid, layer = only(wf, "CLIPSetLastLayer")
    assert layer["stop_at_clip_layer"] == -2
    for nid in W.nodes_of(wf, "CLIPTextEncode"):
        assert wf[nid]["inputs"]["clip"] == [lid, 0]
    assert W.nodes_of(build(), "CLIPSetLastLayer") == []


def test_finish_outputs_pastes_the_input_back_over_the_batch_and_crops():
    wf = W.build_img2img_workflow(gp(batch_size=2), image_name="in.png", mask_name="m.png",
                                  filename_prefix="img2img_x_0", seed=7, paste_back=True, crop_to=(101, 77))
    save_id, save = only(wf, "SaveImage")
    comp_id, comp = only(wf, "ImageCompositeMasked")
    crop_id, crop = only(wf, "ImageCrop")
    assert save["images"] == [crop_id, 0]
    assert (crop["image"], crop["width"], crop["height"], crop["x"], crop["y"]) == ([comp_id, 0], 101, 77, 0, 0)
    # the generated batch is the destination (a 1-image destination would cut the batch to 1)
    assert wf[comp["destination"][0]]["class_type"] == "VAEDecode"
    assert comp["source"] == [loader_of(wf, "in.png"), 0]
    assert (comp["x"], comp["y"], comp["resize_source"]) == (0, 0, False)
    # the weights: the red channel of the mask file, from the loader the inpainting uses (one
    # loader per file: ComfyUI lists its whole input folder to validate each)
    weights_id, weights = only(wf, "ImageToMask")
    assert comp["mask"] == [weights_id, 0] and weights == {"image": [loader_of(wf, "m.png"), 0], "channel": "red"}
    assert not W.nodes_of(wf, "LoadImageMask")


def test_paste_back_weights_of_a_mask_file_without_a_loader_get_their_own():
    """finish_outputs alone (no inpainting injected): the weights come from a LoadImageMask."""
    base = W.transform_to_img2img_workflow(P.parse_params({"prompt": "p"}), image_name="in.png",
                                           filename_prefix="x", seed=1)
    wf = W.finish_outputs(base, input_loader=loader_of(base, "in.png"), keep_mask_name="m.png")
    mid, lim = only(wf, "LoadImageMask")
    assert lim == {"image": "m.png", "channel": "red"} and only(wf, "ImageCompositeMasked")[1]["mask"] == [mid, 0]


def test_finish_outputs_only_crops_without_paste_back():
    wf = W.build_img2img_workflow(gp(), image_name="in.png", mask_name=None, filename_prefix="p", seed=7,
                                  crop_to=(500, 300))
    assert not W.nodes_of(wf, "ImageCompositeMasked")
    crop_id, crop = only(wf, "ImageCrop")
    assert only(wf, "SaveImage")[1]["images"] == [crop_id, 0]
    assert wf[crop["image"][0]]["class_type"] == "VAEDecode"
    assert build() == W.build_img2img_workflow(gp(), image_name="in.png", mask_name=None,
                                               filename_prefix="img2img_x_0", seed=7)  # nothing asked, nothing added


def test_the_top_level_entry_point_re_exports_the_public_api():
    """The design card's `from img2img_workflow import build_img2img_workflow` (run in a fresh
    interpreter: an import error anywhere in the chain fails here)."""
    import subprocess
    import sys
    from pathlib import Path
    root = Path(__file__).resolve().parent.parent
    code = ("import img2img_workflow as m; from img2img_workflow import build_img2img_workflow; "
            "missing = [n for n in m.__all__ if not hasattr(m, n)]; assert not missing, missing; "
            "print(build_img2img_workflow.__module__)")
    out = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "dreamlayer.img2img.workflow"


def test_reads_any_follows_links_upstream_through_cycles():
    from dreamlayer.img2img.graph import reads_any
    wf = {"1": {"class_type": "LoadImage", "inputs": {"image": "in.png"}},
          "2": {"class_type": "Blur", "inputs": {"image": ["1", 0], "loop": ["3", 0]}},
          "3": {"class_type": "Loop", "inputs": {"x": ["2", 0]}},
          "4": {"class_type": "LoadImage", "inputs": {"image": "ref.png"}},
          "5": {"class_type": "PreviewImage", "inputs": {"images": ["4", 0], "gone": ["404", 0]}}}
    assert reads_any(wf, "3", {"in.png"}) and reads_any(wf, "1", {"in.png", "m.png"})
    assert not reads_any(wf, "5", {"in.png"}) and reads_any(wf, "5", {"ref.png"})
    assert not reads_any(wf, "404", {"in.png"})


def test_copy_workflow_shares_nothing_an_edit_can_reach():
    from dreamlayer.img2img.graph import copy_workflow
    wf = {"1": {"class_type": "A", "inputs": {"x": ["2", 0], "n": 3, "opts": {"deep": [1, 2]}},
                "_meta": {"title": "t"}}, "2": {"class_type": "B", "inputs": {}}}
    out = copy_workflow(wf)
    assert out == wf
    out["1"]["inputs"]["x"][0] = "9"
    out["1"]["inputs"]["opts"]["deep"].append(3)
    out["1"]["_meta"]["title"] = "changed"
    out["2"]["inputs"]["new"] = 1
    assert wf == {"1": {"class_type": "A", "inputs": {"x": ["2", 0], "n": 3, "opts": {"deep": [1, 2]}},
                        "_meta": {"title": "t"}}, "2": {"class_type": "B", "inputs": {}}}
