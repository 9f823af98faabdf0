"""Where files go: the request's inputs into ComfyUI's input folder, results into our own.

Inputs are written atomically (temporary name, then rename) and removed when the request ends.
Without a shared disk they are uploaded over POST /upload/image into a dedicated subfolder,
because ComfyUI offers no way to delete an upload. Every name is chosen by the server.
"""
from __future__ import annotations

import itertools
import logging
import os
import re
from functools import lru_cache
from pathlib import Path

from dreamlayer.config.img2img import HTTP_UPLOAD_SUBFOLDER

log = logging.getLogger(__name__)

_O_BINARY = getattr(os, "O_BINARY", 0)  # Windows: no newline translation

SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,200}\Z")  # \Z: "$" would accept a final newline


def _temp_name(name: str) -> str:
    """A hidden name beside ``name`` for writing it: unique to this process and call (the
    service's file names are unique already; this covers two writes of one name at once)."""
    return f".tmp-{os.getpid()}-{next(_counter)}-{name}.part"


_counter = itertools.count()
_TEMP_NAME = re.compile(r"\.tmp-\d+-\d+-(.+)\.part\Z")  # _temp_name's: group 1 is the name


def write_atomic(directory: Path, name: str, data: bytes) -> Path:
    """Write ``data`` to directory/name so that readers never see a half-written file."""
    if not SAFE_NAME.match(name):
        raise ValueError(f"unsafe file name {name!r}")
    tmp = directory / _temp_name(name)
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _O_BINARY, 0o644)
    except FileNotFoundError:  # the folder was removed: make it again
        directory.mkdir(parents=True, exist_ok=True)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _O_BINARY, 0o644)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, directory / name)
    except BaseException:
        remove_file(tmp)
        raise
    return directory / name


def link_or_copy(source: Path, directory: Path, name: str) -> Path:
    """directory/name as the same file as ``source`` (a hard link: no copy of the bytes), or a
    copy where a link is impossible (another file system, a file owned by another user under
    Linux's protected_hardlinks, a file system without links). Atomic either way."""
    if not SAFE_NAME.match(name):
        raise ValueError(f"unsafe file name {name!r}")
    tmp = directory / _temp_name(name)
    try:
        try:
            os.link(source, tmp)
        except FileNotFoundError:
            if not Path(source).exists():
                raise
            directory.mkdir(parents=True, exist_ok=True)  # the folder was removed: make it again
            os.link(source, tmp)
    except FileNotFoundError:
        raise  # the source went: nothing to copy either
    except OSError as exc:
        log.debug("cannot link %s into %s (%s); copying it", source, directory, exc)
        return write_atomic(directory, name, Path(source).read_bytes())
    try:
        os.replace(tmp, directory / name)
    finally:
        # gone after a rename, except when the name already was this file: then rename() does
        # nothing (POSIX) and the temporary link would stay
        remove_file(tmp)
    return directory / name


def remove_file(path: Path) -> None:
    """Remove a file the service wrote; a missing one is fine, another failure is logged."""
    try:
        path.unlink()
    except FileNotFoundError:
        pass
    except OSError as exc:
        log.warning("could not remove %s: %s", path, exc)


def remove_prefixed(directory: Path, prefix: str) -> int:
    """Remove the files of ``directory`` whose names start with ``prefix``, half-written ones
    (write_atomic's temporary names) included: what a run killed mid-way left there, found by the
    name the service gave it. Returns how many were removed. Only for rare clean-ups: it lists the
    folder."""
    if not SAFE_NAME.match(prefix) or prefix.startswith(".") or len(prefix) < 8:
        raise ValueError(f"unsafe file name prefix {prefix!r}")
    removed = 0
    try:
        entries = os.scandir(directory)
    except FileNotFoundError:
        return 0
    with entries:
        for entry in entries:
            name = entry.name
            temp = _TEMP_NAME.match(name)
            named = (temp.group(1) if temp else name).startswith(prefix)
            if named and entry.is_file(follow_symlinks=False):
                remove_file(Path(entry.path))
                removed += 1
    return removed


