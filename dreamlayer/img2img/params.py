"""Validation of generation parameters (pure: dict in, GenerationParams out, no I/O).

Both request forms (multipart ``params`` and the JSON body) go through ``parse_params``; the
values that depend on the ComfyUI server (checkpoints, samplers, schedulers) are checked by
``resolve_choices`` against its object_info.
"""
from __future__ import annotations

import dataclasses
import json
import math
import secrets
from dataclasses import dataclass, field, replace
from typing import Any, Mapping, Optional

from dreamlayer.errors import InvalidParameter
from dreamlayer.img2img import advanced_params
from dreamlayer.img2img.advanced_params import Advanced
from dreamlayer.img2img.workflow import UNION_TYPES, WorkflowError, normalise_custom_workflow

MAX_SEED = 2**64 - 1  # KSampler's own maximum
MAX_PROMPT_CHARS = 20_000
#: Deepest nesting of lists/objects accepted in a parameter value (a custom workflow needs ~4).
#: Deeper values are refused up front, so nothing downstream recurses into them.
MAX_NESTING = 64

#: AUTOMATIC1111 sampler labels (as DreamLayer's frontend shows them), and the frontend's ids for
#: them, mapped to ComfyUI's (sampler_name, scheduler). None keeps the requested scheduler.
A1111_SAMPLERS = {
    "euler a": ("euler_ancestral", None),
    "euler": ("euler", None),
    "lms": ("lms", None),
    "heun": ("heun", None),
    "dpm2": ("dpm_2", None),
    "dpm2 a": ("dpm_2_ancestral", None),
    "dpm++ 2s a": ("dpmpp_2s_ancestral", None),
    "dpm++ 2m": ("dpmpp_2m", None),
    "dpm++ sde": ("dpmpp_sde", None),
    "dpm++ 2m sde": ("dpmpp_2m_sde", None),
    "dpm++ 3m sde": ("dpmpp_3m_sde", None),
    "dpm fast": ("dpm_fast", None),
    "dpm adaptive": ("dpm_adaptive", None),
    "ddim": ("ddim", None),
    "unipc": ("uni_pc", None),
    "lcm": ("lcm", None),
    # DreamLayer frontend ids (RenderSettings.tsx)
    "dpm 2s a": ("dpmpp_2s_ancestral", None),
    "dpm 2m": ("dpmpp_2m", None),
    "dpm sde": ("dpmpp_sde", None),
}
SCHEDULER_SUFFIXES = {"karras": "karras", "exponential": "exponential", "sgm uniform": "sgm_uniform"}
#: AUTOMATIC1111's "Schedule type" labels whose ComfyUI scheduler has another name ("Automatic":
#: the sampler's own, as no scheduler given); the others are ComfyUI's names written as labels
#: ("Karras", "SGM Uniform", "KL Optimal").
A1111_SCHEDULERS = {"automatic": "", "uniform": "normal", "ddim": "ddim_uniform"}

#: Keys that carry the images in the JSON form; handled by the request parser, not here.
IMAGE_KEYS = {"input_image", "mask_image", "mask"}


@dataclass(frozen=True)
class GenerationParams:
    prompt: str
    negative_prompt: str = ""
    denoising_strength: float = 0.75
    steps: int = 20
    cfg_scale: float = 7.0
    seed: int = 0
    random_seed: bool = False
    batch_size: int = 1
    batch_count: int = 1
    sampler_name: str = "euler"
    scheduler: str = "normal"
    model_name: str = ""
    width: Optional[int] = None
    height: Optional[int] = None
    grow_mask_by: int = 6
    clip_skip: int = 1
    inpaint_mode: str = "fill"
    mask_blur: int = 4
    mask_invert: bool = False
    paste_back: bool = True
    inpaint_area: str = "whole"
    inpaint_padding: int = 32
    #: Soft inpainting: grey mask levels are per-pixel strengths (DifferentialDiffusion).
    soft_inpainting: bool = False
    #: Pixels to grow (negative: shrink) the inpainted area by, in the service.
    mask_grow: int = 0
    #: Binarise the mask at this keep level (0-255); None = grey levels stay partial.
    mask_threshold: Optional[int] = None
    #: Outpainting: mask_shaping.Outpaint, or None.
    outpaint: Optional[object] = None
    #: LoRAs to chain: dicts with lora_name, strength_model, strength_clip.
    loras: tuple = ()
    #: ControlNet units: dicts with model, input_image (str or None), preprocessor, low, high,
    #: union_type, strength, start, end.
    controlnet_units: tuple = ()
    #: A user's API-format workflow (normalised), or None for the core template.
    custom_workflow: Optional[dict] = None
    #: Hires fix, refiner, tiled VAE, VAE override, face restoration, resize mode.
    advanced: Advanced = field(default_factory=Advanced)
    warnings: tuple = field(default_factory=tuple)

    def seeds(self) -> list:
        """One seed per run of the batch: seed, seed + 1, ... wrapping from KSampler's maximum
        to 1, not 0: every seed answered can be sent again (0 asks for a random one)."""
        return [(self.seed - 1 + i) % MAX_SEED + 1 for i in range(self.batch_count)]


