"""What ComfyUI generates for a request, and at which sizes: the output size and resize mode,
the "only masked" crop, the hires fix's upscale, and whether the workflow itself makes the final
image (paste-back, crop). Pure: images and parameters in, (image, keep mask, Plan) out.
"""
from __future__ import annotations

import dataclasses

from dreamlayer.errors import InvalidParameter
from dreamlayer.img2img import inpainting, passes
from dreamlayer.img2img.resize import LATENT_UPSCALE, resize_image

#: The nodes build_img2img_workflow adds to finish an image in ComfyUI (core nodes since 2023; a
#: ComfyUI without them gets the service-side paste-back instead).
FINISHING_NODES = ("ImageCompositeMasked", "ImageCrop", "ImageToMask")
#: What scaling in the workflow (resize mode 3, hires fix) needs besides them.
SCALING_NODES = ("ImageScale", "MaskToImage", "ImageToMask", "LatentUpscale")


def plan_generation(params, image, keep, *, comfy_nodes, max_output_pixels: int) -> tuple:
    """(image, keep, plan) for a validated request: ``image`` / ``keep`` resized by the resize
    mode when the output size differs from the input (the mask follows the image).

    ``comfy_nodes``: the node classes ComfyUI has. Combinations that cannot work raise
    InvalidParameter (400) saying why.
    """
    adv = params.advanced
    custom = params.custom_workflow is not None
    only_masked = keep is not None and params.inpaint_area == "only_masked"
    if custom and (adv.hires or adv.refiner):
        feature = "hires_fix" if adv.hires else "refiner_enabled"
        raise InvalidParameter(feature, f"'{feature}' applies to the built-in workflow; a custom_workflow "
                               "defines its own sampling passes", code="unsupported_combination")
    if adv.hires and only_masked:
        raise InvalidParameter("hires_fix", "The hires fix cannot be combined with inpaint_area 'only masked': "
                               "that crop is pasted back at the input's resolution; use 'whole'",
                               code="unsupported_combination")
    stretched = None  # resize mode 3's output size
    width, height = params.width, params.height
    if (width or height) and not only_masked:
        size = (width or image.size[0], height or image.size[1])
        if adv.resize_mode == LATENT_UPSCALE:
            if custom:
                raise InvalidParameter("resize_mode", "resize_mode 3 (latent upscale) applies to the built-in "
                                       "workflow, not to a custom_workflow", code="unsupported_combination")
            if size != tuple(image.size):
                stretched = size
        else:
            image = resize_image(adv.resize_mode, image, size)
            if keep is not None:
                keep = resize_image(adv.resize_mode, keep, size)
                if keep.getextrema()[0] == 255:  # never drop a mask silently
                    raise InvalidParameter("resize_mode", _mask_lost(adv.resize_mode, size), code="mask_empty")
        width = height = None
    plan = inpainting.plan(image.size, keep, area=params.inpaint_area, padding=params.inpaint_padding,
                           width=width, height=height, paste_back=params.paste_back,
                           mask_blur=params.mask_blur)
    size_field = "width" if params.width or params.height else "image"
    _check_output_pixels(size_field, "The image ComfyUI would generate", plan.padded_size, max_output_pixels)
    steps, output, latent_resize, hires_size = [], None, None, None
    if stretched is not None:
        # the padded latent is stretched to cover the size (multiples of 8), the rest cropped
        latent_resize = passes.canvas_for(stretched, plan.work_size, plan.padded_size)
        _check_latent_upscale("resize_mode", "resize_mode 3 (latent upscale) stretches", latent_resize,
                              "ask for a larger size, or use resize_mode 0 (a stretch in pixels)")
        _check_output_pixels(size_field, "resize_mode 3's stretched latent", latent_resize, max_output_pixels)
        steps.append((latent_resize, "disabled"))
        output = stretched
    if adv.hires is not None:
        base, first_pass = stretched or plan.work_size, latent_resize or plan.padded_size
        target = passes.hires_target(adv.hires, base)
        hires_size = passes.canvas_for(target, base, first_pass)
        if adv.hires.upscaler.kind == "latent" and hires_size != first_pass:  # at 1x nothing is upscaled
            _check_latent_upscale("hires_fix_upscaler", "the hires fix's latent upscaler "
                                  f"({adv.hires.upscaler.name}) upscales", hires_size,
                                  "use a larger factor or size, or a pixel or model upscaler (Lanczos, an upscale "
                                  "model)")
            kept = passes.latent_crop(first_pass, hires_size)
            if min(kept) < 1:  # found on a real ComfyUI 0.3.40: "sizes should be greater than 0"
                raise InvalidParameter("hires_fix_upscaler", f"The hires fix's latent upscaler "
                                       f"({adv.hires.upscaler.name}) would centre-crop the first pass "
                                       f"({first_pass[0]}x{first_pass[1]}) to nothing for the aspect of "
                                       f"{hires_size[0]}x{hires_size[1]}: use a size of a closer aspect, or a pixel "
                                       "or model upscaler (Lanczos, an upscale model)", code="unsupported_combination")
        for name, size in (("output", target), ("upscaled canvas", hires_size)):
            _check_output_pixels("hires_fix", f"The hires fix's {name}", size, max_output_pixels)
        steps.append((hires_size, "center"))
        output = target
    can_finish = (not custom and inpainting.comfy_can_finish(plan, keep is not None)
                  and all(node in comfy_nodes for node in FINISHING_NODES))
    if steps:
        field = "hires_fix" if adv.hires else "resize_mode"
        missing = [node for node in dict.fromkeys(FINISHING_NODES + SCALING_NODES) if node not in comfy_nodes]
        if missing:
            raise InvalidParameter(field, f"This ComfyUI lacks the core nodes {', '.join(missing)} that scaling in "
                                   "the workflow needs (an old ComfyUI: update it)", code="node_missing",
                                   missing_nodes=missing)
        if not can_finish:  # (the combinations refused above leave none such)
            raise InvalidParameter(field, f"'{field}' scales the generation inside the workflow, which then has "
                                   "to finish the image, and cannot for this request", code="unsupported_combination")
    if can_finish:
        # the core template's outputs get the paste-back and crop as nodes: ComfyUI saves the
        # final image and the service serves it without decoding it (docs/performance.md)
        plan = dataclasses.replace(plan, final_from_comfyui=True, latent_resize=latent_resize,
                                   hires_size=hires_size, scale_steps=tuple(steps), output_size=output)
    return image, keep, plan