class InputStager:
    """Puts one request's input files where ComfyUI's LoadImage can find them; a context manager
    that removes them again (success or failure)."""

    def __init__(self, client, input_dir: Path | None, shrinker=None):
        self.client = client
        self.input_dir = Path(input_dir) if input_dir is not None else None
        self.shrinker = shrinker  # temp_uploads.UploadShrinker: HTTP uploads made small at the end
        self._written: list = []
        self._uploaded: list = []

    def put(self, name: str, data: bytes) -> str:
        """Stage ``data`` as ``name``; returns the value for LoadImage's ``image`` input."""
        if self.input_dir is not None:
            self._written.append(write_atomic(self.input_dir, name, data))
            return name
        # ComfyUI has no route to delete an input, so an upload goes to its temp folder, which
        # ComfyUI empties itself at start and exit; LoadImage / LoadImageMask read it through the
        # " [temp]" annotation (folder_paths.get_annotated_filepath, 0.3.40).
        answer = self.client.upload_image(data, name, subfolder=HTTP_UPLOAD_SUBFOLDER, type="temp",
                                          overwrite=True)
        sub = answer.get("subfolder") or ""
        self._uploaded.append((sub, answer["name"]))
        return (f"{sub}/{answer['name']}" if sub else answer["name"]) + " [temp]"

    def cleanup(self) -> None:
        while self._written:
            remove_file(self._written.pop())
        if self._uploaded and self.shrinker is not None:
            self.shrinker.shrink(self.client, self._uploaded)
        self._uploaded = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.cleanup()
        return False


class ServedImages:
    """The folder of generated images this service serves at /images/<name>."""

    def __init__(self, directory: Path):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)

    def save(self, name: str, data: bytes) -> str:
        write_atomic(self.directory, name, data)
        return name

    def save_file(self, name: str, source: Path) -> str:
        """Serve the file ``source`` (ComfyUI's output, which ComfyUI never rewrites) as ``name``:
        a hard link when both folders are on one file system, else a copy."""
        link_or_copy(source, self.directory, name)
        return name

    def remove(self, name: str) -> None:
        if SAFE_NAME.match(name):
            remove_file(self.directory / name)

    def lookup(self, name: str) -> Path | None:
        """What /images/<name> sends: the file (see resolve)."""
        return self.resolve(name)

    def resolve(self, name: str) -> Path | None:
        """The file for a served name, or None: no traversal, no absolute paths, no symlinks
        leading out of the folder, no hidden or temporary files."""
        if not isinstance(name, str) or not SAFE_NAME.match(name) or name.startswith(".tmp-"):
            return None
        root = self.directory.resolve()
        path = self.directory / name
        try:
            real = path.resolve(strict=True)
        except (OSError, RuntimeError):
            return None
        if real.parent != root or not real.is_file():
            return None
        return real


@lru_cache(maxsize=64)
def _real_dir(path: Path) -> Path:
    """The configured folder, resolved once (an lstat per path component); the file inside it
    is still resolved on every call."""
    return path.resolve()


def output_file(output_dir: Path, subfolder: str, filename: str) -> Path | None:
    """ComfyUI's output file named by an `executed` / history entry, inside ``output_dir``, or
    None: the names come from ComfyUI, but nothing outside its output folder is ever read (no
    absolute paths, no ``..``, no symlinks leading out)."""
    if not isinstance(filename, str) or not isinstance(subfolder, str) or not filename or "\0" in filename + subfolder:
        return None
    root = _real_dir(Path(output_dir))
    try:
        real = (root / subfolder / filename).resolve(strict=True)
    except (OSError, RuntimeError, ValueError):
        return None
    if root not in real.parents or not real.is_file():
        return None
    return real
