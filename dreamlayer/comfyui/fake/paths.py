"""ComfyUI's folder rules (folder_paths.py) for one fake server's input/output/temp dirs.

Kept apart from the routes because LoadImage validation, /view, /upload and SaveImage all share
them, and because their quirks (annotated names, no check beyond os.path.exists) are what a
client can trip over.
"""
from __future__ import annotations

import logging
import os
import time
from pathlib import Path

log = logging.getLogger(__name__)


class Folders:
    """input/, output/ and temp/ of one fake server (absolute paths, as ComfyUI keeps them)."""

    def __init__(self, root: Path):
        root = Path(os.path.abspath(root))
        self.root = root
        self.input = root / "input"
        self.output = root / "output"
        self.temp = root / "temp"

    def create(self) -> None:
        for d in (self.input, self.output, self.temp):
            d.mkdir(parents=True, exist_ok=True)

    def by_type(self, type_name) -> str | None:
        """folder_paths.get_directory_by_type: None for anything but output/temp/input."""
        return {"output": str(self.output), "temp": str(self.temp), "input": str(self.input)}.get(type_name)

    def annotated(self, name: str) -> tuple[str, str | None]:
        """Split 'name [output]' style annotations: (name, base dir or None)."""
        for suffix, base in ((" [output]", self.output), (" [input]", self.input), (" [temp]", self.temp)):
            # ComfyUI tests endswith("[output]") and then drops len(suffix) chars incl. the space.
            if name.endswith(suffix[1:]):
                return name[: -len(suffix)], str(base)
        return name, None

    def annotated_path(self, name: str) -> str:
        name, base = self.annotated(name)
        return os.path.join(base or str(self.input), name)

    def annotated_exists(self, name) -> bool:
        """LoadImage's VALIDATE_INPUTS: os.path.exists, nothing more (so '/etc/passwd' passes)."""
        return os.path.exists(self.annotated_path(name))


def _expand_prefix_vars(prefix: str, width: int, height: int) -> str:
    now = time.localtime()
    for key, value in (("%width%", str(width)), ("%height%", str(height)), ("%year%", str(now.tm_year)),
                       ("%month%", f"{now.tm_mon:02}"), ("%day%", f"{now.tm_mday:02}"),
                       ("%hour%", f"{now.tm_hour:02}"), ("%minute%", f"{now.tm_min:02}"),
                       ("%second%", f"{now.tm_sec:02}")):
        prefix = prefix.replace(key, value)
    return prefix


def save_image_path(filename_prefix: str, output_dir: str, width: int = 0, height: int = 0):
    """Where SaveImage writes: (folder, file stem, first counter, subfolder).

    The counter continues after the highest `<stem>_NNNNN_` already in the folder, and a prefix
    with '/' writes into a subfolder; escaping the output folder raises, as in ComfyUI.
    """
    if "%" in filename_prefix:
        filename_prefix = _expand_prefix_vars(filename_prefix, width, height)
    subfolder = os.path.dirname(os.path.normpath(filename_prefix))
    stem = os.path.basename(os.path.normpath(filename_prefix))
    folder = os.path.join(output_dir, subfolder)
    if os.path.commonpath((output_dir, os.path.abspath(folder))) != output_dir:
        raise Exception("**** ERROR: Saving image outside the output folder is not allowed."
                        f"\n full_output_folder: {os.path.abspath(folder)}\n         output_dir: {output_dir}"
                        f"\n         commonpath: {os.path.commonpath((output_dir, os.path.abspath(folder)))}")

    def counter_of(fname: str) -> tuple[int, str]:
        n = len(stem)
        head = fname[: n + 1]
        try:
            digits = int(fname[n + 1:].split("_")[0])
        except ValueError:
            digits = 0
        return digits, head

    try:
        matches = [c for c, head in map(counter_of, os.listdir(folder))
                   if os.path.normcase(head[:-1]) == os.path.normcase(stem) and head[-1:] == "_"]
        counter = max(matches) + 1 if matches else 1
    except FileNotFoundError:
        os.makedirs(folder, exist_ok=True)
        counter = 1
    return folder, stem, counter, subfolder
