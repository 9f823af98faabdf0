"""The images dream_layer.py names and serves: generated images (the served folder, where the img2img
service puts its results) and ComfyUI's output folder; and, for their previews only, the ControlNet
images uploaded through /api/upload-controlnet-image into ComfyUI's input folder.

Every name comes from a client, so every lookup is confined: a plain file name (``SAFE_NAME``: no
folders, no ``..``, no absolute paths, nothing hidden), a regular file directly in the folder, and
no symlink leading out of it.
"""
from __future__ import annotations

import ipaddress
import logging
import mimetypes
import os
import re
import shutil
import subprocess
import sys
import threading
from pathlib import Path
from typing import Callable, Iterable, Optional

from dreamlayer.errors import ApiError, BadRequest
from dreamlayer.img2img.staging import SAFE_NAME

log = logging.getLogger(__name__)

#: What the image routes serve (by the name's extension): the raster images ComfyUI and the services write.
IMAGE_TYPES = {"image/png", "image/jpeg", "image/webp", "image/gif"}

#: Names of the ControlNet images this backend writes into ComfyUI's input folder.
CONTROLNET_NAME = re.compile(r"^controlnet_unit_\d{1,2}_[0-9a-f]{16}\.png\Z")

#: A function that opens a folder in the desktop's file manager, selecting ``file`` where it can;
#: True when it started a program.
FolderOpener = Callable[[Path, Path], bool]


class InvalidFilename(BadRequest):
    code = "invalid_filename"


class ImageNotFound(ApiError):
    status = 404
    code = "image_not_found"


def confined_file(directory: Optional[Path], name) -> Optional[Path]:
    """directory/name as a real path, or None unless it is a plain, visible, regular file directly in
    ``directory`` (a symlink is followed only if it stays there)."""
    if directory is None or not isinstance(name, str) or not SAFE_NAME.match(name) or name.startswith(".tmp-"):
        return None
    try:
        root = Path(directory).resolve(strict=True)
        real = (root / name).resolve(strict=True)
    except (OSError, RuntimeError):
        return None
    if real.parent != root or not real.is_file():
        return None
    return real


def requested_filename(body) -> str:
    """The ``filename`` of a JSON body {"filename": "…"}: a plain file name, or a 400."""
    if not isinstance(body, dict):
        raise BadRequest("Send a JSON object {\"filename\": \"<image file name>\"} with Content-Type: "
                         "application/json", code="invalid_json")
    name = body.get("filename")
    if name is None or name == "":
        raise InvalidFilename("'filename' is required: the file name of a generated image", field="filename")
    if not isinstance(name, str) or not SAFE_NAME.match(name) or name.startswith(".tmp-"):
        raise InvalidFilename("'filename' must be the plain file name of a generated image (no folders, no '..', "
                              "nothing hidden)", field="filename")
    return name


class ImageFolders:
    """Where named images are looked for, in order: the served folder, then ComfyUI's output
    folder(s); ``input_dir`` only for the previews of uploaded ControlNet images."""

    def __init__(self, served_dir: Path, output_dirs: Callable[[], Iterable[Optional[Path]]],
                 input_dir: Optional[Path]):
        self.served_dir = Path(served_dir)
        self.output_dirs = output_dirs
        self.input_dir = input_dir

    def folders(self) -> list:
        seen, out = set(), []
        for folder in (self.served_dir, *self.output_dirs()):
            if folder is not None and str(folder) not in seen:
                seen.add(str(folder))
                out.append(Path(folder))
        return out

    def find(self, name: str) -> Optional[Path]:
        """A generated image by name (served folder first), or None. Raster images only: an SVG
        (which may hold script) or any other file in those folders is not this backend's to serve."""
        if not isinstance(name, str) or mimetypes.guess_type(name)[0] not in IMAGE_TYPES:
            return None
        for folder in self.folders():
            path = confined_file(folder, name)
            if path is not None:
                return path
        return None

    def generated(self, name: str) -> Path:
        """find(), or a 404 naming the folders searched."""
        path = self.find(name)
        if path is None:
            raise ImageNotFound(f"No image named {name!r} in {' or '.join(str(f) for f in self.folders())}",
                                filename=name)
        return path

    def servable(self, name: str) -> Optional[Path]:
        """What GET /images/<name> may answer: a generated image, or an uploaded ControlNet image."""
        path = self.find(name)
        if path is None and isinstance(name, str) and CONTROLNET_NAME.match(name):
            path = confined_file(self.input_dir, name)
        return path


# ---------------------------------------------------------------------------- show in folder

def is_loopback(address: Optional[str]) -> bool:
    """True for 127.0.0.0/8 and ::1 (also IPv4-mapped); False for anything else or nothing."""
    try:
        ip = ipaddress.ip_address((address or "").split("%", 1)[0])
    except ValueError:
        return False
    mapped = getattr(ip, "ipv4_mapped", None)
    return (mapped or ip).is_loopback


def folder_command(folder: Path, file: Path, platform: str = sys.platform) -> Optional[list]:
    """The command that shows ``file`` in the desktop's file manager, or None without a desktop."""
    if platform == "darwin":
        return ["open", "-R", str(file)]
    if platform.startswith("win"):
        return ["explorer", f"/select,{file}"]
    if not (os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")) or shutil.which("xdg-open") is None:
        return None
    return ["xdg-open", str(folder)]


def open_folder(folder: Path, file: Path) -> bool:
    """The default FolderOpener: starts the platform's file manager without waiting for it."""
    cmd = folder_command(folder, file)
    if cmd is None:
        return False
    try:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, close_fds=True,
                                start_new_session=not sys.platform.startswith("win"))
    except OSError as exc:
        log.warning("could not open %s: %s", folder, exc)
        return False
    threading.Thread(target=proc.wait, daemon=True, name="folder-opener").start()  # reap it
    return True


def show_in_folder(path: Path, remote_addr: Optional[str], opener: Optional[FolderOpener]) -> dict:
    """The answer of POST /api/show-in-folder for an image found at ``path``. A program is started
    only for a client on this machine (loopback) and only when an opener is configured."""
    folder = path.parent
    if opener is None:
        opened, note = False, "opening folders is turned off (DREAMLAYER_OPEN_FOLDERS=0)"
    elif not is_loopback(remote_addr):
        opened, note = False, "the request did not come from this machine"
    else:
        opened = bool(opener(folder, path))
        note = "" if opened else "no desktop to open it on"
    message = (f"Opened the folder of {path.name}: {folder}" if opened
               else f"{path.name} is in {folder} (not opened: {note})")
    return {"status": "success", "message": message, "filename": path.name, "folder": str(folder),
            "filepath": str(path), "opened": opened}
