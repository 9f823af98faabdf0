"""Building ComfyUI API-format workflows for img2img and inpainting.

Pure functions: a workflow (dict) and parameters in, a new workflow out; nothing here touches
the disk except ``load_template``, which reads a JSON template from workflows/img2img/.
Nodes are found by their role in the graph (what links to what), not by fixed ids, so the same
functions work on templates and on users' own workflows.
"""
from __future__ import annotations

import copy
import json
from functools import lru_cache

from dreamlayer import PROJECT_ROOT
from dreamlayer.img2img import decoding, passes
from dreamlayer.img2img.graph import (add_node, consumers, copy_workflow, is_link, linked, nodes_of,  # noqa: F401
                                     relink, upstream)

TEMPLATE_DIR = PROJECT_ROOT / "workflows" / "img2img"
CORE_TEMPLATE = "core_generation_workflow"
SAMPLER_CLASSES = ("KSampler", "KSamplerAdvanced")


class WorkflowError(ValueError):
    """The workflow cannot be built or modified as asked (e.g. no place to inject a mask)."""


@lru_cache(maxsize=None)
def _read_template(name: str) -> str:
    path = (TEMPLATE_DIR / f"{name}.json").resolve()
    if path.parent != TEMPLATE_DIR.resolve():
        raise WorkflowError(f"invalid template name {name!r}")
    return path.read_text(encoding="utf-8")


def load_template(name: str = CORE_TEMPLATE) -> dict:
    """A fresh copy of a template (API format: node id -> {class_type, inputs})."""
    data = json.loads(_read_template(name))
    return data.get("prompt", data)


# --- img2img ------------------------------------------------------------------------------

def transform_to_img2img_workflow(params, *, image_name: str, filename_prefix: str, seed: int,
                                  template: dict | None = None) -> dict:
    """Fill a workflow (the core template, or a user's own) with the request's parameters.

    ``params`` is a resolved GenerationParams (model, sampler and scheduler already checked).
    """
    wf = copy_workflow(template) if template is not None else load_template()
    samplers = nodes_of(wf, *SAMPLER_CLASSES)
    if not samplers:
        raise WorkflowError("the workflow has no KSampler")
    for sid in samplers:
        inputs = wf[sid]["inputs"]
        inputs.update(steps=params.steps, cfg=params.cfg_scale, sampler_name=params.sampler_name,
                      scheduler=params.scheduler)
        if wf[sid]["class_type"] == "KSamplerAdvanced":
            inputs["noise_seed"] = seed  # it has no denoise: start/end steps are the user's
        else:
            inputs.update(seed=seed, denoise=params.denoising_strength)
        for role, text in (("positive", params.prompt), ("negative", params.negative_prompt)):
            encoder = text_encoder_for(wf, inputs.get(role), role)
            if encoder:
                wf[encoder]["inputs"]["text"] = text
    for nid in nodes_of(wf, "CheckpointLoaderSimple"):
        wf[nid]["inputs"]["ckpt_name"] = params.model_name
    loaders = input_image_loaders(wf) or nodes_of(wf, "LoadImage")[:1]
    if not loaders:
        raise WorkflowError("the workflow has no LoadImage for the input image")
    for nid in loaders:
        wf[nid]["inputs"]["image"] = image_name
    wf = set_batch_size(wf, params.batch_size)
    for nid in nodes_of(wf, "SaveImage"):
        wf[nid]["inputs"]["filename_prefix"] = filename_prefix
    if params.clip_skip > 1:
        wf = apply_clip_skip(wf, params.clip_skip)
    return wf


#: Inputs followed upstream from a sampler's conditioning to its text encoder, by role.
_CONDITIONING_INPUTS = {"positive": ("positive", "conditioning", "conditioning_to", "conditioning_1"),
                        "negative": ("negative", "conditioning", "conditioning_to", "conditioning_1")}


