"""The Img2Img tab's advanced settings: hires fix, refiner, tiled VAE, VAE override, face
restoration and resize mode (pure: the request's dict in, small frozen objects out).

Keys and defaults are those DreamLayer's frontend sends (``generationSettings.ts``); the meaning
is AUTOMATIC1111's, whose controls the page copies (docs/api.md, "Advanced settings"). Names that
depend on ComfyUI (upscaler, refiner checkpoint, VAE, face model) are checked later, against its
``/object_info``, by ``resolve_advanced``.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Mapping, Optional

from dreamlayer.errors import InvalidParameter

#: VAEEncodeTiled / VAEDecodeTiled ranges in ComfyUI 0.3.40's object_info (the encoder's
#: tile_size steps by 64, the decoder's by 32: one tile size that suits both is a multiple of 64).
TILE_SIZE_RANGE = (64, 4096)
TILE_OVERLAP_RANGE = (0, 4096)

#: Built-in hires upscalers (the page's ids and A1111's labels, lower-cased) -> (kind, ComfyUI method).
#: "latent" methods run LatentUpscale on the first pass's latent; "pixel" ones ImageScale.
BUILTIN_UPSCALERS = {
    "latent": ("latent", "bilinear"),
    "latent (bilinear)": ("latent", "bilinear"),
    "latent (antialiased)": ("latent", "bilinear"),
    "latent (bicubic)": ("latent", "bicubic"),
    "latent (bicubic antialiased)": ("latent", "bicubic"),
    "latent (nearest)": ("latent", "nearest-exact"),
    "latent (nearest-exact)": ("latent", "nearest-exact"),
    "latent (area)": ("latent", "area"),
    "latent (bislerp)": ("latent", "bislerp"),
    "none": ("pixel", "lanczos"),
    "lanczos": ("pixel", "lanczos"),
    "nearest": ("pixel", "nearest-exact"),
    "bicubic": ("pixel", "bicubic"),
}
#: The page's ids for the built-ins ("latent-bicubic-antialiased") map onto the labels above.
_PAGE_IDS = {"latent-" + m.replace(" ", "-"): f"latent ({m})" for m in (
    "bilinear", "antialiased", "bicubic", "bicubic antialiased", "nearest", "nearest-exact", "area", "bislerp")}
#: Built-ins that ComfyUI can only approximate (it has no antialiased latent upscale): said in warnings.
APPROXIMATED = {"latent (antialiased)": "bilinear without antialiasing",
                "latent (bicubic antialiased)": "bicubic without antialiasing",
                "latent (nearest)": "nearest-exact"}
#: What the drop-down offers besides the installed upscale models (/api/upscaler-models on :5002).
BUILTIN_UPSCALER_LABELS = ("Latent", "Latent (antialiased)", "Latent (bicubic)", "Latent (bicubic antialiased)",
                           "Latent (nearest)", "Latent (nearest-exact)", "Latent (area)", "Latent (bislerp)",
                           "None", "Lanczos", "Nearest", "Bicubic")

#: A1111's resize modes, by number and label.
RESIZE_MODES = {"0": 0, "just resize": 0, "just_resize": 0,
                "1": 1, "crop and resize": 1, "crop_and_resize": 1, "crop_resize": 1,
                "2": 2, "resize and fill": 2, "resize_and_fill": 2, "resize_fill": 2, "fill": 2,
                "3": 3, "just resize (latent upscale)": 3, "latent_upscale": 3}
RESIZE_MODE_LABELS = ("Just resize", "Crop and resize", "Resize and fill", "Just resize (latent upscale)")

FACE_MODELS = ("codeformer", "gfpgan")
#: The custom nodes face restoration needs (they are not part of ComfyUI) and where they come from.
FACE_RESTORE_NODES = ("FaceRestoreModelLoader", "FaceRestoreCFWithModel")
FACE_RESTORE_PACKAGE = "facerestore_cf (https://github.com/mav-rik/facerestore_cf)"

#: Values of the page's "off" selections for the refiner model and VAE.
NONE_NAMES = {"", "none", "automatic", "auto", "default"}


@dataclass(frozen=True)
class HiresFix:
    """A1111's hires fix: a second pass over the first one's result, upscaled."""
    method: str                 # "upscale-by" | "resize-to"
    factor: float               # upscale-by
    resize_width: int           # resize-to
    resize_height: int
    upscaler: str               # as requested; resolved by resolve_advanced
    steps: int
    denoise: float


@dataclass(frozen=True)
class Refiner:
    model: str
    switch_at: float            # fraction of the sampling steps the base model runs


@dataclass(frozen=True)
class Tiling:
    tile_size: int
    overlap: int


@dataclass(frozen=True)
class FaceRestore:
    model: str                  # "codeformer" | "gfpgan"
    fidelity: float             # codeformer_weight (0 = strongest restoration, 1 = most faithful)
    weight: float               # gfpgan_weight: how much of the restored face is blended in


@dataclass(frozen=True)
class Advanced:
    hires: Optional[HiresFix] = None
    refiner: Optional[Refiner] = None
    tiling: Optional[Tiling] = None
    vae_name: Optional[str] = None
    face_restore: Optional[FaceRestore] = None
    resize_mode: int = 0


#: Every key this module reads (params.parse_params warns about keys nobody reads).
KEYS = frozenset({
    "tiling", "tile_size", "tile_overlap", "hires_fix", "hires_fix_enabled", "hires_fix_upscale_method",
    "hires_fix_upscale_factor", "hires_fix_hires_steps", "hires_fix_denoising_strength",
    "hires_fix_resize_width", "hires_fix_resize_height", "hires_fix_upscaler", "restore_faces",
    "face_restoration_model", "codeformer_weight", "gfpgan_weight", "refiner_enabled", "refiner_model",
    "refiner_switch_at", "vae_name", "resize_mode",
})


def parse_advanced(data: Mapping, *, number, string, boolean, show) -> Advanced:
    """The advanced settings of ``data``. ``number`` / ``string`` / ``boolean`` / ``show`` are
    params.py's validators, so every error reads the same. Every value is checked even when its
    feature is off (the page sends them all): a value out of range is an error either way."""
    method = string(data, "hires_fix_upscale_method", default="upscale-by", max_len=32).strip().lower()
    if method not in ("upscale-by", "resize-to"):
        raise InvalidParameter("hires_fix_upscale_method", "'hires_fix_upscale_method' must be 'upscale-by' "
                               f"or 'resize-to'; got {show(method)}", allowed=["upscale-by", "resize-to"])
    hires = HiresFix(
        method=method,
        factor=number(data, "hires_fix_upscale_factor", integer=False, lo=1.0, hi=10.0, default=2.5),
        resize_width=number(data, "hires_fix_resize_width", integer=True, lo=64, hi=8192, default=4000),
        resize_height=number(data, "hires_fix_resize_height", integer=True, lo=64, hi=8192, default=4000),
        upscaler=string(data, "hires_fix_upscaler", default="4x-ultrasharp", max_len=1024).strip() or "none",
        steps=number(data, "hires_fix_hires_steps", integer=True, lo=1, hi=150, default=15),
        denoise=number(data, "hires_fix_denoising_strength", integer=False, lo=0.0, hi=1.0, default=0.5),
    )
    hires_on = boolean(data, "hires_fix") | boolean(data, "hires_fix_enabled")
    refiner_model = string(data, "refiner_model", default="", max_len=1024).strip()
    switch = number(data, "refiner_switch_at", integer=False, lo=0.0, hi=1.0, default=0.8)
    refiner = None
    if boolean(data, "refiner_enabled"):
        if refiner_model.lower() in NONE_NAMES:
            raise InvalidParameter("refiner_model", "'refiner_enabled' is true but no 'refiner_model' was "
                                   "chosen: name an installed checkpoint", code="unknown_refiner")
        if switch <= 0.0:
            raise InvalidParameter("refiner_switch_at", "'refiner_switch_at' must be above 0 and at most 1 "
                                   f"(the fraction of steps the base model runs); got {show(switch)}",
                                   minimum=0.0, maximum=1.0)
        refiner = Refiner(refiner_model, switch)
    tiling = Tiling(number(data, "tile_size", integer=True, lo=TILE_SIZE_RANGE[0], hi=TILE_SIZE_RANGE[1],
                           default=512),
                    number(data, "tile_overlap", integer=True, lo=TILE_OVERLAP_RANGE[0], hi=TILE_OVERLAP_RANGE[1],
                           default=64))
    tiling_on = boolean(data, "tiling")
    if tiling_on and tiling.overlap * 2 >= tiling.tile_size:
        # ComfyUI's tiled encoder also runs with tiles of half the size, and divides by
        # (tile_size / 2 - overlap): a larger overlap fails there with ZeroDivisionError
        raise InvalidParameter("tile_overlap", f"'tile_overlap' ({tiling.overlap}) must be less than half of "
                               f"'tile_size' ({tiling.tile_size}): ComfyUI's tiled VAE encoder also uses "
                               "half-size tiles", maximum=(tiling.tile_size - 1) // 2)
    vae = string(data, "vae_name", default="", max_len=1024).strip()
    face_model = string(data, "face_restoration_model", default="codeformer", max_len=64).strip().lower()
    if face_model not in FACE_MODELS:
        raise InvalidParameter("face_restoration_model", "'face_restoration_model' must be one of "
                               f"{', '.join(FACE_MODELS)}; got {show(face_model)}", allowed=list(FACE_MODELS))
    face = FaceRestore(face_model, number(data, "codeformer_weight", integer=False, lo=0.0, hi=1.0, default=0.5),
                       number(data, "gfpgan_weight", integer=False, lo=0.0, hi=1.0, default=0.5))
    return Advanced(hires=hires if hires_on else None, refiner=refiner, tiling=tiling if tiling_on else None,
                    vae_name=None if vae.lower() in NONE_NAMES else vae,
                    face_restore=face if boolean(data, "restore_faces") else None,
                    resize_mode=_resize_mode(data.get("resize_mode"), show))


def _resize_mode(value, show) -> int:
    if value is None:
        return 0
    if isinstance(value, int) and not isinstance(value, bool):
        value = str(value)
    found = RESIZE_MODES.get(value.strip().lower()) if isinstance(value, str) else None
    if found is None:
        raise InvalidParameter("resize_mode", "'resize_mode' must be 0-3 or one of "
                               f"{', '.join(RESIZE_MODE_LABELS)}; got {show(value)}",
                               allowed=list(RESIZE_MODE_LABELS))
    return found


# --- names ComfyUI knows ----------------------------------------------------------------------

def _stem_key(name: str) -> str:
    """A model file's name as the page spells ids: no folder, no extension, case- and
    separator-insensitive ("4x-ultrasharp" finds "4x-UltraSharp.pth", "esrgan-4x" "ESRGAN_4x.pth")."""
    stem = name.replace("\\", "/").rsplit("/", 1)[-1]
    stem = re.sub(r"\.(pth|pt|safetensors|ckpt|bin|onnx)$", "", stem, flags=re.I)
    return re.sub(r"[\s_\-+.()]+", "", stem.casefold())


def match_model(requested: str, installed) -> Optional[str]:
    """The installed file ``requested`` names: the exact name, else the one file whose stem
    matches (see _stem_key). None when nothing or more than one file matches."""
    installed = list(installed)
    if requested in installed:
        return requested
    key = _stem_key(requested)
    found = [name for name in installed if _stem_key(name) == key]
    return found[0] if len(found) == 1 else None


def builtin_upscaler_entries() -> list:
    """The built-in upscalers as the page's model lists show them ({"id", "name", "filename":
    None, "builtin": True}), in A1111's order; each id is one builtin_upscaler() accepts."""
    def page_id(label):
        return label.lower().replace(" (", "-").replace(")", "").replace(" ", "-")
    return [{"id": page_id(label), "name": label, "filename": None, "builtin": True}
            for label in BUILTIN_UPSCALER_LABELS]