#: ComfyUI's MAX_RESOLUTION: the most ImagePadForOutpaint adds on a side (MAX_OUTPAINT_PX, the
#: service's own limit, is lower by default).
COMFY_MAX_RESOLUTION = 16384


def _number(data, key, *, integer, lo, hi, default, limit_name=""):
    """A number in [lo, hi]; ``limit_name`` names the setting that ``hi`` comes from."""
    value = data.get(key)
    if value is None:
        return default
    kind = "an integer" if integer else "a number"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidParameter(key, f"'{key}' must be {kind} between {lo} and {hi}; got {_show(value)}")
    if isinstance(value, float) and not math.isfinite(value):
        raise InvalidParameter(key, f"'{key}' must be a finite number between {lo} and {hi}; got {value}")
    if integer:
        if isinstance(value, float):
            if not value.is_integer():
                raise InvalidParameter(key, f"'{key}' must be an integer between {lo} and {hi}; got {value}")
            value = int(value)
    else:
        value = float(value)
    if not lo <= value <= hi:
        setting = f" ({limit_name})" if limit_name else ""
        raise InvalidParameter(key, f"'{key}' must be between {lo} and {hi}{setting}; got {_show(value)}",
                               minimum=lo, maximum=hi)
    return value


def _string(data, key, *, default, max_len=MAX_PROMPT_CHARS, required=False):
    value = data.get(key)
    if value is None:
        if required:
            raise InvalidParameter(key, f"'{key}' is required (a string)", code="missing_parameter")
        return default
    if not isinstance(value, str):
        raise InvalidParameter(key, f"'{key}' must be a string; got {_show(value)}")
    if "\x00" in value:
        raise InvalidParameter(key, f"'{key}' must not contain NUL characters")
    if len(value) > max_len:
        raise InvalidParameter(key, f"'{key}' is {len(value)} characters long; the limit is {max_len}",
                               maximum=max_len)
    return value


def _bool(data, key, default=False):
    value = data.get(key)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise InvalidParameter(key, f"'{key}' must be true or false; got {_show(value)}")
    return value


def _too_deep(value, limit: int = MAX_NESTING) -> bool:
    """True when ``value`` nests lists/objects more than ``limit`` levels deep (iterative)."""
    stack = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, (dict, list)):
            if depth >= limit:
                return True
            stack.extend((v, depth + 1) for v in (item.values() if isinstance(item, dict) else item))
    return False


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:60] + "…"


def _choice(data, key, options: dict, default: str) -> str:
    """One of ``options`` (accepting the aliases it maps), case- and separator-insensitive."""
    value = data.get(key)
    if value is None:
        return default
    if isinstance(value, str):
        found = options.get(_norm_label(value))
        if found:
            return found
    valid = sorted(set(options.values()))
    raise InvalidParameter(key, f"'{key}' must be one of {', '.join(valid)}; got {_show(value)}", allowed=valid)


INPAINT_MODES = {"fill": "fill", "original": "original"}
INPAINT_AREAS = {"whole": "whole", "whole picture": "whole", "only masked": "only_masked"}


def _dimension(data, key):
    value = _number(data, key, integer=True, lo=64, hi=2048, default=None)
    return value