def text_encoder_for(workflow: dict, link, role: str, _depth: int = 0):
    """The CLIPTextEncode whose text feeds a sampler's ``role`` input ("positive"/"negative"),
    following conditioning chains (ControlNetApplyAdvanced's positive output comes from its
    positive input, and so on)."""
    if not is_link(link) or link[0] not in workflow or _depth > 64:
        return None
    node = workflow[link[0]]
    if node.get("class_type") == "CLIPTextEncode":
        return link[0]
    inputs = node.get("inputs", {})
    for name in _CONDITIONING_INPUTS[role]:
        if is_link(inputs.get(name)):
            return text_encoder_for(workflow, inputs[name], role, _depth + 1)
    return None


def set_batch_size(workflow: dict, batch_size: int) -> dict:
    """Set RepeatLatentBatch amounts, or insert one after the input image's encode when needed."""
    wf = copy_workflow(workflow)
    repeats = nodes_of(wf, "RepeatLatentBatch")
    for nid in repeats:
        wf[nid]["inputs"]["amount"] = batch_size
    if repeats or batch_size == 1:
        return wf
    for eid in nodes_of(wf, "VAEEncode", "VAEEncodeForInpaint"):
        repeat = add_node(wf, "RepeatLatentBatch", {"samples": [eid, 0], "amount": batch_size})
        relink(wf, [eid, 0], [repeat, 0], skip=repeat)
    return wf


def input_image_loaders(workflow: dict) -> list:
    """LoadImage nodes whose pixels are encoded into a latent: the img2img input image(s)."""
    found = []
    for eid in nodes_of(workflow, "VAEEncode", "VAEEncodeForInpaint"):
        loader = upstream(workflow, linked(workflow, eid, "pixels") or "", ("LoadImage",))
        if loader and loader not in found:
            found.append(loader)
    return found


def apply_clip_skip(workflow: dict, clip_skip: int) -> dict:
    """Insert CLIPSetLastLayer after each checkpoint's CLIP output (AUTOMATIC1111's clip skip)."""
    wf = copy_workflow(workflow)
    for ckpt in nodes_of(wf, "CheckpointLoaderSimple"):
        users = consumers(wf, ckpt, 1)
        if not users:
            continue
        layer = add_node(wf, "CLIPSetLastLayer", {"clip": [ckpt, 1], "stop_at_clip_layer": -clip_skip})
        for nid, name in users:
            wf[nid]["inputs"][name] = [layer, 0]
    return wf


def inject_mask_into_workflow(workflow: dict, mask_name: str, *, grow_mask_by: int = 6,
                              mode: str = "fill") -> dict:
    """Add the inpainting mask and an inpainting encode. The mask file is loaded by a LoadImage
    node, whose MASK output is 1 - alpha (what LoadImageMask(channel "alpha") gives) and whose
    IMAGE output holds the paste-back weights (finish_outputs): one loader for both, and each
    loader costs ComfyUI a listing of its whole input folder when it validates the prompt.

    mode "fill": VAEEncodeForInpaint replaces the VAEEncode of the input image (masked pixels are
    filled grey before encoding; needs denoise 1.0, which is set on the samplers it feeds).
    mode "original": SetLatentNoiseMask on the input image's latent (denoise is kept).
    Every consumer of the input image's latent is rewired. Raises WorkflowError when the
    workflow has no VAEEncode of a loaded image: a mask is never silently dropped.
    """
    if mode not in ("fill", "original"):
        raise WorkflowError(f"unknown inpaint mode {mode!r}")
    wf = copy_workflow(workflow)
    encoders = [eid for eid in nodes_of(wf, "VAEEncode")
                if upstream(wf, linked(wf, eid, "pixels") or "", ("LoadImage",))]
    if not encoders:
        raise WorkflowError("cannot inject the mask: the workflow has no VAEEncode of the input image")
    mask_node = add_node(wf, "LoadImage", {"image": mask_name})
    for eid in encoders:
        encode = wf[eid]["inputs"]
        if mode == "fill":
            new = add_node(wf, "VAEEncodeForInpaint", {"pixels": encode["pixels"], "vae": encode["vae"],
                                                       "mask": [mask_node, 1], "grow_mask_by": grow_mask_by})
            rewired = relink(wf, [eid, 0], [new, 0])
            del wf[eid]
        else:
            new = add_node(wf, "SetLatentNoiseMask", {"samples": [eid, 0], "mask": [mask_node, 1]})
            rewired = relink(wf, [eid, 0], [new, 0], skip=new)
        if not rewired:
            raise WorkflowError(f"cannot inject the mask: nothing consumes the latent of node {eid}")
        if mode == "fill":
            for sid in _samplers_downstream(wf, new):
                if "denoise" in wf[sid]["inputs"]:
                    wf[sid]["inputs"]["denoise"] = 1.0
    return wf