def _mask_lost(mode: int, size: tuple) -> str:
    if mode == 1:
        return (f"resize_mode 1 crops the image to {size[0]}x{size[1]}, and the mask's area to inpaint lies outside "
                "that crop: use resize_mode 0 or 2, or another size")
    return (f"resize_mode {mode} resizes the image to {size[0]}x{size[1]}, and the mask's area to inpaint vanishes "
            "at that size: paint a larger area, or ask for a larger size")


def _check_output_pixels(field: str, what: str, size: tuple, limit: int) -> None:
    """MAX_OUTPUT_PIXELS bounds every image a workflow makes (ComfyUI's memory), refused
    before anything is staged."""
    w, h = size
    if w * h > limit:
        fix = "; ask for a smaller width and height" if field != "hires_fix" else ""
        raise InvalidParameter(field, f"{what} would be {w}x{h} = {w * h:,} pixels; the limit is {limit:,} "
                               f"(MAX_OUTPUT_PIXELS){fix}", code="output_too_large", maximum=limit)


def _check_latent_upscale(field: str, what: str, size: tuple, fix: str) -> None:
    """ComfyUI's LatentUpscale makes each side at least 64 px, whatever it is asked: a smaller
    size would come back larger, its picture squeezed into the crop. A 400 saying so instead."""
    if min(size) < passes.LATENT_UPSCALE_MIN:
        raise InvalidParameter(field, f"{what} the latent to {size[0]}x{size[1]}, and ComfyUI's LatentUpscale makes "
                               f"each side at least {passes.LATENT_UPSCALE_MIN} px: {fix}",
                               code="unsupported_combination")


def finishing(plan, keep) -> dict:
    """build_img2img_workflow's finishing arguments for a plan the workflow finishes: the
    paste-back, the crop of the padding, and the scalings the paste-back must follow."""
    if not plan.final_from_comfyui:
        return {}
    scaled = plan.scale_steps[-1][0] if plan.scale_steps else plan.padded_size
    return {"paste_back": keep is not None and plan.paste_back,
            "crop_to": plan.final_size if tuple(scaled) != plan.final_size else None,
            "scale_steps": plan.scale_steps, "latent_resize": plan.latent_resize, "hires_size": plan.hires_size,
            "hires_from": plan.latent_resize or plan.padded_size}