def parse_params(data: Mapping, *, rng=secrets.SystemRandom(),
                 max_outpaint_px: int = COMFY_MAX_RESOLUTION) -> GenerationParams:
    """Validate ``data`` (the request's parameters) into GenerationParams.

    Wrong types and out-of-range values raise InvalidParameter naming the field and the range.
    ``null`` means "not set". Unknown and not-yet-implemented keys only add warnings.
    ``max_outpaint_px`` is the service's MAX_OUTPAINT_PX (capped at ComfyUI's own limit).
    """
    if not isinstance(data, Mapping):
        raise InvalidParameter("params", "The parameters must be a JSON object", code="invalid_params")
    for key, value in data.items():
        if _too_deep(value):
            name = str(key)[:100]
            raise InvalidParameter(name, f"'{name}' is nested more than {MAX_NESTING} levels deep")
    warnings = []
    prompt = _string(data, "prompt", default="", required=True)
    negative = _string(data, "negative_prompt", default="")
    denoise = _number(data, "denoising_strength", integer=False, lo=0.0, hi=1.0, default=0.75)
    steps = _number(data, "steps", integer=True, lo=1, hi=150, default=20)
    cfg = _number(data, "cfg_scale", integer=False, lo=1.0, hi=20.0, default=7.0)
    batch_size = _number(data, "batch_size", integer=True, lo=1, hi=8, default=1)
    batch_count = _number(data, "batch_count", integer=True, lo=1, hi=8, default=1)
    grow = _number(data, "grow_mask_by", integer=True, lo=0, hi=64, default=6)
    clip_skip = _number(data, "clip_skip", integer=True, lo=1, hi=12, default=1)
    width = _dimension(data, "width")
    height = _dimension(data, "height")
    random_seed = _bool(data, "random_seed")
    inpaint = dict(
        inpaint_mode=_choice(data, "inpaint_mode", INPAINT_MODES, "fill"),
        mask_blur=_number(data, "mask_blur", integer=True, lo=0, hi=64, default=4),
        mask_invert=_bool(data, "mask_invert"),
        paste_back=_bool(data, "paste_back", True),
        inpaint_area=_choice(data, "inpaint_area", INPAINT_AREAS, "whole"),
        inpaint_padding=_number(data, "inpaint_padding", integer=True, lo=0, hi=1024, default=32),
        soft_inpainting=_bool(data, "soft_inpainting"),
        mask_grow=_number(data, "mask_grow", integer=True, lo=-64, hi=64, default=0),
        mask_threshold=_number(data, "mask_threshold", integer=True, lo=1, hi=255, default=None),
        outpaint=_outpaint(data, warnings, max_outpaint_px),
    )
    if inpaint["soft_inpainting"] and inpaint["mask_threshold"] is not None:
        raise InvalidParameter("mask_threshold", "'mask_threshold' makes the mask black and white, which "
                               "'soft_inpainting' exists to avoid: send one or the other",
                               code="unsupported_combination")
    seed = data.get("seed")
    if seed is not None:
        if isinstance(seed, bool) or not isinstance(seed, (int, float)) or (
                isinstance(seed, float) and not (math.isfinite(seed) and seed.is_integer())):
            raise InvalidParameter("seed", f"'seed' must be an integer (0 or less = random) up to {MAX_SEED}; "
                                           f"got {_show(seed)}")
        seed = int(seed)
        if seed > MAX_SEED:
            raise InvalidParameter("seed", f"'seed' must be at most {MAX_SEED}; got {seed}", maximum=MAX_SEED)
    if random_seed or seed is None or seed <= 0:
        seed = rng.randint(1, 2**31 - 1)
        random_seed = True
    model = _string(data, "model_name", default="", max_len=1024)
    sampler = _string(data, "sampler_name", default="euler", max_len=200)
    scheduler = _string(data, "scheduler", default="", max_len=200)
    if _bool(data, "karras_sigmas") and not scheduler:
        scheduler = "karras"
    extras = dict(loras=parse_loras(data.get("lora")), controlnet_units=parse_controlnet(data.get("controlnet")),
                  custom_workflow=parse_custom_workflow(data.get("custom_workflow")))
    extras["advanced"] = adv = advanced_params.parse_advanced(data, number=_number, string=_string, boolean=_bool,
                                                              show=_show)
    denoise = _schedulable(denoise, steps, "denoising_strength", warnings)
    if adv.hires is not None:
        hires = dataclasses.replace(adv.hires, denoise=_schedulable(adv.hires.denoise, adv.hires.steps,
                                                                      "hires_fix_denoising_strength", warnings))
        extras["advanced"] = dataclasses.replace(adv, hires=hires)
    for key in data:
        if key not in _KNOWN_KEYS and key not in advanced_params.KEYS and key not in IMAGE_KEYS:
            warnings.append(f"Unknown parameter '{key}' was ignored")
    return GenerationParams(
        prompt=prompt, negative_prompt=negative, denoising_strength=denoise, steps=steps, cfg_scale=cfg,
        seed=seed, random_seed=random_seed, batch_size=batch_size, batch_count=batch_count,
        sampler_name=sampler, scheduler=scheduler, model_name=model, width=width, height=height,
        grow_mask_by=grow, clip_skip=clip_skip, warnings=tuple(warnings), **inpaint, **extras,
    )