def _samplers_downstream(workflow: dict, node_id: str) -> list:
    found, todo, seen = [], [node_id], set()
    while todo:
        current = todo.pop()
        for nid, _ in consumers(workflow, current, 0):
            if nid in seen:
                continue
            seen.add(nid)
            if workflow[nid].get("class_type") in SAMPLER_CLASSES:
                found.append(nid)
            else:
                todo.append(nid)
    return found


def build_img2img_workflow(params, *, image_name: str, mask_name: str | None, filename_prefix: str,
                           seed: int, inpaint_mode: str = "fill", controlnet_units=(),
                           paste_back: bool = False, crop_to: tuple | None = None, scale_steps=(),
                           latent_resize: tuple | None = None, hires_size: tuple | None = None,
                           hires_from: tuple | None = None) -> dict:
    """The whole workflow for one run: the core template (or the user's custom workflow), filled,
    with the mask injected, the LoRA and ControlNet nodes added, and the advanced settings
    (``params.advanced``: refiner, hires fix, VAE, tiling, face restoration) applied.

    ``controlnet_units``: the request's units with "image" set to a staged file name or None.
    ``latent_resize`` (w, h): resize mode 3, a LatentUpscale of the encoded input.
    ``hires_size`` (w, h): the size the hires fix upscales the first pass to (from ``hires_from``,
    when known: a latent upscale to the same size is left out).
    ``paste_back`` / ``crop_to`` / ``scale_steps``: let ComfyUI make the final image (see
    ``finish_outputs``).
    """
    wf = transform_to_img2img_workflow(params, image_name=image_name, filename_prefix=filename_prefix,
                                       seed=seed, template=getattr(params, "custom_workflow", None))
    input_loader = (input_image_loaders(wf) or nodes_of(wf, "LoadImage"))[0]
    if mask_name is not None:
        wf = inject_mask_into_workflow(wf, mask_name, grow_mask_by=params.grow_mask_by, mode=inpaint_mode)
    if latent_resize is not None:
        wf = resize_latent(wf, latent_resize)
    if (paste_back and mask_name is not None) or crop_to is not None:
        wf = finish_outputs(wf, input_loader=input_loader, keep_mask_name=mask_name if paste_back else None,
                            crop_to=crop_to, scale_steps=scale_steps)
    wf = apply_loras(wf, getattr(params, "loras", ()))
    wf = apply_controlnets(wf, controlnet_units, input_loader=input_loader)
    wf = apply_advanced(wf, params, seed=seed, hires_size=hires_size, hires_from=hires_from)
    if mask_name is not None and inpaint_mode == "original":
        wf = apply_inpaint_conditioning(wf)
    if mask_name is not None and getattr(params, "soft_inpainting", False):
        wf = apply_differential_diffusion(wf)
    return wf


