"""Model files dropped on the page (POST /api/upload-model, multipart ``file`` + ``model_type``),
written into ComfyUI's models folder for that type.

- The models folder is ``<modelsDirectory>/models`` of the saved settings (ComfyUI's
  --base-directory), else ``$COMFYUI_DIR/models``; without either the upload is refused (503).
- The file part is streamed from the request body (which waitress has spooled to a temporary
  file of its own, as it does every body over 512 KiB) to a hidden temporary file in the models
  folder, with no copy in memory, then moved under its final name in one step: nobody ever sees
  half a model. (waitress's limit is the models' for every route: it cannot tell routes apart;
  the JSON routes' own 1 MiB limit answers 413 once the body is in.)
  The type is known only after the file (the page sends it second), hence the temporary file in
  the parent folder; a type folder on another disk gets a copy first, also under a temporary name.
- The extension must be one the page offers; the size is limited (DREAMLAYER_MAX_MODEL_BYTES).
- The name is the upload's, reduced to letters, digits, ``.``, ``_`` and ``-``. An existing file of
  that name is never replaced: the upload is refused with 409 ``model_exists``.
- On any failure every temporary file is removed.
"""
from __future__ import annotations

import errno
import logging
import os
import re
import shutil
import tempfile
import threading
from pathlib import Path
from typing import Optional

from werkzeug.exceptions import RequestEntityTooLarge
from werkzeug.formparser import parse_form_data

from dreamlayer.backend.models import derived_display_name
from dreamlayer.errors import ApiError, BadRequest, InvalidParameter, PayloadTooLarge, UnsupportedMediaType
from dreamlayer.img2img.staging import remove_file

log = logging.getLogger(__name__)

#: The page's model types -> ComfyUI's folder under models/.
MODEL_FOLDERS = {
    "checkpoints": "checkpoints",
    "loras": "loras",
    "vae": "vae",
    "controlnet": "controlnet",
    "upscale_models": "upscale_models",
    "embeddings": "embeddings",
    "hypernetworks": "hypernetworks",
}
#: The extensions the page's drop zone accepts.
MODEL_EXTENSIONS = (".safetensors", ".ckpt", ".pth", ".pt", ".bin")
TEMP_PREFIX = ".dreamlayer-upload-"
#: Names Windows reserves for devices, whatever their extension.
_WINDOWS_DEVICES = frozenset({"CON", "PRN", "AUX", "NUL", *(f"COM{i}" for i in range(10)),
                              *(f"LPT{i}" for i in range(10))})
_COPY_CHUNK = 1024 * 1024

_place_lock = threading.Lock()


class MissingFile(BadRequest):
    code = "missing_file"


class UnsupportedModelFile(UnsupportedMediaType):
    code = "unsupported_model_file"


class ModelTooLarge(PayloadTooLarge):
    code = "model_too_large"


class ModelExists(ApiError):
    status = 409
    code = "model_exists"


class ModelsFolderUnknown(ApiError):
    status = 503
    code = "models_dir_unknown"


class DiskFull(ApiError):
    status = 507
    code = "disk_full"


class WriteFailed(ApiError):
    status = 500
    code = "write_failed"


def models_root(models_dir: Optional[Path], comfyui_dir: Optional[Path]) -> Path:
    """ComfyUI's models folder: <modelsDirectory>/models, else $COMFYUI_DIR/models; it must exist."""
    if models_dir is not None:
        root, origin = Path(models_dir) / "models", "modelsDirectory (the saved path settings)"
    elif comfyui_dir is not None:
        root, origin = Path(comfyui_dir) / "models", "COMFYUI_DIR"
    else:
        raise ModelsFolderUnknown("This backend does not know ComfyUI's models folder: set modelsDirectory in the "
                                  "Configurations page (used at once), or COMFYUI_DIR to your ComfyUI folder and "
                                  "restart dream_layer.py")
    if not root.is_dir():
        raise ModelsFolderUnknown(f"ComfyUI's models folder {root} (from {origin}) does not exist: check {origin}")
    return root


def safe_model_name(upload_name) -> str:
    """The upload's file name made safe: its last path component, other characters than letters,
    digits, '.', '_' and '-' replaced by '_', no leading dot or dash, at most 150 characters before
    the (lower-cased) extension. Raises UnsupportedModelFile for another extension."""
    base = re.split(r"[/\\]", upload_name or "")[-1].strip()
    stem, dot, ext = base.rpartition(".")
    ext = "." + ext.lower() if dot else ""
    if ext not in MODEL_EXTENSIONS or not stem.strip(". "):
        raise UnsupportedModelFile(f"A model file must end in {', '.join(MODEL_EXTENSIONS)} (got "
                                   f"{base[:100]!r})", field="file", allowed=list(MODEL_EXTENSIONS))
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", stem)
    stem = re.sub(r"_{2,}", "_", stem).lstrip("._-")[:150].rstrip(".") or "model"
    if stem.split(".")[0].upper() in _WINDOWS_DEVICES:
        stem = "model_" + stem
    return stem + ext