#: The most steps a sampling schedule may have: KSamplerAdvanced's own maximum (the refiner's
#: passes), and what keeps ComfyUI's KSampler, which builds an int(steps / denoise)-step schedule,
#: from allocating without bound (denoise 1e-12: 4 TB, found on a real ComfyUI 0.3.40).
MAX_SCHEDULE_STEPS = 10_000


def _schedulable(denoise: float, steps: int, field: str, warnings: list) -> float:
    """``denoise``, raised to steps / MAX_SCHEDULE_STEPS when it is above 0 and below that (a
    change nobody can see in the image: the sampling starts at a noise level near zero either way)."""
    floor = steps / MAX_SCHEDULE_STEPS
    if 0.0 < denoise < floor:
        warnings.append(f"{field} {denoise:g} was raised to {floor:g}: with {steps} steps, ComfyUI's schedule "
                        f"(steps / {field}) may have at most {MAX_SCHEDULE_STEPS} steps")
        return floor
    return denoise


_KNOWN_KEYS = {
    "prompt", "negative_prompt", "denoising_strength", "steps", "cfg_scale", "batch_size", "batch_count",
    "grow_mask_by", "clip_skip", "width", "height", "random_seed", "seed", "model_name", "sampler_name",
    "scheduler", "karras_sigmas", "async", "lora", "controlnet", "custom_workflow", "inpaint_mode", "mask_blur", "mask_invert", "paste_back", "inpaint_area",
    "inpaint_padding", "soft_inpainting", "mask_grow", "mask_threshold", "outpaint",
}