def apply_inpaint_conditioning(workflow: dict) -> dict:
    """Inpaint mode "original" through InpaintModelConditioning: each SetLatentNoiseMask of an
    encoded image (VAEEncode -> SetLatentNoiseMask) becomes one InpaintModelConditioning that
    encodes the same pixels with the same mask and noise mask, and also puts the masked image
    (masked pixels grey) into the conditioning of the samplers it feeds. An inpainting (9-channel)
    checkpoint reads that instead of the unmasked original; other checkpoints ignore it.

    Left as it is (documented): a tiled encode (InpaintModelConditioning encodes untiled) and
    samplers fed by one latent with different conditioning."""
    wf = copy_workflow(workflow)
    for sid in nodes_of(wf, "SetLatentNoiseMask"):
        if sid not in wf:
            continue
        eid = linked(wf, sid, "samples")
        if eid is None or wf.get(eid, {}).get("class_type") != "VAEEncode":
            continue
        samplers = _samplers_downstream(wf, sid)
        conds = {(tuple(wf[n]["inputs"]["positive"]), tuple(wf[n]["inputs"]["negative"])) for n in samplers}
        if len(conds) != 1:
            continue
        positive, negative = (list(c) for c in conds.pop())
        encode = wf[eid]["inputs"]
        imc = add_node(wf, "InpaintModelConditioning", {
            "positive": positive, "negative": negative, "vae": encode["vae"], "pixels": encode["pixels"],
            "mask": wf[sid]["inputs"]["mask"], "noise_mask": True})
        relink(wf, [sid, 0], [imc, 2])
        for n in samplers:
            wf[n]["inputs"]["positive"] = [imc, 0]
            wf[n]["inputs"]["negative"] = [imc, 1]
        del wf[sid]
        if not consumers(wf, eid, 0):
            del wf[eid]
    return wf


def apply_differential_diffusion(workflow: dict) -> dict:
    """Soft inpainting: every sampler's model goes through DifferentialDiffusion, which turns the
    noise mask's grey levels into per-pixel strengths (ComfyUI's answer to A1111's soft
    inpainting). One node per distinct model link."""
    wf = copy_workflow(workflow)
    patched: dict = {}
    for sid in nodes_of(wf, *SAMPLER_CLASSES):
        model = wf[sid]["inputs"].get("model")
        if not is_link(model):
            continue
        key = tuple(model)
        if key not in patched:
            patched[key] = add_node(wf, "DifferentialDiffusion", {"model": list(model)})
        wf[sid]["inputs"]["model"] = [patched[key], 0]
    return wf


def apply_advanced(workflow: dict, params, *, seed: int, hires_size: tuple | None,
                   hires_from: tuple | None = None) -> dict:
    """The Img2Img tab's advanced settings, in the order A1111 applies them: the refiner finishes
    the first pass, the hires fix adds the second, then the VAE, tiling and face restoration."""
    adv = getattr(params, "advanced", None)
    if adv is None:
        return workflow
    wf = workflow
    if adv.refiner is not None:
        wf = passes.apply_refiner(wf, refiner_model=adv.refiner.model, switch_at=adv.refiner.switch_at,
                                  prompt=params.prompt, negative_prompt=params.negative_prompt,
                                  clip_skip=params.clip_skip)
    if adv.hires is not None and hires_size is not None:
        wf = passes.apply_hires_fix(wf, upscaler=adv.hires.upscaler, size=hires_size, from_size=hires_from,
                                    steps=adv.hires.steps, denoise=adv.hires.denoise, seed=seed)
    if adv.vae_name:
        wf = decoding.apply_vae_override(wf, adv.vae_name)
    if adv.tiling is not None:
        wf, _ = decoding.apply_tiled_vae(wf, tile_size=adv.tiling.tile_size, overlap=adv.tiling.overlap)
    if adv.face_restore is not None:
        face = adv.face_restore
        wf = decoding.apply_face_restore(wf, model_name=face.model, fidelity=face.fidelity,
                                         blend=face.weight if "gfpgan" in face.model.lower() else None)
    return wf


