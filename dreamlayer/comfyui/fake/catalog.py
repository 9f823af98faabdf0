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

from . import custom_nodes

FIXTURE_PATH = Path(__file__).with_name("object_info.json")

# Which (node class, input) enums list the files of each model folder (ComfyUI: the INPUT_TYPES
# that call folder_paths.get_filename_list(folder)). Folders without such an input can still hold
# files (add_model records them for GET /models/{folder} and for VAELoader's taesd entries).
MODEL_FOLDER_INPUTS = {
    "checkpoints": (("CheckpointLoaderSimple", "ckpt_name"),),
    "loras": (("LoraLoader", "lora_name"),),
    "controlnet": (("ControlNetLoader", "control_net_name"),),
    "upscale_models": (("UpscaleModelLoader", "model_name"),),
    "vae": (("VAELoader", "vae_name"),),
}
for _pack in custom_nodes.PACKS.values():  # only present in object_info when the pack is loaded
    MODEL_FOLDER_INPUTS.update(_pack["model_inputs"])

# GET /models as captured from 0.3.40 (folder_paths.folder_names_and_paths keys).
MODEL_FOLDERS = [
    "checkpoints", "configs", "loras", "vae", "text_encoders", "diffusion_models", "clip_vision",
    "style_models", "embeddings", "diffusers", "vae_approx", "controlnet", "gligen",
    "upscale_models", "custom_nodes", "hypernetworks", "photomaker", "classifiers",
]

# folder_paths.supported_pt_extensions: the only files get_filename_list lists in model folders.
SUPPORTED_PT_EXTENSIONS = {".ckpt", ".pt", ".pt2", ".bin", ".pth", ".safetensors", ".pkl", ".sft"}

# VAELoader.vae_list(): a pseudo-VAE name offered when both vae_approx files exist (0.3.40's order;
# its taef1 check swaps "encoder"/"decoder" in the flag names, which changes nothing).
TAESD_NAMES = (("taesd", "taesd_encoder.", "taesd_decoder."), ("taesdxl", "taesdxl_encoder.", "taesdxl_decoder."),
               ("taesd3", "taesd3_encoder.", "taesd3_decoder."), ("taef1", "taef1_encoder.", "taef1_decoder."))

_fixture_cache: dict | None = None


def load_fixture() -> dict:
    """Return a fresh deep copy of the committed object_info fixture (parsed once per process)."""
    global _fixture_cache
    if _fixture_cache is None:
        with open(FIXTURE_PATH, encoding="utf-8") as f:
            _fixture_cache = json.load(f)
    return copy.deepcopy(_fixture_cache)


def load_custom_nodes(object_info: dict, folders: list, pack_name: str) -> None:
    """Add a custom node pack's classes (after the core ones, as ComfyUI loads them) and folders."""
    pack = custom_nodes.pack(pack_name)
    for class_type, info in pack["object_info"].items():
        object_info[class_type] = info
    for folder in pack["model_folders"]:
        if folder not in folders:
            folders.append(folder)


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


def _enum_specs(object_info: dict, folder: str):
    """The [list, ...] specs of every (class, input) enum that lists `folder`'s files."""
    for class_type, input_name in MODEL_FOLDER_INPUTS.get(folder, ()):
        info = object_info.get(class_type)
        if not info:
            continue
        for category in ("required", "optional"):
            spec = (info.get("input", {}).get(category) or {}).get(input_name)
            if spec and isinstance(spec[0], list):
                yield spec


def listed_model_file(filename: str) -> bool:
    """folder_paths.filter_files_extensions: only model extensions are listed (case-insensitive)."""
    return os.path.splitext(filename)[-1].lower() in SUPPORTED_PT_EXTENSIONS


def vae_list(vae_files, approx_files) -> list[str]:
    """VAELoader.vae_list(): the vae/ files (sorted), then a taesd name per complete encoder+decoder pair."""
    names = sorted(vae_files)
    for name, enc, dec in TAESD_NAMES:
        if any(f.startswith(enc) for f in approx_files) and any(f.startswith(dec) for f in approx_files):
            names.append(name)
    return names


def add_model(object_info: dict, folder: str, filename: str, files: dict, folders=MODEL_FOLDERS) -> bool:
    """A model file appears in `folder`: every enum listing that folder shows it (kept sorted).

    `files` (folder -> set of names) remembers it for GET /models and folders without an enum.
    Returns False, like ComfyUI's silent filter, when the extension is not a model extension."""
    if folder not in folders:
        raise ValueError(f"unknown model folder {folder!r}; expected one of {sorted(folders)}")
    if not listed_model_file(filename):
        return False
    files.setdefault(folder, set()).add(filename)
    if folder in ("vae", "vae_approx"):
        for spec in _enum_specs(object_info, "vae"):
            current = [n for n in spec[0] if n not in {t[0] for t in TAESD_NAMES}]
            spec[0][:] = vae_list(set(current) | files.get("vae", set()), files.get("vae_approx", set()))
        return True
    for spec in _enum_specs(object_info, folder):
        if filename not in spec[0]:
            spec[0].append(filename)
            spec[0].sort()
    return True


def model_files(object_info: dict, folder: str, files: dict | None = None) -> list[str]:
    """GET /models/{folder}: the files the fake pretends the folder holds (no taesd pseudo-names)."""
    found: set[str] = set((files or {}).get(folder, ()))
    for spec in _enum_specs(object_info, folder):
        found.update(n for n in spec[0] if not (folder == "vae" and n in {t[0] for t in TAESD_NAMES}))
    return sorted(found)