OUTPAINT_SIDES = ("left", "top", "right", "bottom")
def _outpaint(data, warnings, max_px):
    """``outpaint``: {left, top, right, bottom, feathering} in pixels; sides rounded up to
    multiples of 8. null, {} or all sides 0 = none."""
    from dreamlayer.img2img.mask_shaping import OUTPAINT_MULTIPLE, Outpaint
    limit_name = "MAX_OUTPAINT_PX" if max_px <= COMFY_MAX_RESOLUTION else "ComfyUI's largest size"
    max_px = min(max_px, COMFY_MAX_RESOLUTION)
    max_px -= max_px % OUTPAINT_MULTIPLE  # so that a side within it stays within it once rounded up
    value = data.get("outpaint")
    if value is None or value is False or value == {}:
        return None
    if not isinstance(value, Mapping):
        raise InvalidParameter("outpaint", "'outpaint' must be an object {left, top, right, bottom, feathering} "
                               f"in pixels; got {_show(value)}")
    unknown = sorted(set(map(str, value)) - set(OUTPAINT_SIDES) - {"feathering"})
    if unknown:
        raise InvalidParameter("outpaint", f"'outpaint' has unknown keys {unknown}; it takes left, top, right, "
                               "bottom and feathering")
    named = _named(value, "outpaint")
    sides = {}
    for side in OUTPAINT_SIDES:
        px = _number(named, f"outpaint.{side}", integer=True, lo=0, hi=max_px, default=0,
                     limit_name=limit_name)
        rounded = -(-px // OUTPAINT_MULTIPLE) * OUTPAINT_MULTIPLE
        if rounded != px:
            warnings.append(f"outpaint.{side} {px} was rounded up to {rounded} (a multiple of {OUTPAINT_MULTIPLE})")
        sides[side] = rounded
    feathering = _number(named, "outpaint.feathering", integer=True, lo=0, hi=COMFY_MAX_RESOLUTION,
                         default=0)
    out = Outpaint(**sides, feathering=feathering)
    return out if out.any else None


#: The most LoRAs and ControlNet units a request may list (the DreamLayer page offers up to 10
#: units): each becomes nodes in the workflow, so a list from the network is bounded.
MAX_LORAS = 16
MAX_CONTROLNET_UNITS = 10


def _enabled_items(value, key, limit):
    """A feature object (or a list of at most ``limit``) -> the enabled ones; null/false/{} = none."""
    if value is None or value is False or value == {} or value == []:
        return []
    items = value if isinstance(value, list) else [value]
    if len(items) > limit:
        raise InvalidParameter(key, f"'{key}' lists {len(items)} items; at most {limit} are accepted",
                               maximum=limit)
    out = []
    for i, item in enumerate(items):
        where = f"{key}[{i}]" if isinstance(value, list) else key
        if not isinstance(item, Mapping):
            raise InvalidParameter(where, f"'{where}' must be an object; got {_show(item)}")
        enabled = item.get("enabled", True)
        if not isinstance(enabled, bool):
            raise InvalidParameter(f"{where}.enabled", f"'{where}.enabled' must be true or false")
        if enabled:
            out.append((where, item))
    return out


def parse_loras(value) -> tuple:
    loras = []
    for where, item in _enabled_items(value, "lora", MAX_LORAS):
        item = _named(item, where)
        name = _string(item, f"{where}.lora_name", default="", max_len=1024)
        if not name:
            raise InvalidParameter(f"{where}.lora_name", f"'{where}.lora_name' is required when the LoRA is enabled",
                                   code="missing_parameter")
        loras.append({"lora_name": name,
                      "strength_model": _number(item, f"{where}.strength_model", integer=False, lo=-100.0,
                                                hi=100.0, default=1.0),
                      "strength_clip": _number(item, f"{where}.strength_clip", integer=False, lo=-100.0,
                                               hi=100.0, default=1.0)})
    return tuple(loras)


#: ControlNet preprocessors that core ComfyUI nodes implement.
PREPROCESSORS = {"none": "none", "": "none", "canny": "canny"}


def parse_controlnet(value) -> tuple:
    if value is None or value is False:
        return ()
    if not isinstance(value, Mapping):
        raise InvalidParameter("controlnet", "'controlnet' must be an object {\"enabled\", \"units\": [...]}")
    if value.get("enabled", True) is False:
        return ()
    units_value = value.get("units") or []
    if not isinstance(units_value, list):
        raise InvalidParameter("controlnet.units", "'controlnet.units' must be a list")
    units = []
    for where, unit in _enabled_items(units_value, "controlnet.units", MAX_CONTROLNET_UNITS):
        unit = _named(unit, where)
        model = _string(unit, f"{where}.model", default="", max_len=1024)
        if not model:
            raise InvalidParameter(f"{where}.model", f"'{where}.model' (a ControlNet file) is required",
                                   code="missing_parameter")
        pre = unit.get(f"{where}.preprocessor")
        pre_key = _norm_label(pre) if isinstance(pre, str) else ("none" if pre is None else None)
        if pre_key not in PREPROCESSORS:
            raise InvalidParameter(f"{where}.preprocessor", f"Preprocessor {_show(pre)} is not supported; "
                                   f"supported: none, canny (core ComfyUI nodes)", code="unsupported_preprocessor",
                                   allowed=["none", "canny"])
        low, high = (_threshold(unit, f"{where}.{k}", d) for k, d in (("threshold_a", 0.4), ("threshold_b", 0.8)))
        low, high = sorted((low, high))  # the page's two sliders cross freely; OpenCV (A1111) swaps them too
        start = _number(unit, f"{where}.guidance_start", integer=False, lo=0.0, hi=1.0, default=0.0)
        end = _number(unit, f"{where}.guidance_end", integer=False, lo=0.0, hi=1.0, default=1.0)
        if start > end:
            raise InvalidParameter(f"{where}.guidance_start", f"'{where}.guidance_start' must not exceed guidance_end")
        image = unit.get(f"{where}.input_image")
        if image is not None and not isinstance(image, str):
            raise InvalidParameter(f"{where}.input_image", f"'{where}.input_image' must be base64 or a data URL")
        control_type = _string(unit, f"{where}.control_type", default="", max_len=200)
        union = bool(unit.get(f"{where}.union")) or "union" in model.lower()
        units.append({"model": model, "input_image": image or None, "preprocessor": PREPROCESSORS[pre_key],
                      "low": low, "high": high, "strength": _number(unit, f"{where}.weight", integer=False, lo=0.0,
                                                                     hi=2.0, default=1.0),
                      "start": start, "end": end,
                      "union_type": _union_type(control_type) if union else None, "where": where})
    return tuple(units)


def _named(item: Mapping, where: str) -> dict:
    """``item``'s keys as the fields errors name (``lora[1].strength_model``)."""
    return {f"{where}.{key}": value for key, value in item.items()}


def _threshold(unit, key, default):
    """Canny thresholds: ComfyUI's 0.01-0.99, or AUTOMATIC1111's 1-255 (scaled)."""
    value = _number(unit, key, integer=False, lo=0.0, hi=255.0, default=None)
    if value is None:
        return default
    value = value / 255.0 if value > 1.0 else value
    return round(min(0.99, max(0.01, value)), 3)


def _union_type(control_type: str) -> str:
    return UNION_TYPES.get(_norm_label(control_type), "auto")


def parse_custom_workflow(value):
    if value is None or value is False or value == "" or value == {}:
        return None
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except (ValueError, RecursionError):
            raise InvalidParameter("custom_workflow", "'custom_workflow' is a string that is not JSON",
                                   code="invalid_custom_workflow") from None
        if _too_deep(value):
            raise InvalidParameter("custom_workflow", f"'custom_workflow' is nested more than {MAX_NESTING} "
                                   "levels deep", code="invalid_custom_workflow")
    try:
        return normalise_custom_workflow(value)
    except WorkflowError as exc:
        raise InvalidParameter("custom_workflow", str(exc), code="invalid_custom_workflow") from None


def _norm_label(text: str) -> str:
    return " ".join(text.replace("-", " ").replace("_", " ").lower().split())


def map_sampler(name: str, comfy_samplers) -> tuple:
    """(ComfyUI sampler_name, scheduler or None) for a ComfyUI name or an AUTOMATIC1111 label."""
    if name in comfy_samplers:
        return name, None
    label = _norm_label(name)
    scheduler = None
    for suffix, sched in SCHEDULER_SUFFIXES.items():
        if label.endswith(" " + suffix):
            label, scheduler = label[: -len(suffix) - 1], sched
            break
    mapped = A1111_SAMPLERS.get(label)
    if mapped is None:
        return None, None
    return mapped[0], scheduler or mapped[1]


def map_scheduler(name: str, comfy_schedulers) -> str:
    """ComfyUI's scheduler for a ComfyUI name or an AUTOMATIC1111 label ("" for "Automatic");
    anything else as it is (then refused, listing ComfyUI's)."""
    if name in comfy_schedulers:
        return name
    key = _norm_label(name)
    if key in A1111_SCHEDULERS:
        return A1111_SCHEDULERS[key]
    snake = key.replace(" ", "_")
    return snake if snake in comfy_schedulers else name


def resolve_choices(params: GenerationParams, *, checkpoints, samplers, schedulers, default_model="",
                    loras=None, controlnets=None):
    """Check model, sampler, scheduler, LoRA and ControlNet files against the server's lists."""
    for i, lora in enumerate(params.loras):
        if loras is not None and lora["lora_name"] not in loras:
            raise InvalidParameter("lora", f"Unknown LoRA '{lora['lora_name']}'. Installed LoRAs: "
                                           f"{', '.join(loras) or '(none)'}", code="unknown_lora", allowed=list(loras))
    for unit in params.controlnet_units:
        if controlnets is not None and unit["model"] not in controlnets:
            raise InvalidParameter(unit["where"] + ".model", f"Unknown ControlNet model '{unit['model']}'. Installed: "
                                   f"{', '.join(controlnets) or '(none)'}", code="unknown_controlnet",
                                   allowed=list(controlnets))
    model = params.model_name or default_model or (checkpoints[0] if checkpoints else "")
    if not model:
        raise InvalidParameter("model_name", "ComfyUI has no checkpoint installed; put one in its "
                                             "models/checkpoints folder", code="no_models_installed")
    if model not in checkpoints:
        raise InvalidParameter("model_name", f"Unknown model '{model}'. Installed checkpoints: "
                                             f"{', '.join(checkpoints) or '(none)'}",
                               code="unknown_model", allowed=list(checkpoints))
    sampler, label_scheduler = map_sampler(params.sampler_name, samplers)
    if sampler is None or sampler not in samplers:
        raise InvalidParameter("sampler_name", f"Unknown sampler '{params.sampler_name}'. Valid: "
                                               f"{', '.join(samplers)}",
                               code="unknown_sampler", allowed=list(samplers))
    scheduler = label_scheduler or map_scheduler(params.scheduler, schedulers) or "normal"
    if scheduler not in schedulers:
        raise InvalidParameter("scheduler", f"Unknown scheduler '{scheduler}'. Valid: {', '.join(schedulers)}",
                               code="unknown_scheduler", allowed=list(schedulers))
    return replace(params, model_name=model, sampler_name=sampler, scheduler=scheduler)