def resize_latent(workflow: dict, size: tuple) -> dict:
    """Resize mode 3, "Just resize (latent upscale)": every sampler's input latent is stretched to
    ``size`` (LatentUpscale, bilinear; an inpainting noise mask goes along)."""
    wf = copy_workflow(workflow)
    for sid in nodes_of(wf, *SAMPLER_CLASSES):
        latent = wf[sid]["inputs"]["latent_image"]
        wf[sid]["inputs"]["latent_image"] = [add_node(wf, "LatentUpscale", {
            "samples": latent, "upscale_method": "bilinear", "width": size[0], "height": size[1],
            "crop": "disabled"}), 0]
    return wf


#: Channel of the mask file holding how much of the input to keep when pasting back (the alpha
#: channel holds the inpainting mask itself; see png_writer.comfy_mask_png).
PASTE_BACK_CHANNEL = "red"


def _paste_back_weights(wf: dict, mask_name: str) -> list:
    """The MASK of paste-back weights: ImageToMask(red) of the LoadImage that loaded the mask file
    for the inpainting (the same file: L/255, as LoadImageMask(channel "red") would read it), or a
    LoadImageMask of its own when no such loader is there."""
    for nid in nodes_of(wf, "LoadImage"):
        if wf[nid]["inputs"].get("image") == mask_name:
            return [add_node(wf, "ImageToMask", {"image": [nid, 0], "channel": PASTE_BACK_CHANNEL}), 0]
    return [add_node(wf, "LoadImageMask", {"image": mask_name, "channel": PASTE_BACK_CHANNEL}), 0]


def finish_outputs(workflow: dict, *, input_loader: str, keep_mask_name: str | None = None,
                   crop_to: tuple | None = None, scale_steps=()) -> dict:
    """Make the images ComfyUI saves the final ones, so the service serves them as they are.

    With ``keep_mask_name``: ImageCompositeMasked puts the input image back over the generated
    one, weighted by the red channel of that mask file (1 = keep the input: outside the inpainted
    area the input's pixels come back unchanged; a blurred edge blends the two). The generated
    batch is the destination, so every image of a batch is pasted into. With ``crop_to`` (w, h):
    ImageCrop removes the padding to a multiple of 8 from the bottom and right. ``scale_steps``
    ((w, h), crop) scale the input and the weights the way the workflow scaled the generation
    (resize mode 3, hires fix) before they are pasted.
    """
    wf = copy_workflow(workflow)
    mask = None
    for sid in nodes_of(wf, "SaveImage"):
        images = wf[sid]["inputs"].get("images")
        if not is_link(images):
            continue
        if keep_mask_name is not None:
            if mask is None:
                mask = _paste_back_weights(wf, keep_mask_name)
                source = [input_loader, 0]
                for size, crop in scale_steps:
                    source = passes.scaled_image(wf, source, size, crop=crop)
                    mask = passes.scaled_mask(wf, mask, size, crop=crop)
            images = [add_node(wf, "ImageCompositeMasked", {
                "destination": images, "source": list(source), "x": 0, "y": 0, "resize_source": False,
                "mask": list(mask)}), 0]
        if crop_to is not None:
            images = [add_node(wf, "ImageCrop", {"image": images, "width": crop_to[0], "height": crop_to[1],
                                                 "x": 0, "y": 0}), 0]
        wf[sid]["inputs"]["images"] = images
    return wf


# --- LoRA, ControlNet, custom workflows -----------------------------------------------------

def apply_loras(workflow: dict, loras) -> dict:
    """Chain a LoraLoader per entry between each checkpoint and every consumer of its MODEL and
    CLIP. ``loras``: dicts with lora_name, strength_model, strength_clip."""
    wf = copy_workflow(workflow)
    if not loras:
        return wf
    for ckpt in nodes_of(wf, "CheckpointLoaderSimple"):
        model_users, clip_users = consumers(wf, ckpt, 0), consumers(wf, ckpt, 1)
        model, clip = [ckpt, 0], [ckpt, 1]
        for lora in loras:
            nid = add_node(wf, "LoraLoader", {"model": model, "clip": clip, "lora_name": lora["lora_name"],
                                               "strength_model": lora["strength_model"],
                                               "strength_clip": lora["strength_clip"]})
            model, clip = [nid, 0], [nid, 1]
        for nid, name in model_users:
            wf[nid]["inputs"][name] = list(model)
        for nid, name in clip_users:
            wf[nid]["inputs"][name] = list(clip)
    return wf


