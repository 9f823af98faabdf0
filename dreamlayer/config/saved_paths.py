"""DreamLayer's saved path settings and the directories derived from them — one implementation
shared by dream_layer.py (port 5002) and the img2img service (port 5004).

The settings file is the JSON object the frontend's Configurations page posts to
/api/settings/paths (same keys as DreamLayer's settings.json, so an old one can be copied over).
Only two keys are used: ``outputDirectory`` (where ComfyUI writes its outputs) and
``modelsDirectory`` (the parent of a ``models/`` folder, handed to ComfyUI as --base-directory).

Not environment configuration: the file's location comes from the configuration
(DREAMLAYER_SETTINGS_FILE, read by ``dreamlayer.config.env`` like every variable) and is passed
in. This module also holds what both services report on /health about ComfyUI: the demo-mode
note and the hint given when no ComfyUI answers.
"""
from __future__ import annotations

import json
import logging
import os
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Optional

log = logging.getLogger(__name__)

#: The path settings this backend uses (the frontend's key names).
PATH_KEYS = ("outputDirectory", "modelsDirectory")
#: Keys the frontend's Configurations page also sends; accepted, not used (see docs/installation.md).
UNUSED_FRONTEND_KEYS = ("controlNetModelsPath", "upscalerModelsPath", "vaeModelsPath",
                        "loraEmbeddingsPath", "filenameFormat", "saveMetadata")
#: The frontend's initial field values: sent as-is when the user did not touch a field, so they
#: mean "leave this setting as it is" rather than a path to check.
FRONTEND_PLACEHOLDERS = frozenset({
    "/path/to/outputs", "/path/to/parent/of/models", "/path/to/models/ControlNet",
    "/path/to/models/ESRGAN", "/path/to/models/VAE", "/path/to/models/Lora",
    "paste the path if it is outside project root",
})

DEMO_NOTE = ("Demo mode: the ComfyUI answering here is the project's fake stand-in "
             "(dreamlayer/comfyui/fake). It runs no diffusion model: images are synthetic.")


class SettingsError(ValueError):
    """A posted setting cannot be used; ``field`` names it."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field
        self.message = message


def unreachable_hint(url: str) -> str:
    """What /health says when no ComfyUI answers: every way to point the services at one."""
    return (f"No ComfyUI answers at {url}. Start ComfyUI (python main.py --listen 127.0.0.1 --port "
            "8188 in its folder), or set COMFYUI_DIR to its folder and run start_dream_layer.sh "
            "(or dream_layer.py --start-comfyui), or set COMFY_API_URL to where it runs. Without a "
            "GPU, start_dream_layer.sh --demo runs a stand-in.")


def demo_health_fields(demo: bool) -> dict:
    """The fields to merge into /health's "comfyui" object, so a stand-in is never mistaken for
    a real ComfyUI."""
    return {"demo": True, "note": DEMO_NOTE} if demo else {}


# ---------------------------------------------------------------------------- the file

_write_lock = threading.Lock()


def read_json_object(path: Path, what: str) -> dict:
    """A user-editable JSON object file, or {} when there is none. A file that is not a JSON
    object is reported in the log and ignored (it may be mid-edit by hand), never fatal."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        log.warning("ignoring %s %s: %s", what, path, exc)
        return {}
    if not isinstance(data, dict):
        log.warning("ignoring %s %s: not a JSON object", what, path)
        return {}
    return data


def load_settings(path: Path) -> dict:
    """The saved settings, or {} when there are none (see read_json_object)."""
    return read_json_object(path, "settings file")


def save_settings(path: Path, settings: dict) -> None:
    """Write the settings atomically (see write_json_atomic)."""
    write_json_atomic(Path(path), settings, prefix=".settings-")