def write_error(exc: OSError, where: Path) -> ApiError:
    if exc.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", -1)):
        return DiskFull(f"No space left in {where}: free some space (or choose another modelsDirectory)")
    return WriteFailed(f"Could not write into {where}: {exc.strerror or exc}")


class _Upload:
    """One request: the temporary files it created (all removed at the end unless placed)."""

    def __init__(self, root: Path):
        self.root = root
        self.temps: list = []
        self.streams: dict = {}

    def stream_factory(self, total_content_length, content_type, filename, content_length=None):
        if not filename:
            raise MissingFile("The file part has no file name: send the model file itself", field="file")
        safe_model_name(filename)  # a wrong extension is refused before a byte is written
        fd, tmp = tempfile.mkstemp(dir=self.root, prefix=TEMP_PREFIX, suffix=".part")
        self.temps.append(Path(tmp))
        stream = os.fdopen(fd, "w+b")
        self.streams[id(stream)] = (stream, Path(tmp))
        return stream

    def path_of(self, stream) -> Path:
        return self.streams[id(stream)][1]

    def cleanup(self) -> None:
        for stream, _ in self.streams.values():
            stream.close()
        while self.temps:
            remove_file(self.temps.pop())


def _place(tmp: Path, target: Path) -> None:
    """Give the finished temporary file its final name, never replacing an existing file."""
    try:
        os.link(tmp, target)  # atomic, and fails if the name exists
        return
    except FileExistsError:
        raise ModelExists(f"A model named {target.name} already exists in {target.parent.name}/: rename the file "
                          "to upload it as another model", filename=target.name) from None
    except OSError:
        pass  # no hard links on this filesystem (FAT, some network shares): rename instead
    with _place_lock:
        if os.path.lexists(target):
            raise ModelExists(f"A model named {target.name} already exists in {target.parent.name}/: rename the "
                              "file to upload it as another model", filename=target.name)
        os.replace(tmp, target)


def _same_disk(a: Path, b: Path) -> bool:
    return os.stat(a).st_dev == os.stat(b).st_dev


def receive_model(environ, *, models_dir: Optional[Path], comfyui_dir: Optional[Path], max_bytes: int) -> dict:
    """Receive one POST /api/upload-model request and place the model; the answer's fields."""
    root = models_root(models_dir, comfyui_dir)
    upload = _Upload(root)
    try:
        try:
            _, form, files = parse_form_data(environ, stream_factory=upload.stream_factory,
                                             max_content_length=max_bytes, max_form_parts=20)
        except RequestEntityTooLarge:
            declared = environ.get("CONTENT_LENGTH") or ""
            if declared.isdigit() and int(declared) <= max_bytes:
                raise BadRequest("Too many parts: send only 'file' and 'model_type'", code="bad_request") from None
            raise ModelTooLarge(f"The upload is larger than {max_bytes} bytes, the limit for a model file "
                                "(DREAMLAYER_MAX_MODEL_BYTES)", maximum=max_bytes) from None
        except OSError as exc:
            raise write_error(exc, root) from None
        file = files.get("file")
        if file is None or not file.filename:
            raise MissingFile("Send the model as the multipart file part 'file' (and its type as 'model_type')",
                              field="file")
        model_type = form.get("model_type") or "checkpoints"
        if model_type not in MODEL_FOLDERS:
            raise InvalidParameter("model_type", f"'model_type' must be one of {', '.join(MODEL_FOLDERS)}",
                                   code="invalid_model_type", allowed=list(MODEL_FOLDERS))
        name = safe_model_name(file.filename)
        tmp = upload.path_of(file.stream)
        file.stream.close()
        size = tmp.stat().st_size
        if size == 0:
            raise MissingFile("The model file is empty", field="file")
        folder = root / MODEL_FOLDERS[model_type]
        try:
            folder.mkdir(exist_ok=True)
            if not _same_disk(tmp, folder):
                fd, copy = tempfile.mkstemp(dir=folder, prefix=TEMP_PREFIX, suffix=".part")
                upload.temps.append(Path(copy))
                with os.fdopen(fd, "wb") as out, open(tmp, "rb") as src:
                    shutil.copyfileobj(src, out, _COPY_CHUNK)
                tmp = Path(copy)
            os.chmod(tmp, 0o644)  # temporary files are created owner-only; a model is not a secret
            _place(tmp, folder / name)
        except OSError as exc:
            raise write_error(exc, folder) from None
    finally:
        upload.cleanup()
    target = folder / name
    log.info("model uploaded: %s (%d bytes)", target, size)
    return {"status": "success", "message": f"Model uploaded to {model_type}: {name}", "filename": name,
            "original_filename": file.filename, "display_name": derived_display_name(name), "model_type": model_type,
            "filepath": str(target), "size": size}