#: Union ControlNet types (SetUnionControlNetType) for the frontend's control_type values.
UNION_TYPES = {
    "openpose": "openpose", "depth": "depth", "canny": "canny/lineart/anime_lineart/mlsd",
    "lineart": "canny/lineart/anime_lineart/mlsd", "mlsd": "canny/lineart/anime_lineart/mlsd",
    "scribble": "hed/pidi/scribble/ted", "softedge": "hed/pidi/scribble/ted", "hed": "hed/pidi/scribble/ted",
    "normal": "normal", "seg": "segment", "segment": "segment", "tile": "tile", "inpaint": "repaint",
    "repaint": "repaint", "auto": "auto",
}


def apply_controlnets(workflow: dict, units, *, input_loader: str) -> dict:
    """Chain ControlNetLoader + ControlNetApplyAdvanced per unit on every sampler's conditioning.

    A unit: model, image (a file name for a new LoadImage, or None = the input image's loader),
    preprocessor ("none" | "canny"), low/high thresholds, union_type (or None), strength,
    start, end.
    """
    wf = copy_workflow(workflow)
    if not units:
        return wf
    samplers = nodes_of(wf, *SAMPLER_CLASSES)
    pairs = []  # distinct (positive, negative) links feeding samplers
    for sid in samplers:
        pair = (tuple(wf[sid]["inputs"]["positive"]), tuple(wf[sid]["inputs"]["negative"]))
        if pair not in pairs:
            pairs.append(pair)
    for pos, neg in pairs:
        positive, negative = list(pos), list(neg)
        for unit in units:
            loader = add_node(wf, "ControlNetLoader", {"control_net_name": unit["model"]})
            control = [loader, 0]
            if unit.get("union_type"):
                control = [add_node(wf, "SetUnionControlNetType", {"control_net": control,
                                                                    "type": unit["union_type"]}), 0]
            image = [input_loader, 0]
            if unit.get("image"):
                image = [add_node(wf, "LoadImage", {"image": unit["image"]}), 0]
            if unit.get("preprocessor") == "canny":
                image = [add_node(wf, "Canny", {"image": image, "low_threshold": unit["low"],
                                                "high_threshold": unit["high"]}), 0]
            apply = add_node(wf, "ControlNetApplyAdvanced", {
                "positive": positive, "negative": negative, "control_net": control, "image": image,
                "strength": unit["strength"], "start_percent": unit["start"], "end_percent": unit["end"]})
            positive, negative = [apply, 0], [apply, 1]
        for sid in samplers:
            inputs = wf[sid]["inputs"]
            if tuple(inputs["positive"]) == pos and tuple(inputs["negative"]) == neg:
                inputs["positive"], inputs["negative"] = list(positive), list(negative)
    return wf


#: Core nodes whose file-name inputs ComfyUI does not check against its lists (their own
#: VALIDATE_INPUTS only asks that the path exist): an absolute or ``../`` name reads any file.
CORE_FILE_INPUTS = {("LoadImage", "image"), ("LoadImageMask", "image"), ("LoadLatent", "latent"),
                    ("LoadVideo", "file"), ("Load3D", "model_file"), ("Load3DAnimation", "model_file")}
#: Nodes that read ComfyUI's output folder: what other requests generated.
OUTPUT_READERS = ("LoadImageOutput",)