def write_json_atomic(path: Path, data: dict, *, prefix: str, mode: int | None = None) -> None:
    """Write atomically (temporary file in the same folder, flushed to disk, then renamed): a
    crash mid-write leaves the previous file intact, and readers never see half a file.
    ``mode``: the file's permissions, set before anything is written into it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=prefix, suffix=".tmp")
    try:
        if mode is not None and hasattr(os, "fchmod"):
            os.fchmod(fd, mode)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=2, sort_keys=True)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


# ---------------------------------------------------------------------------- validation

def check_directory(field: str, value) -> Path:
    """A usable directory: absolute, existing, a directory, writable (ComfyUI writes outputs
    there, and under --base-directory also input/, temp/ and user/)."""
    if not isinstance(value, str):
        raise SettingsError(field, f"{field} must be a string path (got {type(value).__name__})")
    if "\x00" in value:
        raise SettingsError(field, f"{field} contains a NUL character")
    if not Path(value).is_absolute():
        raise SettingsError(field, f"{field} must be an absolute path (got {value!r}); "
                                   "relative and ~ paths are ambiguous for a server")
    # checked as it is saved: normpath drops "link/.." by its text, which the file system reads
    # through the link (another folder, maybe none)
    path = Path(os.path.normpath(value))
    if not path.exists():
        raise SettingsError(field, f"{field} {value!r} does not exist; create it first")
    if not path.is_dir():
        raise SettingsError(field, f"{field} {value!r} is not a directory")
    if not os.access(path, os.W_OK | os.X_OK):
        raise SettingsError(field, f"{field} {value!r} is not writable by the user running "
                                   "DreamLayer")
    if _others_can_write(path):
        # anyone on the machine may POST here: a folder that others can fill would hand them what
        # ComfyUI loads from it (models; custom_nodes under --base-directory: code)
        raise SettingsError(field, f"{field} {value!r} can be written by other users of this machine; "
                                   "choose a folder of your own (or set COMFYUI_DIR in the environment)")
    return path


def _others_can_write(path: Path) -> bool:
    """Owned by another user, or writable by everyone (POSIX; False elsewhere). Group-writable is
    let through: with the user-private groups of Debian and Ubuntu (umask 002) every folder is."""
    if not hasattr(os, "getuid"):
        return False
    st = path.stat()
    return st.st_uid != os.getuid() and os.getuid() != 0 or bool(st.st_mode & 0o002)


def is_placeholder(value) -> bool:
    return isinstance(value, str) and value.strip() in FRONTEND_PLACEHOLDERS


def apply_update(current: dict, posted: Mapping) -> tuple[dict, list]:
    """The settings after a POST: (new settings, warnings). Raises SettingsError for the first
    invalid path. Per path key: absent or a frontend placeholder = keep; null or "" = back to the
    default; anything else must pass check_directory()."""
    new = {k: v for k, v in current.items() if k in PATH_KEYS}
    warnings = []
    for key in PATH_KEYS:
        if key not in posted or is_placeholder(posted[key]):
            continue
        value = posted[key]
        if value is None or (isinstance(value, str) and not value.strip()):
            new.pop(key, None)
            continue
        new[key] = str(check_directory(key, value.strip() if isinstance(value, str) else value))
    unused = [k for k in UNUSED_FRONTEND_KEYS if k in posted and not is_placeholder(posted[k])]
    if unused:
        warnings.append(f"Not used by this backend, not saved: {', '.join(unused)}. Model lists come "
                        "from ComfyUI itself; add model folders in ComfyUI's extra_model_paths.yaml.")
    unknown = sorted(k for k in posted if k not in PATH_KEYS and k not in UNUSED_FRONTEND_KEYS)
    if unknown:
        warnings.append(f"Unknown settings ignored: {', '.join(unknown)}")
    return new, warnings


def update_settings(path: Path, posted: Mapping) -> tuple[dict, list]:
    """Validate ``posted``, merge it into the saved settings and save; (settings, warnings)."""
    with _write_lock:
        new, warnings = apply_update(load_settings(path), posted)
        save_settings(path, new)
    log.info("saved settings to %s: %s", path, new)
    return new, warnings


# ---------------------------------------------------------------------------- directories

@dataclass(frozen=True)
class Directories:
    #: Where ComfyUI writes outputs; None = ComfyUI's own default (nothing known about it).
    output_dir: Optional[Path]
    #: Parent of a models/ folder for ComfyUI's --base-directory; None = ComfyUI's own.
    models_dir: Optional[Path]

    def to_dict(self) -> dict:
        return {"output_directory": str(self.output_dir) if self.output_dir else None,
                "models_directory": str(self.models_dir) if self.models_dir else None}


def _saved_dir(settings: dict, key: str, path: Path) -> Optional[Path]:
    value = settings.get(key)
    if value in (None, "") or is_placeholder(value):
        return None
    if not isinstance(value, str) or not Path(value).is_absolute():
        log.warning("ignoring %s=%r in %s: not an absolute path", key, value, path)
        return None
    return Path(os.path.normpath(value))


def get_directories(settings_file: Path, comfyui_dir: Optional[Path] = None) -> Directories:
    """Output and models directories: the saved settings first; otherwise the output folder of
    the local ComfyUI install (COMFYUI_DIR/output) and no models override.

    Reads the file on every call so a saved change is seen without a restart; never raises for
    a bad file (see load_settings)."""
    settings = load_settings(settings_file)
    output_dir = _saved_dir(settings, "outputDirectory", settings_file)
    if output_dir is None and comfyui_dir is not None:
        output_dir = Path(os.path.abspath(comfyui_dir)) / "output"
    models_dir = _saved_dir(settings, "modelsDirectory", settings_file)
    if models_dir is not None and not models_dir.is_dir():
        log.warning("modelsDirectory %s in %s is not a directory; using ComfyUI's own", models_dir,
                    settings_file)
        models_dir = None
    return Directories(output_dir=output_dir, models_dir=models_dir)
