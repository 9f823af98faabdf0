"""The node catalog: the captured /object_info, reduced to the node classes the service uses.

ComfyUI validates prompts against each class's INPUT_TYPES / RETURN_TYPES; the fake reads the
same information from this (live, per-instance) dict so that tests can change enum lists and see
validation follow, exactly as a real server would after a model file is added.
"""
from __future__ import annotations

import copy
import json
import mimetypes
import os
from pathlib import Path

FIXTURE_PATH = Path(__file__).with_name("object_info.json")

# Which object_info inputs list the files of each model folder (ComfyUI: folder_paths names).
MODEL_FOLDER_INPUTS = {
    "checkpoints": ("ckpt_name",),
    "loras": ("lora_name",),
    "controlnet": ("control_net_name",),
    "upscale_models": ("model_name",),
}

# GET /models as captured from 0.3.40 (folder_paths.folder_names_and_paths keys).
MODEL_FOLDERS = [
    "checkpoints", "configs", "loras", "vae", "text_encoders", "diffusion_models", "clip_vision",
    "style_models", "embeddings", "diffusers", "vae_approx", "controlnet", "gligen",
    "upscale_models", "custom_nodes", "hypernetworks", "photomaker", "classifiers",
]

_fixture_cache: dict | None = None


def load_fixture() -> dict:
    """Return a fresh deep copy of the committed object_info fixture (parsed once per process)."""
    global _fixture_cache
    if _fixture_cache is None:
        with open(FIXTURE_PATH, encoding="utf-8") as f:
            _fixture_cache = json.load(f)
    return copy.deepcopy(_fixture_cache)


def input_info(class_info: dict, name: str):
    """(input_type, category, extra_info) like comfy_execution.graph.get_input_info, or Nones."""
    inputs = class_info.get("input", {})
    for category in ("required", "optional", "hidden"):
        section = inputs.get(category) or {}
        if name in section:
            spec = section[name]
            if category == "hidden":
                return spec, category, {}
            extra = spec[1] if len(spec) > 1 else {}
            return spec[0], category, extra
    return None, None, None


def return_types(class_info: dict) -> tuple:
    """RETURN_TYPES as ComfyUI holds them: a tuple (so bad slot indexes fail the same way)."""
    return tuple(class_info.get("output", []))


def is_output_node(class_info: dict) -> bool:
    return class_info.get("output_node") is True


def list_input_files(input_dir: Path, images_only: bool) -> list[str]:
    """Files directly in input/ as LoadImage (images only) / LoadImageMask (all) list them."""
    try:
        names = [f for f in os.listdir(input_dir) if os.path.isfile(os.path.join(input_dir, f))]
    except FileNotFoundError:
        return []
    if images_only:
        kept = []
        for name in names:
            mime, _ = mimetypes.guess_type(name, strict=False)
            if mime and mime.split("/")[0] == "image":
                kept.append(name)
        names = kept
    return sorted(names)


def refresh_input_lists(object_info: dict, input_dir: Path) -> None:
    """Rebuild LoadImage / LoadImageMask `image` enums from input/, as their INPUT_TYPES does."""
    for class_type, images_only in (("LoadImage", True), ("LoadImageMask", False)):
        info = object_info.get(class_type)
        if not info:
            continue
        spec = info.get("input", {}).get("required", {}).get("image")
        if spec and isinstance(spec[0], list):
            spec[0] = list_input_files(input_dir, images_only)


def add_model(object_info: dict, folder: str, filename: str) -> None:
    """Add a model file name to every enum input that lists that folder (kept sorted)."""
    names = MODEL_FOLDER_INPUTS.get(folder)
    if names is None:
        raise ValueError(f"unknown model folder {folder!r}; expected one of {sorted(MODEL_FOLDER_INPUTS)}")
    for info in object_info.values():
        for category in ("required", "optional"):
            for input_name, spec in (info.get("input", {}).get(category) or {}).items():
                if input_name in names and isinstance(spec[0], list) and filename not in spec[0]:
                    spec[0].append(filename)
                    spec[0].sort()


def model_files(object_info: dict, folder: str) -> list[str]:
    """GET /models/{folder}: the files the fake pretends the folder holds."""
    names = MODEL_FOLDER_INPUTS.get(folder, ())
    found: set[str] = set()
    for info in object_info.values():
        for category in ("required", "optional"):
            for input_name, spec in (info.get("input", {}).get(category) or {}).items():
                if input_name in names and isinstance(spec[0], list):
                    found.update(spec[0])
    return sorted(found)