def upload_inputs(object_info: dict) -> set:
    """(class, input) pairs that take a file name a user could upload (ComfyUI marks them
    ``image_upload``, ``video_upload``, …): custom nodes' file inputs too."""
    found = set()
    for class_type, spec in object_info.items():
        inputs = spec.get("input", {}) if isinstance(spec, dict) else {}
        for section in ("required", "optional"):
            for name, entry in (inputs.get(section) or {}).items():
                options = entry[1] if isinstance(entry, list) and len(entry) > 1 else None
                if isinstance(options, dict) and any(k.endswith("_upload") and v for k, v in options.items()):
                    found.add((class_type, name))
    return found


def check_file_inputs(workflow: dict, file_inputs=CORE_FILE_INPUTS) -> None:
    """A custom workflow's file names stay in ComfyUI's input folder: no absolute path, no
    ``..``, no ``[output]`` / ``[temp]`` annotation (ComfyUI resolves them against other folders),
    no node that reads the output folder. Raises WorkflowError naming the node."""
    for nid, node in workflow.items():
        class_type = node["class_type"]
        if class_type in OUTPUT_READERS:
            raise WorkflowError(f"custom_workflow node {nid!r} ({class_type}) reads ComfyUI's output folder, "
                                "which holds every request's images; the service does not run it")
        for name, value in node["inputs"].items():
            if (class_type, name) in file_inputs and isinstance(value, str) and not _input_folder_name(value):
                raise WorkflowError(f"custom_workflow node {nid!r} ({class_type}) input {name!r} is {value[:200]!r}: "
                                    "a file name must be inside ComfyUI's input folder (no absolute path, no "
                                    "'..', no [output] or [temp])")


def _input_folder_name(value: str) -> bool:
    """True if ComfyUI resolves ``value`` inside its input folder (folder_paths.annotated_filepath)."""
    if value.endswith(" [input]"):
        value = value[:-len(" [input]")]
    elif value.endswith(("[output]", "[temp]")):
        return False
    parts = value.replace("\\", "/").split("/")
    return bool(value) and "\x00" not in value and not value.startswith("/") and ":" not in parts[0] \
        and ".." not in parts


def normalise_custom_workflow(raw, *, output_classes=("SaveImage", "PreviewImage")) -> dict:
    """A user's API-format workflow (bare, or {"prompt": {...}}), checked for what we need.

    Raises WorkflowError with a message that says how to fix it; UI-format files (ComfyUI's
    editor save, with "nodes" and "links") are recognised and explained.
    """
    if isinstance(raw, dict) and isinstance(raw.get("prompt"), dict):
        raw = raw["prompt"]
    if not isinstance(raw, dict) or not raw:
        raise WorkflowError("custom_workflow must be a ComfyUI API-format workflow: a JSON object of nodes")
    if isinstance(raw.get("nodes"), list) and "links" in raw:
        raise WorkflowError("custom_workflow is in ComfyUI's UI format (the editor's 'Save'). Export it in "
                            "API format instead: in ComfyUI choose Workflow → Export (API) (older versions: "
                            "enable 'Dev mode options' in the settings, then 'Save (API Format)')")
    wf = {}
    for nid, node in raw.items():
        if not isinstance(node, dict) or not isinstance(node.get("class_type"), str) \
                or not isinstance(node.get("inputs", {}), dict):
            raise WorkflowError(f"custom_workflow node {nid!r} must be an object with a 'class_type' string "
                                "and an 'inputs' object")
        wf[str(nid)] = {"class_type": node["class_type"], "inputs": copy.deepcopy(node.get("inputs", {}))}
    if not nodes_of(wf, "LoadImage"):
        raise WorkflowError("custom_workflow has no LoadImage node to receive the input image")
    if not nodes_of(wf, *output_classes):
        raise WorkflowError(f"custom_workflow has no output node ({' or '.join(output_classes)})")
    if not nodes_of(wf, *SAMPLER_CLASSES):
        raise WorkflowError("custom_workflow has no KSampler or KSamplerAdvanced")
    check_file_inputs(wf)
    return wf
