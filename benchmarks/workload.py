"""What the benchmark sends: deterministic photo-like images, inpainting masks, request bodies."""
from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

PROMPT = "a wooden cabin in a pine forest, golden hour, detailed"


def photo_like(width: int, height: int, seed: int = 1) -> Image.Image:
    """Smooth colour fields plus sensor-like noise: compresses like a photo (PNG ≈ 60 % of raw),
    unlike a flat test card (which PNG squeezes to nothing) or pure noise (which it cannot)."""
    rng = np.random.default_rng(seed)
    out = np.empty((height, width, 3), dtype=np.uint8)
    x = np.linspace(0.0, 1.0, width, dtype=np.float32)[None, :]
    for top in range(0, height, 512):  # in bands: a 4096² float image would need ~200 MB per array
        rows = min(512, height - top)
        y = (np.arange(top, top + rows, dtype=np.float32) / max(1, height - 1))[:, None]
        fields = (128 + 90 * np.sin(x * 7.1 + y * 3.3), 128 + 90 * np.cos(x * 4.7 - y * 5.9),
                  128 + 90 * np.sin((x + y) * 9.0))
        band = np.stack(fields, axis=-1) + rng.normal(0.0, 6.0, (rows, width, 3)).astype(np.float32)
        out[top:top + rows] = np.clip(band, 0, 255).astype(np.uint8)
    return Image.fromarray(out, "RGB")


def ellipse_mask(width: int, height: int) -> Image.Image:
    """White = keep, black = inpaint: an ellipse over the middle (about a fifth of the image)."""
    im = Image.new("L", (width, height), 255)
    ImageDraw.Draw(im).ellipse((width * 0.3, height * 0.25, width * 0.7, height * 0.75), fill=0)
    return im


def png(im: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="PNG", **kw)
    return buf.getvalue()


def write_inputs(directory: Path, size: int) -> tuple:
    """(image.png, mask.png) of size×size in ``directory``, made once (Pillow's default PNG level,
    as a browser or an image editor would save them)."""
    directory.mkdir(parents=True, exist_ok=True)
    image_path, mask_path = directory / f"image_{size}.png", directory / f"mask_{size}.png"
    if not image_path.exists():
        image_path.write_bytes(png(photo_like(size, size)))
    if not mask_path.exists():
        mask_path.write_bytes(png(ellipse_mask(size, size)))
    return image_path, mask_path


class JsonBodies:
    """application/json bodies as DreamLayer's frontend sends them (base64 data URLs), one per
    request; only the seed differs, so every prompt really runs (the fake caches identical ones)."""

    def __init__(self, image: bytes, mask: bytes | None, steps: int):
        self.steps = steps
        self._image = "data:image/png;base64," + base64.b64encode(image).decode()
        self._mask = None if mask is None else "data:image/png;base64," + base64.b64encode(mask).decode()

    def body(self, seed: int, steps: int | None = None) -> bytes:
        doc = {"prompt": PROMPT, "negative_prompt": "blurry", "steps": steps or self.steps,
               "denoising_strength": 0.75, "cfg_scale": 7.0, "seed": seed, "sampler_name": "euler",
               "scheduler": "normal", "batch_size": 1, "batch_count": 1, "input_image": self._image}
        if self._mask is not None:
            doc["mask_image"] = self._mask
        return json.dumps(doc).encode()
