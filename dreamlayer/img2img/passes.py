"""Extra sampling passes, as AUTOMATIC1111 runs them: the SDXL-style refiner and the hires fix.

Pure workflow edits (dict in, new dict out). Both work on the samplers of the built workflow, so
they come after LoRAs and ControlNets are chained in (and see the same model and conditioning).
"""
from __future__ import annotations

import math

from dreamlayer.img2img.graph import add_node, copy_workflow, is_link, nodes_of, relink

#: KSamplerAdvanced's end_at_step for "to the end" (ComfyUI's own default).
TO_THE_END = 10000


# --- refiner -----------------------------------------------------------------------------------

def refiner_steps(steps: int, denoise: float, switch_at: float) -> tuple:
    """(total, start, switch) steps for KSamplerAdvanced that sample what KSampler(steps, denoise)
    samples: ComfyUI's KSampler runs the last ``steps`` of a ``int(steps / denoise)``-step
    schedule, so the base model runs [start, switch) and the refiner [switch, total)."""
    total = max(steps, int(steps / denoise)) if denoise < 1.0 else steps
    start = total - steps
    switch = start + max(1, round(steps * switch_at))
    return total, start, min(switch, total)


def apply_refiner(workflow: dict, *, refiner_model: str, switch_at: float, prompt: str, negative_prompt: str,
                  clip_skip: int = 1) -> dict:
    """Split each KSampler into base [start, switch) and refiner [switch, end) on the same latent.

    The base pass keeps its leftover noise for the refiner, which adds none; the refiner samples
    with its own checkpoint and the prompts encoded by its own CLIP (A1111's refiner). LoRAs and
    ControlNets stay on the base model: they are made for it, not for the refiner.
    """
    wf = copy_workflow(workflow)
    refiner = None
    for sid in nodes_of(wf, "KSampler"):
        s = wf[sid]["inputs"]
        if s.get("denoise", 1.0) <= 0:
            continue  # nothing is sampled: nothing to hand over
        total, start, switch = refiner_steps(s["steps"], s.get("denoise", 1.0), switch_at)
        if switch >= total:
            continue  # switch at 1.0: the base model samples every step
        if refiner is None:
            refiner = _refiner_conditioning(wf, refiner_model, prompt, negative_prompt, clip_skip)
        common = {"noise_seed": s["seed"], "steps": total, "cfg": s["cfg"], "sampler_name": s["sampler_name"],
                  "scheduler": s["scheduler"]}
        base = add_node(wf, "KSamplerAdvanced", {
            "model": s["model"], "add_noise": "enable", **common, "positive": s["positive"],
            "negative": s["negative"], "latent_image": s["latent_image"], "start_at_step": start,
            "end_at_step": switch, "return_with_leftover_noise": "enable"})
        finish = add_node(wf, "KSamplerAdvanced", {
            "model": refiner["model"], "add_noise": "disable", **common, "positive": refiner["positive"],
            "negative": refiner["negative"], "latent_image": [base, 0], "start_at_step": switch,
            "end_at_step": TO_THE_END, "return_with_leftover_noise": "disable"})
        relink(wf, [sid, 0], [finish, 0])
        del wf[sid]
    return wf


def _refiner_conditioning(wf: dict, model: str, prompt: str, negative_prompt: str, clip_skip: int) -> dict:
    ckpt = add_node(wf, "CheckpointLoaderSimple", {"ckpt_name": model})
    clip = [ckpt, 1]
    if clip_skip > 1:
        clip = [add_node(wf, "CLIPSetLastLayer", {"clip": clip, "stop_at_clip_layer": -clip_skip}), 0]
    return {"model": [ckpt, 0],
            "positive": [add_node(wf, "CLIPTextEncode", {"text": prompt, "clip": list(clip)}), 0],
            "negative": [add_node(wf, "CLIPTextEncode", {"text": negative_prompt, "clip": list(clip)}), 0]}


# --- hires fix ---------------------------------------------------------------------------------

def round8(value: float) -> int:
    """To a multiple of 8 (the latent's grid), at least 8 (one latent cell). Not at least 64: a
    side of 48 scaled by 1 stays 48 (a larger minimum would change the aspect ratio, and the hires
    fix's centre crop would cut the sides off)."""
    return max(8, int(round(value / 8.0)) * 8)


def hires_target(hires, work_size: tuple) -> tuple:
    """The hires output size (A1111): ``factor`` x the first pass's size, or exactly the
    resize-to size; each side a multiple of 8. A resize-to of another aspect ratio is covered and
    centre-cropped (A1111 upscales to cover the target, then crops), never stretched."""
    if hires.method == "resize-to":
        return round8(hires.resize_width), round8(hires.resize_height)
    return round8(work_size[0] * hires.factor), round8(work_size[1] * hires.factor)


#: ComfyUI's LatentUpscale makes each side at least this many pixels, whatever it is asked.
LATENT_UPSCALE_MIN = 64


