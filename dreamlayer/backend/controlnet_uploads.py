"""A ControlNet unit's image (POST /api/upload-controlnet-image, multipart ``file`` + ``unit_index``),
written into ComfyUI's input folder where its LoadImage node finds it.

The image is checked like the img2img service's input image (by content, pixel limit before
decoding, PNG / JPEG / WebP) and re-encoded by us as a PNG under a name of our choosing,
``controlnet_unit_<unit>_<16 hex digits>.png``, written atomically. Such files stay in ComfyUI's
input folder (as uploads through ComfyUI's own page do); GET /api/images/<name> serves them back
for the page's preview.
"""
from __future__ import annotations

import logging
import secrets
from pathlib import Path
from typing import Optional

from dreamlayer.backend.model_uploads import write_error
from dreamlayer.errors import ApiError, BadRequest, InvalidParameter
from dreamlayer.img2img.staging import write_atomic
from dreamlayer.img2img.png_writer import png_bytes
from dreamlayer.img2img.uploads import decode_image

log = logging.getLogger(__name__)

MAX_UNIT_INDEX = 99


class InputFolderUnknown(ApiError):
    status = 503
    code = "comfyui_input_unknown"


def unit_index(value) -> int:
    """The form's ``unit_index`` (a string; absent = 0)."""
    if value is None or value == "":
        return 0
    text = str(value).strip()
    if not (text.isascii() and text.isdigit()) or int(text) > MAX_UNIT_INDEX:  # not "¹" or "٣"
        raise InvalidParameter("unit_index", f"'unit_index' must be a whole number from 0 to {MAX_UNIT_INDEX}",
                               minimum=0, maximum=MAX_UNIT_INDEX)
    return int(text)


def save_controlnet_image(data: bytes, unit: int, *, input_dir: Optional[Path], max_pixels: int) -> dict:
    """Check, re-encode and store one uploaded ControlNet image; the answer's fields."""
    if input_dir is None:
        raise InputFolderUnknown("This backend does not know ComfyUI's input folder: set COMFYUI_DIR (or "
                                 "COMFYUI_INPUT_DIR) to the folder of the ComfyUI on this machine")
    if not data:
        raise BadRequest("Send the image as the multipart file part 'file'", code="missing_image", field="file")
    decoded = decode_image(data, max_pixels=max_pixels)
    name = f"controlnet_unit_{unit}_{secrets.token_hex(8)}.png"  # matches images.CONTROLNET_NAME
    encoded = png_bytes(decoded.image, level=1)  # it stays on disk: compressed, unlike staged inputs
    try:
        path = write_atomic(Path(input_dir), name, encoded)
    except OSError as exc:
        raise write_error(exc, Path(input_dir)) from None
    log.info("ControlNet image for unit %d saved as %s", unit, path)
    body = {"status": "success", "filename": name, "unit_index": unit, "filepath": str(path), "size": len(encoded),
            "width": decoded.image.width, "height": decoded.image.height}
    if decoded.warnings:
        body["warnings"] = decoded.warnings
    return body
