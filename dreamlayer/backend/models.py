"""The model lists the DreamLayer frontend loads on page load, read from ComfyUI's object_info.

ComfyUI is asked (not the disk) because it is the one that must find the file: a model that
ComfyUI does not list cannot be used, wherever it lies. Display names come from the file name,
overridden by a user-editable JSON mapping {file name: display name} — DreamLayer's
model_display_names.json, same format.
"""
from __future__ import annotations

import logging
from pathlib import Path

from dreamlayer.config.saved_paths import read_json_object

log = logging.getLogger(__name__)

#: kind -> (ComfyUI node class, input whose enum lists the files)
MODEL_INPUTS = {
    "checkpoints": ("CheckpointLoaderSimple", "ckpt_name"),
    "loras": ("LoraLoader", "lora_name"),
    "upscalers": ("UpscaleModelLoader", "model_name"),
    "controlnet": ("ControlNetLoader", "control_net_name"),
}


def derived_display_name(filename: str) -> str:
    """"tiny-sd15-random.safetensors" -> "Tiny Sd15 Random" (DreamLayer's rule); a subfolder
    ("SD1.5/x.safetensors", "SD1.5\\\\x.ckpt" from Windows) is not part of the name."""
    base = filename.replace("\\", "/").rsplit("/", 1)[-1]
    stem = base.rsplit(".", 1)[0] if "." in base.lstrip(".") else base
    words = stem.replace("-", " ").replace("_", " ").split()
    return " ".join(w.capitalize() for w in words) or filename


def load_display_names(path: Path | None) -> dict:
    """The mapping file, read on every call so edits apply at once. A missing file is normal; a
    broken one is logged and ignored (the derived names still work)."""
    if path is None:
        return {}
    data = read_json_object(path, "model display names file")
    return {k: v for k, v in data.items() if isinstance(k, str) and isinstance(v, str) and v.strip()}


def model_entries(filenames, names: dict) -> list:
    """The frontend's shape: [{"id": file, "name": display name, "filename": file}]."""
    return [{"id": f, "name": names.get(f) or derived_display_name(f), "filename": f}
            for f in filenames if isinstance(f, str)]


class ModelCatalog:
    """Lists one kind of model from a ComfyClient's object_info."""

    def __init__(self, client, display_names_file: Path | None):
        self.client = client
        self.display_names_file = display_names_file

    def models(self, kind: str) -> tuple[list, list]:
        """(models, warnings). object_info is fetched afresh so that a model copied into
        ComfyUI's folder shows up on the next page load. ComfyError propagates (503 etc.)."""
        class_type, input_name = MODEL_INPUTS[kind]
        self.client.object_info(refresh=True)
        try:
            files = self.client.input_choices(class_type, input_name)
        except KeyError as exc:
            # e.g. a ComfyUI build without that node: an empty list, not a failed page load
            log.warning("no %s list from ComfyUI: %s", kind, exc)
            return [], [f"ComfyUI does not offer {class_type}.{input_name}: {exc.args[0]}"]
        return model_entries(files, load_display_names(self.display_names_file)), []