def latent_crop(source: tuple, target: tuple) -> tuple:
    """What ComfyUI's LatentUpscale(crop="center") keeps of a latent of ``source`` px to give
    it ``target``'s aspect, in latent cells (comfy.utils.common_upscale; Python's round, as
    there). A side of 0 fails in ComfyUI."""
    old_w, old_h = source[0] // 8, source[1] // 8
    new_w, new_h = max(LATENT_UPSCALE_MIN, target[0]) // 8, max(LATENT_UPSCALE_MIN, target[1]) // 8
    old_aspect, new_aspect = old_w / old_h, new_w / new_h
    x = y = 0
    if old_aspect > new_aspect:
        x = round((old_w - old_w * (new_aspect / old_aspect)) / 2)
    elif old_aspect < new_aspect:
        y = round((old_h - old_h * (old_aspect / new_aspect)) / 2)
    return old_w - 2 * x, old_h - 2 * y


def canvas_for(target: tuple, work_size: tuple, padded_size: tuple) -> tuple:
    """The size (multiples of 8) an image of ``padded_size`` (``work_size`` of it the picture,
    the rest its padding, right and bottom) is stretched to so that the picture covers
    ``target``: cropping the right and bottom to ``target`` then leaves picture only. The hires
    fix's upscale of the padded first pass; resize mode 3's stretch of the padded latent."""
    return tuple(max(8, -(-math.ceil(t * p / w) // 8) * 8) for t, w, p in zip(target, work_size, padded_size))


def apply_hires_fix(workflow: dict, *, upscaler, size: tuple, steps: int, denoise: float, seed: int,
                    from_size: tuple | None = None) -> dict:
    """A second pass over every final sampler's result, upscaled to ``size`` (w, h).

    ``upscaler``: an advanced_params.Upscaler — "latent" upscales the latent (LatentUpscale, the
    noise mask goes along), "pixel" decodes, scales (ImageScale) and re-encodes, "model" decodes,
    runs the upscale model (its native scale), scales to the exact size and re-encodes. The second
    KSampler uses the first pass's model, conditioning, sampler, scheduler and cfg, ``steps`` and
    ``denoise``; an inpainting mask limits it to the masked area as in the first pass.
    ``from_size``: the first pass's size, when known; a latent upscale to that same size (1x) is
    left out (ComfyUI's LatentUpscale would make a side under 64 px 64).
    """
    wf = copy_workflow(workflow)
    masks = [wf[n]["inputs"]["mask"] for n in nodes_of(wf, "SetLatentNoiseMask", "VAEEncodeForInpaint")]
    width, height = size
    for did in nodes_of(wf, "VAEDecode", "VAEDecodeTiled"):
        source = wf[did]["inputs"]["samples"]
        first = wf.get(source[0]) if is_link(source) else None
        if first is None or first["class_type"] not in ("KSampler", "KSamplerAdvanced"):
            continue
        vae = wf[did]["inputs"]["vae"]
        if upscaler.kind == "latent" and from_size is not None and tuple(size) == tuple(from_size):
            latent = list(source)
        elif upscaler.kind == "latent":
            latent = [add_node(wf, "LatentUpscale", {"samples": list(source), "upscale_method": upscaler.name,
                                                     "width": width, "height": height, "crop": "center"}), 0]
        else:
            image = [add_node(wf, "VAEDecode", {"samples": list(source), "vae": list(vae)}), 0]
            method = upscaler.name
            if upscaler.kind == "model":
                loader = add_node(wf, "UpscaleModelLoader", {"model_name": upscaler.name})
                image = [add_node(wf, "ImageUpscaleWithModel", {"upscale_model": [loader, 0], "image": image}), 0]
                method = "lanczos"
            image = [add_node(wf, "ImageScale", {"image": image, "upscale_method": method, "width": width,
                                                 "height": height, "crop": "center"}), 0]
            latent = [add_node(wf, "VAEEncode", {"pixels": image, "vae": list(vae)}), 0]
            if masks:
                latent = [add_node(wf, "SetLatentNoiseMask", {"samples": latent, "mask": list(masks[0])}), 0]
        f = first["inputs"]
        second = add_node(wf, "KSampler", {
            "model": list(f["model"]), "seed": seed, "steps": steps, "cfg": f["cfg"],
            "sampler_name": f["sampler_name"], "scheduler": f["scheduler"], "positive": list(f["positive"]),
            "negative": list(f["negative"]), "latent_image": latent, "denoise": denoise})
        wf[did]["inputs"]["samples"] = [second, 0]
    return wf


def scaled_mask(workflow: dict, mask: list, size: tuple, *, crop: str = "center") -> list:
    """A MASK link resized to ``size`` as the generation was (``crop`` "center" for the hires
    fix, "disabled" for a stretch), through an image: ComfyUI has no mask resize node."""
    image = add_node(workflow, "MaskToImage", {"mask": list(mask)})
    scaled = add_node(workflow, "ImageScale", {"image": [image, 0], "upscale_method": "bilinear",
                                               "width": size[0], "height": size[1], "crop": crop})
    return [add_node(workflow, "ImageToMask", {"image": [scaled, 0], "channel": "red"}), 0]


def scaled_image(workflow: dict, image: list, size: tuple, *, crop: str = "center") -> list:
    """An IMAGE link resized to ``size`` as the generation was (see ``scaled_mask``)."""
    return [add_node(workflow, "ImageScale", {"image": list(image), "upscale_method": "lanczos",
                                              "width": size[0], "height": size[1], "crop": crop}), 0]