def builtin_upscaler(name: str) -> Optional[tuple]:
    """(kind, method, label) of a built-in upscaler id or label, else None."""
    label = name.strip().lower()
    label = _PAGE_IDS.get(label, label)
    found = BUILTIN_UPSCALERS.get(label)
    return (*found, label) if found else None


@dataclass(frozen=True)
class Upscaler:
    """A resolved hires upscaler: an upscale model file, or a built-in latent / pixel method."""
    kind: str                   # "model" | "latent" | "pixel"
    name: str                   # the model file, or ComfyUI's upscale_method


def resolve_advanced(adv: Advanced, *, choices, checkpoints) -> tuple:
    """Check the names in ``adv`` against ComfyUI; returns (Advanced with the upscaler resolved
    to an ``Upscaler`` and names to installed files, warnings).

    ``choices(class_type, input_name)`` lists an input's options, or returns None when ComfyUI has
    no such node. Unknown names raise InvalidParameter listing what is installed.
    """
    warnings = []
    hires, refiner, vae, face = adv.hires, adv.refiner, adv.vae_name, adv.face_restore
    for feature, nodes in _core_nodes_needed(adv):
        missing = [node for node in nodes if choices(node, None) is None]
        if missing:
            raise InvalidParameter(feature, f"'{feature}' needs the ComfyUI node{'s' if len(missing) > 1 else ''} "
                                   f"{', '.join(missing)}, which this ComfyUI does not have (ComfyUI 0.3.40 has "
                                   "them: update ComfyUI)", code="node_missing", missing_nodes=missing)
    if hires is not None:
        models = choices("UpscaleModelLoader", "model_name") or []
        builtin = builtin_upscaler(hires.upscaler)
        found = match_model(hires.upscaler, models)
        if found is not None:
            if choices("ImageUpscaleWithModel", None) is None:
                raise InvalidParameter("hires_fix_upscaler", "Upscale models need the ComfyUI node "
                                       "ImageUpscaleWithModel, which this ComfyUI does not have",
                                       code="node_missing", missing_nodes=["ImageUpscaleWithModel"])
            upscaler = Upscaler("model", found)
        elif builtin is not None:
            upscaler = Upscaler(builtin[0], builtin[1])
            if builtin[2] in APPROXIMATED:
                warnings.append(f"hires_fix_upscaler '{hires.upscaler}': ComfyUI has no antialiased latent "
                                f"upscale, so {APPROXIMATED[builtin[2]]} was used")
        else:
            raise InvalidParameter("hires_fix_upscaler", f"Unknown upscaler '{hires.upscaler}'. Installed upscale "
                                   f"models: {', '.join(models) or '(none)'}; built-in: "
                                   f"{', '.join(BUILTIN_UPSCALER_LABELS)}", code="unknown_upscaler",
                                   allowed=list(models) + list(BUILTIN_UPSCALER_LABELS))
        hires = HiresFix(**{**hires.__dict__, "upscaler": upscaler})
    if refiner is not None:
        found = match_model(refiner.model, checkpoints)
        if found is None:
            raise InvalidParameter("refiner_model", f"Unknown refiner model '{refiner.model}'. Installed "
                                   f"checkpoints: {', '.join(checkpoints) or '(none)'}", code="unknown_refiner",
                                   allowed=list(checkpoints))
        refiner = Refiner(found, refiner.switch_at)
    if vae is not None:
        vaes = choices("VAELoader", "vae_name") or []
        found = match_model(vae, vaes)
        if found is None:
            raise InvalidParameter("vae_name", f"Unknown VAE '{vae}'. Installed VAEs: {', '.join(vaes) or '(none)'}"
                                   " (or 'None' for the checkpoint's own)", code="unknown_vae", allowed=list(vaes))
        vae = found
    if face is not None:
        missing = [node for node in FACE_RESTORE_NODES if choices(node, None) is None]
        if missing:
            raise InvalidParameter("restore_faces", f"Face restoration needs the ComfyUI custom nodes "
                                   f"{' and '.join(FACE_RESTORE_NODES)}, which this ComfyUI does not have: install "
                                   f"{FACE_RESTORE_PACKAGE} into its custom_nodes folder and restart it",
                                   code="custom_node_missing", missing_nodes=missing, package=FACE_RESTORE_PACKAGE)
        models = choices("FaceRestoreModelLoader", "model_name") or []
        found = [m for m in models if face.model in _stem_key(m)]
        if not found:
            raise InvalidParameter("face_restoration_model", f"No {face.model} model is installed for face "
                                   f"restoration (ComfyUI's facerestore_models folder has: "
                                   f"{', '.join(models) or '(none)'})", code="unknown_face_model",
                                   allowed=list(models))
        face = FaceRestore(found[0], face.fidelity, face.weight)
    return Advanced(hires=hires, refiner=refiner, tiling=adv.tiling, vae_name=vae, face_restore=face,
                    resize_mode=adv.resize_mode), warnings


def _core_nodes_needed(adv: Advanced) -> list:
    """(parameter, ComfyUI core nodes) for each advanced setting that is on."""
    needed = []
    if adv.hires is not None:
        needed.append(("hires_fix", ["KSampler", "LatentUpscale", "ImageScale", "VAEEncode", "VAEDecode"]))
    if adv.refiner is not None:
        needed.append(("refiner_enabled", ["KSamplerAdvanced", "CheckpointLoaderSimple", "CLIPTextEncode"]))
    if adv.tiling is not None:
        needed.append(("tiling", ["VAEEncodeTiled", "VAEDecodeTiled"]))
    if adv.vae_name is not None:
        needed.append(("vae_name", ["VAELoader"]))
    return needed
