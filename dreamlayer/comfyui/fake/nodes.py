"""The fake's pixel model: one small class per ComfyUI node class.

Values mirror ComfyUI's tensors as numpy float32: IMAGE [B,H,W,C] in 0..1, MASK [B,H,W] or [H,W],
LATENT {"samples": ..., "noise_mask"?: [B,1,H,W], "batch_index"?: [...]}. The fake's "latent" is
the image itself at full resolution (every VAE encodes as the identity; a VAELoader VAE tints what
it decodes), so a test can look at a saved PNG and tell exactly which pixels the sampler touched.
Models, CLIP, VAE and ControlNets are opaque tokens that only remember what was applied to them.
README.md ("Pixel model of each node") describes each model; tests/test_fake_nodes.py pins them.

Each class has `run(ctx, **inputs)` returning a tuple of outputs or {"ui": ..., "result": ...}
(ComfyUI's FUNCTION contract), plus `VALIDATE_INPUTS` / `IS_CHANGED` where ComfyUI has them.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import random
import re
import zlib
from dataclasses import dataclass, field, replace

import numpy as np
from PIL import Image, ImageFile, ImageOps, ImageSequence, UnidentifiedImageError
from PIL.PngImagePlugin import PngInfo

from . import imaging

log = logging.getLogger(__name__)

SAMPLER_CLASSES = ("KSampler", "KSamplerAdvanced")


class InterruptProcessingException(Exception):
    """Raised inside a node when /interrupt (or stop/die) asks the running prompt to stop."""


# --- opaque model objects ----------------------------------------------------------------------

def _basename(name: str) -> str:
    return name.replace("\\", "/").rsplit("/", 1)[-1]


@dataclass(frozen=True)
class Model:
    ckpt: str
    loras: tuple = ()
    #: DifferentialDiffusion patched it (model_options["denoise_mask_function"])
    differential: bool = False

    @property
    def inpainting(self) -> bool:
        """A 9-channel inpainting UNet: real ComfyUI sees in_channels=9 in the weights; the fake
        goes by the file name (contains "inpainting", case-insensitive)."""
        return "inpainting" in _basename(self.ckpt).lower()


@dataclass(frozen=True)
class Clip:
    ckpt: str
    stop_at_layer: int = -1
    loras: tuple = ()


@dataclass(frozen=True)
class Vae:
    ckpt: str | None = None   #: the checkpoint this VAE came with (CheckpointLoaderSimple)
    file: str | None = None   #: VAELoader's vae_name (a file of models/vae, or "taesd"...)


_SCALE_IN_NAME = re.compile(r"(?<![0-9])([1-9][0-9]?)x(?![0-9])|x([1-9][0-9]?)(?![0-9])", re.IGNORECASE)


def upscale_model_scale(name: str) -> int:
    """The fake's stand-in for the scale spandrel reads from the weights: the first "Nx" or "xN"
    (N = 1..99, not part of a longer number) in the file name, else 4.
    "4x-UltraSharp.pth" -> 4, "RealESRGAN_x2plus.pth" -> 2, "tiny-esrgan-2x-random.pth" -> 2."""
    m = _SCALE_IN_NAME.search(_basename(name))
    if m is None:
        return 4
    return int(m.group(1) or m.group(2))


@dataclass(frozen=True)
class UpscaleModel:
    name: str

    @property
    def scale(self) -> int:
        return upscale_model_scale(self.name)


@dataclass(frozen=True)
class FaceRestoreModel:
    name: str


@dataclass(frozen=True)
class ControlNet:
    name: str
    union_type: str | None = None


@dataclass(frozen=True)
class AppliedControl:
    control_net: ControlNet
    hint: np.ndarray = field(repr=False, compare=False)
    strength: float = 1.0
    start: float = 0.0
    end: float = 1.0


@dataclass(frozen=True)
class Conditioning:
    text: str
    clip: Clip
    controls: tuple = ()
    #: set by InpaintModelConditioning (node_helpers.conditioning_set_values), read by inpainting models
    concat_latent_image: np.ndarray | None = field(default=None, repr=False, compare=False)
    concat_mask: np.ndarray | None = field(default=None, repr=False, compare=False)


# --- helpers -----------------------------------------------------------------------------------

def _pillow(fn, arg):
    """node_helpers.pillow: retry once with LOAD_TRUNCATED_IMAGES, as ComfyUI does."""
    prev = None
    try:
        return fn(arg)
    except (OSError, UnidentifiedImageError, ValueError):
        prev = ImageFile.LOAD_TRUNCATED_IMAGES
        ImageFile.LOAD_TRUNCATED_IMAGES = True
        return fn(arg)
    finally:
        if prev is not None:
            ImageFile.LOAD_TRUNCATED_IMAGES = prev


def _file_sha256(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def _as_mask_batch(mask: np.ndarray) -> np.ndarray:
    """MASK [H,W] or [B,H,W] (or [B,1,H,W]) -> [B,1,H,W]."""
    return np.asarray(mask, dtype=np.float32).reshape((-1, 1) + mask.shape[-2:])


def _repeat_to_batch(a: np.ndarray, batch: int) -> np.ndarray:
    if a.shape[0] > batch:
        return a[:batch]
    if a.shape[0] < batch:
        reps = -(-batch // a.shape[0])
        return np.concatenate([a] * reps, axis=0)[:batch]
    return a


class Node:
    """Base: a node object lives as long as its (node id, class) stays in the prompts (ComfyUI)."""

    def run(self, ctx, **inputs):  # pragma: no cover - interface
        raise NotImplementedError


# --- loaders and conditioning (opaque) ---------------------------------------------------------

class CheckpointLoaderSimple(Node):
    def run(self, ctx, ckpt_name):
        return (Model(ckpt_name), Clip(ckpt_name), Vae(ckpt_name))


class CLIPSetLastLayer(Node):
    def run(self, ctx, clip, stop_at_clip_layer):
        return (replace(clip, stop_at_layer=stop_at_clip_layer),)


class CLIPTextEncode(Node):
    def run(self, ctx, clip, text):
        if clip is None:
            # ComfyUI raises this exact RuntimeError when the checkpoint had no text encoder.
            raise RuntimeError("ERROR: clip input is invalid: None\n\nIf the clip is from a checkpoint loader node "
                               "your checkpoint does not contain a valid clip or text encoder model.")
        return (Conditioning(text, clip),)


class LoraLoader(Node):
    def run(self, ctx, model, clip, lora_name, strength_model, strength_clip):
        if strength_model == 0 and strength_clip == 0:
            return (model, clip)
        return (replace(model, loras=model.loras + ((lora_name, float(strength_model)),)),
                replace(clip, loras=clip.loras + ((lora_name, float(strength_clip)),)))


class ControlNetLoader(Node):
    def run(self, ctx, control_net_name):
        return (ControlNet(control_net_name),)


class SetUnionControlNetType(Node):
    def run(self, ctx, control_net, type):
        return (replace(control_net, union_type=None if type == "auto" else type),)


class ControlNetApplyAdvanced(Node):
    def run(self, ctx, positive, negative, control_net, image, strength, start_percent, end_percent, vae=None):
        if strength == 0:
            return (positive, negative)
        applied = AppliedControl(control_net, np.asarray(image, dtype=np.float32), float(strength),
                                 float(start_percent), float(end_percent))
        return (replace(positive, controls=positive.controls + (applied,)),
                replace(negative, controls=negative.controls + (applied,)))


class UpscaleModelLoader(Node):
    def run(self, ctx, model_name):
        model = UpscaleModel(model_name)
        ctx.note(model_name=model_name, scale=model.scale)
        return (model,)


class VAELoader(Node):
    def run(self, ctx, vae_name):
        return (Vae(file=vae_name),)


class DifferentialDiffusion(Node):
    """model.clone() + set_model_denoise_mask_function: the sampler thresholds the noise mask."""

    def run(self, ctx, model):
        return (replace(model, differential=True),)


# --- image loading ----------------------------------------------------------------------------

class LoadImage(Node):
    """Image.open + exif_transpose per frame, RGB; MASK = 1 - A/255, or 64x64 zeros without alpha."""

    def run(self, ctx, image):
        path = ctx.folders.annotated_path(image)
        img = _pillow(Image.open, path)
        images, masks = [], []
        size = None
        for frame in ImageSequence.Iterator(img):
            frame = _pillow(ImageOps.exif_transpose, frame)
            if frame.mode == "I":
                frame = frame.point(lambda v: v * (1 / 255))
            rgb = frame.convert("RGB")
            if size is None:
                size = rgb.size
            if rgb.size != size:
                continue
            images.append(np.asarray(rgb).astype(np.float32)[None] / 255.0)
            if "A" in frame.getbands():
                alpha = np.asarray(frame.getchannel("A")).astype(np.float32) / 255.0
                mask = 1.0 - alpha
            elif frame.mode == "P" and "transparency" in frame.info:
                alpha = np.asarray(frame.convert("RGBA").getchannel("A")).astype(np.float32) / 255.0
                mask = 1.0 - alpha
            else:
                mask = np.zeros((64, 64), dtype=np.float32)
            masks.append(mask[None])
        if len(images) > 1 and img.format not in ("MPO",):
            return (np.concatenate(images, axis=0), np.concatenate(masks, axis=0))
        return (images[0], masks[0])

    @classmethod
    def IS_CHANGED(cls, folders, image):
        return _file_sha256(folders.annotated_path(image))

    @classmethod
    def VALIDATE_INPUTS(cls, folders, image):
        if not folders.annotated_exists(image):
            return "Invalid image file: {}".format(image)
        return True


class LoadImageMask(Node):
    """mask_semantics.md: alpha -> 1 - A/255 (A = 255 when the file has none), other channels C/255."""

    def run(self, ctx, image, channel):
        path = ctx.folders.annotated_path(image)
        img = _pillow(Image.open, path)
        img = _pillow(ImageOps.exif_transpose, img)
        if img.getbands() != ("R", "G", "B", "A"):
            if img.mode == "I":
                img = img.point(lambda v: v * (1 / 255))
            img = img.convert("RGBA")
        band = channel[0].upper()
        if band in img.getbands():
            mask = np.asarray(img.getchannel(band)).astype(np.float32) / 255.0
            if band == "A":
                mask = 1.0 - mask
        else:
            mask = np.zeros((64, 64), dtype=np.float32)
        return (mask[None],)

    @classmethod
    def IS_CHANGED(cls, folders, image, channel):
        return _file_sha256(folders.annotated_path(image))

    @classmethod
    def VALIDATE_INPUTS(cls, folders, image):
        if not folders.annotated_exists(image):
            return "Invalid image file: {}".format(image)
        return True


# --- latents ----------------------------------------------------------------------------------

def _crop_to_multiple_of_8(pixels: np.ndarray) -> np.ndarray:
    """vae_encode_crop_pixels: centred crop of H and W down to multiples of 8."""
    h, w = pixels.shape[1], pixels.shape[2]
    nh, nw = (h // 8) * 8, (w // 8) * 8
    oy, ox = (h % 8) // 2, (w % 8) // 2
    return pixels[:, oy:oy + nh, ox:ox + nw, :]


VAE_TINT = 0.2  # how much a VAELoader VAE pulls decoded pixels towards its colour


def vae_tint(name: str) -> np.ndarray:
    """The RGB colour (0..1) a VAELoader VAE of that name tints its decodes with."""
    h = zlib.crc32(("vae:" + name).encode())
    return np.array([(h >> 0) & 255, (h >> 8) & 255, (h >> 16) & 255], dtype=np.float32) / 255.0


def _vae_encode(vae, pixels) -> np.ndarray:
    """vae.encode: crop to multiples of 8, RGB only; every VAE encodes as the identity in the fake."""
    return _crop_to_multiple_of_8(np.asarray(pixels, dtype=np.float32))[..., :3].copy()


def _vae_decode(vae, samples: np.ndarray) -> np.ndarray:
    """vae.decode: a checkpoint's VAE is the identity (clamped); a VAELoader VAE also tints."""
    image = np.clip(samples, 0.0, 1.0).astype(np.float32)
    if getattr(vae, "file", None) is not None:
        image = (image * (1.0 - VAE_TINT) + vae_tint(vae.file) * VAE_TINT).astype(np.float32)
    return image


def tiled_scale_steps(width, height, tile_x, tile_y, overlap) -> int:
    """comfy.utils.get_tiled_scale_steps (a tile as big as the overlap divides by zero, as there)."""
    rows = 1 if height <= tile_y else math.ceil((height - overlap) / (tile_y - overlap))
    cols = 1 if width <= tile_x else math.ceil((width - overlap) / (tile_x - overlap))
    return rows * cols


def _tile_progress(ctx, total: int) -> None:
    """comfy.utils.ProgressBar(total) updated once per tile: one progress message each."""
    for value in range(1, max(0, total) + 1):
        ctx.progress(value, total)


class VAEEncode(Node):
    def run(self, ctx, pixels, vae):
        return ({"samples": _vae_encode(vae, pixels)},)


class VAEEncodeTiled(Node):
    """Same latent as VAEEncode; progress per tile as VAE.encode_tiled_ (three tilings)."""

    def run(self, ctx, pixels, vae, tile_size, overlap, temporal_size=64, temporal_overlap=8):
        samples = _vae_encode(vae, pixels)
        b, h, w = samples.shape[0], samples.shape[1], samples.shape[2]
        steps = b * (tiled_scale_steps(w, h, tile_size, tile_size, overlap)
                     + tiled_scale_steps(w, h, tile_size // 2, tile_size * 2, overlap)
                     + tiled_scale_steps(w, h, tile_size * 2, tile_size // 2, overlap))
        ctx.note(tile_size=tile_size, overlap=overlap, tiles=steps)
        _tile_progress(ctx, steps)
        return ({"samples": samples},)


class VAEEncodeForInpaint(Node):
    """Grey out (0.5) pixels where mask.round()==1, noise_mask = mask grown by a box kernel."""

    def run(self, ctx, pixels, vae, mask, grow_mask_by=6):
        pixels = np.array(pixels, dtype=np.float32)
        h, w = pixels.shape[1], pixels.shape[2]
        x, y = (h // 8) * 8, (w // 8) * 8
        mask = imaging.resize_bilinear(_as_mask_batch(mask), h, w)
        if (h, w) != (x, y):
            ox, oy = (h % 8) // 2, (w % 8) // 2
            pixels = pixels[:, ox:x + ox, oy:y + oy, :]
            mask = mask[:, :, ox:x + ox, oy:y + oy]
        if grow_mask_by == 0:
            grown = mask
        else:
            grown = np.clip(imaging.box_grow(np.round(mask), grow_mask_by), 0, 1)
        keep = (1.0 - np.round(mask))[:, 0]  # [Bm,H,W]
        for c in range(3):
            pixels[..., c] = (pixels[..., c] - 0.5) * keep + 0.5
        samples = _crop_to_multiple_of_8(pixels)[..., :3].copy()
        return ({"samples": samples, "noise_mask": np.round(grown[:, :, :x, :y]).astype(np.float32)},)


class VAEDecode(Node):
    def run(self, ctx, samples, vae):
        return (_vae_decode(vae, samples["samples"]),)


class VAEDecodeTiled(Node):
    """Same pixels as VAEDecode; ComfyUI's overlap clamp, progress per tile as VAE.decode_tiled_."""

    def run(self, ctx, samples, vae, tile_size, overlap=64, temporal_size=64, temporal_overlap=8):
        if tile_size < overlap * 4:
            overlap = tile_size // 4
        lat = samples["samples"]
        b, h, w = lat.shape[0], lat.shape[1] // 8, lat.shape[2] // 8  # the real latent's size
        tile, ov = tile_size // 8, overlap // 8
        steps = b * (tiled_scale_steps(w, h, tile, tile, ov)
                     + tiled_scale_steps(w, h, tile // 2, tile * 2, ov)
                     + tiled_scale_steps(w, h, tile * 2, tile // 2, ov))
        ctx.note(tile_size=tile_size, overlap=overlap, tiles=steps)
        _tile_progress(ctx, steps)
        return (_vae_decode(vae, lat),)


class InpaintModelConditioning(Node):
    """nodes.InpaintModelConditioning: the grey-masked image and the mask go into the conditioning
    (concat_latent_image / concat_mask), the latent is the unmasked image (+ noise_mask)."""

    def run(self, ctx, positive, negative, pixels, vae, mask, noise_mask=True):
        orig = np.asarray(pixels, dtype=np.float32)
        h, w = orig.shape[1], orig.shape[2]
        x, y = (h // 8) * 8, (w // 8) * 8
        mask = imaging.resize_bilinear(_as_mask_batch(mask), h, w)
        pixels = orig.copy()
        if (h, w) != (x, y):
            ox, oy = (h % 8) // 2, (w % 8) // 2
            pixels = pixels[:, ox:x + ox, oy:y + oy, :]
            mask = mask[:, :, ox:x + ox, oy:y + oy]
        keep = (1.0 - np.round(mask))[:, 0]
        for c in range(3):
            pixels[..., c] = (pixels[..., c] - 0.5) * keep + 0.5
        concat = _vae_encode(vae, pixels)
        latent = {"samples": _vae_encode(vae, orig)}
        if noise_mask:
            latent["noise_mask"] = mask
        out = [replace(cond, concat_latent_image=concat, concat_mask=mask) for cond in (positive, negative)]
        return (out[0], out[1], latent)


class SetLatentNoiseMask(Node):
    def run(self, ctx, samples, mask):
        out = dict(samples)
        out["noise_mask"] = _as_mask_batch(mask)
        return (out,)


class RepeatLatentBatch(Node):
    def run(self, ctx, samples, amount):
        out = dict(samples)
        s_in = samples["samples"]
        out["samples"] = np.concatenate([s_in] * amount, axis=0)
        if "noise_mask" in samples and samples["noise_mask"].shape[0] > 1:
            out["noise_mask"] = np.concatenate([samples["noise_mask"]] * amount, axis=0)
        if "batch_index" in out:
            idx = out["batch_index"]
            offset = max(idx) - min(idx) + 1
            out["batch_index"] = idx + [x + i * offset for i in range(1, amount) for x in idx]
        return (out,)


class EmptyLatentImage(Node):
    """Grey 0.5 (about what SD's VAE makes of an all-zero latent), sized down to multiples of 8."""

    def run(self, ctx, width, height, batch_size=1):
        return ({"samples": np.full((batch_size, (height // 8) * 8, (width // 8) * 8, 3), 0.5, dtype=np.float32)},)


class LatentUpscale(Node):
    def run(self, ctx, samples, upscale_method, width, height, crop):
        if width == 0 and height == 0:
            return (samples,)
        out = dict(samples)
        s = samples["samples"]
        lh, lw = s.shape[1] // 8, s.shape[2] // 8  # the real latent's size
        if width == 0:
            height = max(64, height)
            width = max(64, round(lw * height / lh))
        elif height == 0:
            width = max(64, width)
            height = max(64, round(lh * width / lw))
        else:
            width, height = max(64, width), max(64, height)
        if crop == "center":  # the real crop is of latent cells: of a very different aspect, none is left
            x, y = imaging.center_crop_margins(lw, lh, width // 8, height // 8)
            kept_w, kept_h = lw - 2 * x, lh - 2 * y
            if kept_w <= 0 or kept_h <= 0:
                raise RuntimeError(f"Input and output sizes should be greater than 0, but got input (H: {kept_h}, "
                                   f"W: {kept_w}) output (H: {height // 8}, W: {width // 8})")
        out["samples"] = imaging.common_upscale(s, (width // 8) * 8, (height // 8) * 8, upscale_method, crop)
        return (out,)


def _check_output_size(in_h, in_w, out_h, out_w) -> None:
    """torch's interpolate refuses an empty output (the text of upsample_bilinear2d's error)."""
    if out_h <= 0 or out_w <= 0:
        raise RuntimeError(f"Input and output sizes should be greater than 0, but got input (H: {in_h}, W: {in_w}) "
                           f"output (H: {out_h}, W: {out_w})")


class LatentUpscaleBy(Node):
    """round(latent side * scale_by) in latent cells (8 pixels each), as ComfyUI sizes the latent."""

    def run(self, ctx, samples, upscale_method, scale_by):
        out = dict(samples)
        s = samples["samples"]
        lh, lw = s.shape[1] // 8, s.shape[2] // 8
        width, height = round(lw * scale_by), round(lh * scale_by)
        _check_output_size(lh, lw, height, width)
        out["samples"] = imaging.common_upscale(s, width * 8, height * 8, upscale_method, "disabled")
        return (out,)


# --- sampling ---------------------------------------------------------------------------------

def _seed_noise(seed: int, shape: tuple, batch_index=None) -> np.ndarray:
    """Deterministic noise from numpy default_rng(seed); batch elements differ (like prepare_noise)."""
    rng = np.random.default_rng(seed)
    if batch_index is None:
        return rng.random(shape, dtype=np.float32)
    n = max(batch_index) + 1
    full = rng.random((n,) + tuple(shape[1:]), dtype=np.float32)
    return full[np.asarray(batch_index)]


def _preview(latent: np.ndarray, sampled: np.ndarray, t: float) -> Image.Image:
    frame = np.clip(latent[0] * (1 - t) + sampled[0] * t, 0, 1)
    return Image.fromarray(imaging.to_uint8(frame))


CHECKPOINT_STRENGTH = 0.2  # how much a checkpoint's own pattern shows in what it samples

#: Private latent key: the noise a KSamplerAdvanced pass left in its output
#: (return_with_leftover_noise), so that a later add_noise=disable pass can take it out again.
LEFTOVER_NOISE = "fake_leftover_noise"


def _checkpoint_pattern(ckpt: str, shape: tuple) -> np.ndarray:
    return np.random.default_rng(zlib.crc32(("checkpoint:" + ckpt).encode())).random(shape, dtype=np.float32)


def _perturb(noise: np.ndarray, model: Model, positive: Conditioning) -> np.ndarray:
    """What the model makes of the noise: its checkpoint's pattern, LoRAs and ControlNets nudge it
    deterministically, so tests can see which were applied."""
    a = CHECKPOINT_STRENGTH
    noise = noise * (1 - a) + _checkpoint_pattern(model.ckpt, noise.shape[1:])[None] * a
    for name, strength in model.loras:
        a = min(1.0, 0.15 * abs(strength))
        r = np.random.default_rng(zlib.crc32(name.encode())).random(noise.shape[1:], dtype=np.float32)
        noise = noise * (1 - a) + r[None] * a
    for ctrl in getattr(positive, "controls", ()):
        a = min(1.0, 0.15 * ctrl.strength * max(0.0, ctrl.end - ctrl.start))
        if a <= 0:
            continue
        hint = imaging.common_upscale(ctrl.hint[..., :3], noise.shape[2], noise.shape[1], "bilinear", "disabled")
        noise = noise * (1 - a) + _repeat_to_batch(hint, noise.shape[0]) * a
    return noise.astype(np.float32)


def _inpaint_view(positive, latent: dict, x: np.ndarray):
    """BaseModel.concat_cond of a 9-channel model: (masked image, rounded mask [B,H,W], source).

    concat_mask / concat_latent_image from the conditioning (InpaintModelConditioning), else the
    latent's noise_mask and the latent being sampled itself; neither mask: all-ones + blank (grey)."""
    b, h, w = x.shape[0], x.shape[1], x.shape[2]
    mask = getattr(positive, "concat_mask", None)
    if mask is None:
        mask = latent.get("noise_mask")
    if mask is None:
        return np.full(x.shape, 0.5, dtype=np.float32), np.ones((b, h, w), dtype=np.float32), "blank"
    image = getattr(positive, "concat_latent_image", None)
    source = "concat_latent_image"
    if image is None:
        image, source = np.asarray(latent["samples"], dtype=np.float32), "latent_image"
    if image.shape[1:] != x.shape[1:]:
        image = imaging.common_upscale(image[..., :3], w, h, "bilinear", "center")
    mask = _as_mask_batch(mask)
    if mask.shape[-2:] != (h, w):
        mask = np.moveaxis(imaging.common_upscale(np.moveaxis(mask, 1, -1), w, h, "bilinear", "center"), -1, 1)
    return _repeat_to_batch(image, b), _repeat_to_batch(np.round(mask), b)[:, 0], source


def _content(model: Model, positive, latent: dict, x: np.ndarray, base: np.ndarray):
    """The image the model denoises towards. An inpainting model copies what it sees in its masked
    image, except where that image is the grey (0.5) of a hidden area inside the mask: there it
    generates like any model."""
    content = _perturb(base, model, positive)
    if not model.inpainting:
        return content, None
    seen, mask, source = _inpaint_view(positive, latent, x)
    hidden = (mask == 1.0) & np.all(np.abs(seen[..., :3] - 0.5) <= 1 / 510, axis=-1)
    return np.where(hidden[..., None], content, seen[..., :3]).astype(np.float32), source


def _schedule(steps: int, denoise):
    """Noise levels of the sampler's sigmas (1 = pure noise, linear in the step) and, per level, its
    index in the full schedule of `total` steps (KSampler.set_steps: denoise < 1 takes the last
    steps + 1 sigmas of int(steps / denoise) steps)."""
    if denoise is None or denoise > 0.9999:
        return [(steps - i) / steps for i in range(steps + 1)], list(range(steps + 1)), steps
    if denoise <= 0.0:
        return [], [], 0
    total = int(steps / denoise)
    return ([denoise * ((steps - i) / steps) for i in range(steps + 1)],
            [total - steps + i for i in range(steps + 1)], total)


def _dd_thresholds(indexes: list, levels: list, total: int) -> np.ndarray:
    """DifferentialDiffusion.forward's threshold per step: (t - t_to) / (t_from - t_to) on timesteps.
    The normal scheduler spaces timesteps evenly from 999 (first step) to 0 (last step), so the
    fake's timestep of schedule index g is (total - 1 - g) / (total - 1); a pass that ends at 0 ends
    at sigma_min (timestep 0), one that keeps leftover noise ends at its last index."""
    def ts(g):
        return 1.0 if total <= 1 else (total - 1 - g) / (total - 1)
    t_to = 0.0 if levels[-1] == 0 else ts(indexes[-1])
    t_from = ts(indexes[0])
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.array([(ts(g) - t_to) / (t_from - t_to) if t_from != t_to else np.nan
                         for g in indexes[:-1]], dtype=np.float32)


def _dd_fraction(m: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """Per pixel, the threshold of the first step where mask >= threshold (0 if none): the share of
    the pass that pixel is sampled for (before that, it is held at the re-noised original)."""
    f = np.zeros_like(m)
    done = np.zeros(m.shape, dtype=bool)
    for t in thresholds:
        sel = (m >= t) & ~done
        f[sel] = t
        done |= sel
    return f


def common_ksampler(ctx, model, seed, steps, positive, latent, denoise=1.0, add_noise=True, start=None, last=None,
                    force_full_denoise=False):
    """nodes.common_ksampler + comfy.samplers.KSampler.sample on the fake's noise levels.

    A pass from level p_start to p_end: add_noise mixes the seeded noise in at p_start; the model
    replaces the share (p_start - p_end) / p_start of the noise present with its content; what is
    left (return_with_leftover_noise) stays in the pixels and is remembered in the latent so that a
    pass with add_noise=disable can finish it. One progress message per step."""
    x = np.asarray(latent["samples"], dtype=np.float32)
    levels, indexes, total = _schedule(steps, denoise)
    if last is not None and last < len(levels) - 1:
        levels, indexes = levels[:last + 1], indexes[:last + 1]
        if force_full_denoise:
            levels[-1] = 0.0
    if start is not None:
        if start < len(levels) - 1:
            levels, indexes = levels[start:], indexes[start:]
        else:
            return ({**latent, "samples": x.copy()},)
    if len(levels) < 2:  # denoise 0: no sigmas, the latent comes back as it was
        return ({**latent, "samples": x.copy()},)
    run_steps = len(levels) - 1
    p_start, p_end = levels[0], levels[-1]

    record = latent.get(LEFTOVER_NOISE)
    if add_noise:
        noise = _seed_noise(seed, x.shape, latent.get("batch_index"))
        present = p_start
        signal = x * (1.0 - p_start)
    elif record is not None and record["noise"].shape == x.shape:
        noise, present = record["noise"], record["level"]
        signal = x - noise * present
    else:
        noise, present, signal = None, 0.0, x

    left = 0.0
    if noise is not None:
        content, saw = _content(model, positive, latent, x, noise)
        removed = present * ((p_start - p_end) / p_start)
        left = present - removed
        sampled = signal + content * removed
        if left > 0:
            sampled = sampled + noise * left
    else:  # nothing to denoise: the model redraws the clean latent by the pass's share
        content, saw = _content(model, positive, latent, x, x)
        e = p_start - p_end
        sampled = x * (1.0 - e) + content * e

    for step in range(1, run_steps + 1):
        ctx.sleep_step()
        preview = _preview(x, sampled, step / run_steps) if ctx.send_previews else None
        ctx.progress(step, run_steps, preview)
        if step == 1:
            ctx.maybe_hang()

    out_samples = sampled
    if "noise_mask" in latent:
        m = imaging.resize_bilinear(_as_mask_batch(latent["noise_mask"]), x.shape[1], x.shape[2])
        m = _repeat_to_batch(m, x.shape[0])[:, 0, :, :, None]
        if model.differential:
            m = _dd_fraction(m, _dd_thresholds(indexes, levels, total))
        outside = x if not (add_noise and left > 0) else x * (1.0 - left) + noise * left
        out_samples = outside * (1.0 - m) + sampled * m
    out = dict(latent)
    out["samples"] = out_samples.astype(np.float32)
    if left > 0:
        out[LEFTOVER_NOISE] = {"noise": noise, "level": left}
    else:
        out.pop(LEFTOVER_NOISE, None)
    ctx.note(ckpt=model.ckpt, steps=run_steps, start_level=p_start, end_level=p_end, add_noise=add_noise,
             leftover_noise=left, differential=model.differential, inpainting_model=model.inpainting,
             inpainting_model_saw=saw)
    return (out,)


class KSampler(Node):
    def run(self, ctx, model, seed, steps, cfg, sampler_name, scheduler, positive, negative, latent_image,
            denoise=1.0):
        return common_ksampler(ctx, model, seed, steps, positive, latent_image, denoise)


class KSamplerAdvanced(Node):
    def run(self, ctx, model, add_noise, noise_seed, steps, cfg, sampler_name, scheduler, positive, negative,
            latent_image, start_at_step, end_at_step, return_with_leftover_noise, denoise=1.0):
        return common_ksampler(ctx, model, noise_seed, steps, positive, latent_image, denoise,
                               add_noise=(add_noise != "disable"), start=start_at_step, last=end_at_step,
                               force_full_denoise=(return_with_leftover_noise != "enable"))


# --- saving -----------------------------------------------------------------------------------

class SaveImage(Node):
    folder_type = "output"
    prefix_append = ""
    compress_level = 4

    def _dir(self, ctx) -> str:
        return str(ctx.folders.output)

    def run(self, ctx, images, filename_prefix="ComfyUI", prompt=None, extra_pnginfo=None):
        filename_prefix += self.prefix_append
        out_dir = self._dir(ctx)
        folder, stem, counter, subfolder = ctx.save_image_path(filename_prefix, out_dir,
                                                               images[0].shape[1], images[0].shape[0])
        results = []
        for batch_number, image in enumerate(images):
            img = Image.fromarray(imaging.to_uint8(image))
            meta = PngInfo()
            if prompt is not None:
                meta.add_text("prompt", json.dumps(prompt))
            if extra_pnginfo is not None:
                for key in extra_pnginfo:
                    meta.add_text(key, json.dumps(extra_pnginfo[key]))
            file = f"{stem.replace('%batch_num%', str(batch_number))}_{counter:05}_.png"
            img.save(os.path.join(folder, file), pnginfo=meta, compress_level=self.compress_level)
            results.append({"filename": file, "subfolder": subfolder, "type": self.folder_type})
            counter += 1
        return {"ui": {"images": results}}


class PreviewImage(SaveImage):
    folder_type = "temp"
    compress_level = 1

    def __init__(self):
        # ComfyUI's alphabet, typo included ("p" twice, no "w").
        self.prefix_append = "_temp_" + "".join(random.choice("abcdefghijklmnopqrstupvxyz") for _ in range(5))

    def _dir(self, ctx) -> str:
        return str(ctx.folders.temp)

    def run(self, ctx, images, prompt=None, extra_pnginfo=None):
        return super().run(ctx, images, "ComfyUI", prompt, extra_pnginfo)


# --- image and mask operations ----------------------------------------------------------------

class ImageScale(Node):
    def run(self, ctx, image, upscale_method, width, height, crop):
        if width == 0 and height == 0:
            return (image,)
        h, w = image.shape[1], image.shape[2]
        if width == 0:
            width = max(1, round(w * height / h))
        elif height == 0:
            height = max(1, round(h * width / w))
        return (imaging.common_upscale(image, width, height, upscale_method, crop),)


class ImageScaleBy(Node):
    def run(self, ctx, image, upscale_method, scale_by):
        h, w = image.shape[1], image.shape[2]
        width, height = round(w * scale_by), round(h * scale_by)
        _check_output_size(h, w, height, width)
        return (imaging.common_upscale(image, width, height, upscale_method, "disabled"),)


class ImageUpscaleWithModel(Node):
    """The model's native scale (from its file name, see upscale_model_scale), nearest-neighbour
    blocks clamped to 0..1; progress per 512px tile (overlap 32) as comfy.utils.tiled_scale."""

    def run(self, ctx, upscale_model, image):
        image = np.asarray(image, dtype=np.float32)
        scale = upscale_model.scale
        steps = image.shape[0] * tiled_scale_steps(image.shape[2], image.shape[1], 512, 512, 32)
        ctx.note(model_name=upscale_model.name, scale=scale)
        _tile_progress(ctx, steps)
        return (np.clip(imaging.upscale_repeat(image, scale), 0.0, 1.0).astype(np.float32),)


class ImageBlend(Node):
    """comfy_extras.nodes_post_processing.Blend: image2 (bicubic-resized to image1 when their
    shapes differ) blended by mode, then mixed over image1 by blend_factor, clamped to 0..1."""

    def run(self, ctx, image1, image2, blend_factor, blend_mode):
        image1 = np.asarray(image1, dtype=np.float32)
        image2 = np.asarray(image2, dtype=np.float32)
        if image1.shape != image2.shape:
            image2 = imaging.common_upscale(image2, image1.shape[2], image1.shape[1], "bicubic", "center")
        blended = _blend_modes(image1, image2, blend_mode)
        out = image1 * (1 - blend_factor) + blended * blend_factor
        return (np.clip(out, 0.0, 1.0).astype(np.float32),)


def _blend_modes(img1, img2, mode):
    if mode == "normal":
        return img2
    if mode == "multiply":
        return img1 * img2
    if mode == "screen":
        return 1 - (1 - img1) * (1 - img2)
    if mode == "overlay":
        return np.where(img1 <= 0.5, 2 * img1 * img2, 1 - 2 * (1 - img1) * (1 - img2))
    if mode == "soft_light":
        g = np.where(img1 <= 0.25, ((16 * img1 - 12) * img1 + 4) * img1, np.sqrt(img1))
        return np.where(img2 <= 0.5, img1 - (1 - 2 * img2) * img1 * (1 - img1), img1 + (2 * img2 - 1) * (g - img1))
    if mode == "difference":
        return img1 - img2
    raise ValueError(f"Unsupported blend mode: {mode}")


class ImageCrop(Node):
    def run(self, ctx, image, width, height, x, y):
        x = min(x, image.shape[2] - 1)
        y = min(y, image.shape[1] - 1)
        return (image[:, y:y + height, x:x + width, :],)


class ImageInvert(Node):
    def run(self, ctx, image):
        return ((1.0 - image).astype(np.float32),)


def _composite(dest, source, x, y, mask, multiplier, resize_source):
    """comfy_extras.nodes_mask.composite on [B,C,H,W] arrays."""
    if resize_source:
        source = imaging.resize_bilinear(source, dest.shape[2], dest.shape[3])
    source = _repeat_to_batch(source, dest.shape[0])
    x = max(-source.shape[3] * multiplier, min(x, dest.shape[3] * multiplier))
    y = max(-source.shape[2] * multiplier, min(y, dest.shape[2] * multiplier))
    left, top = x // multiplier, y // multiplier
    right, bottom = left + source.shape[3], top + source.shape[2]
    if mask is None:
        mask = np.ones_like(source)
    else:
        mask = imaging.resize_bilinear(_as_mask_batch(mask), source.shape[2], source.shape[3])
        mask = _repeat_to_batch(mask, source.shape[0])
    vis_w = dest.shape[3] - left + min(0, x)
    vis_h = dest.shape[2] - top + min(0, y)
    mask = mask[:, :, :vis_h, :vis_w]
    src_part = mask * source[:, :, :vis_h, :vis_w]
    dst_part = (1.0 - mask) * dest[:, :, top:bottom, left:right]
    dest[:, :, top:bottom, left:right] = src_part + dst_part
    return dest


class ImageCompositeMasked(Node):
    def run(self, ctx, destination, source, x, y, resize_source, mask=None):
        if destination.shape[-1] < source.shape[-1]:
            source = source[..., :destination.shape[-1]]
        elif destination.shape[-1] > source.shape[-1]:
            destination = np.concatenate([destination, np.ones_like(destination[..., :1])], axis=-1)
        dest = np.moveaxis(np.array(destination, dtype=np.float32), -1, 1).copy()
        out = _composite(dest, np.moveaxis(source, -1, 1), x, y, mask, 1, resize_source)
        return (np.moveaxis(out, 1, -1).astype(np.float32),)


class ImagePadForOutpaint(Node):
    def run(self, ctx, image, left, top, right, bottom, feathering):
        b, h, w, c = image.shape
        new = np.full((b, h + top + bottom, w + left + right, c), 0.5, dtype=np.float32)
        new[:, top:top + h, left:left + w, :] = image
        mask = np.ones((h + top + bottom, w + left + right), dtype=np.float32)
        t = np.zeros((h, w), dtype=np.float32)
        if feathering > 0 and feathering * 2 < h and feathering * 2 < w:
            i = np.arange(h)[:, None]
            j = np.arange(w)[None, :]
            dt = i if top != 0 else np.full_like(i, h)
            db = h - i if bottom != 0 else np.full_like(i, h)
            dl = j if left != 0 else np.full_like(j, w)
            dr = w - j if right != 0 else np.full_like(j, w)
            d = np.minimum(np.minimum(dt, db), np.minimum(dl, dr))
            v = (feathering - d) / feathering
            t = np.where(d >= feathering, 0.0, v * v).astype(np.float32)
        mask[top:top + h, left:left + w] = t
        return (new, mask[None])


class MaskToImage(Node):
    def run(self, ctx, mask):
        m = np.asarray(mask, dtype=np.float32).reshape((-1,) + mask.shape[-2:])
        return (np.repeat(m[..., None], 3, axis=-1),)


class ImageToMask(Node):
    def run(self, ctx, image, channel):
        return (image[:, :, :, ["red", "green", "blue", "alpha"].index(channel)],)


class InvertMask(Node):
    def run(self, ctx, mask):
        return ((1.0 - mask).astype(np.float32),)


class SolidMask(Node):
    def run(self, ctx, value, width, height):
        return (np.full((1, height, width), value, dtype=np.float32),)


class GrowMask(Node):
    def run(self, ctx, mask, expand, tapered_corners):
        c = 0 if tapered_corners else 1
        footprint = np.array([[c, 1, c], [1, 1, 1], [c, 1, c]], dtype=bool)
        out = []
        for m in np.asarray(mask, dtype=np.float32).reshape((-1,) + mask.shape[-2:]):
            for _ in range(abs(expand)):
                m = imaging.grey_morph(m, footprint, dilate=expand > 0)
            out.append(m)
        return (np.stack(out),)


class FeatherMask(Node):
    """comfy_extras.nodes_mask.FeatherMask, quirk included: the right/bottom loops index -0 first,
    so the first column/row (not the last) gets the 1/right (1/bottom) factor and the last gets 2/n."""

    def run(self, ctx, mask, left, top, right, bottom):
        out = np.array(mask, dtype=np.float32).reshape((-1,) + mask.shape[-2:])
        left, right = min(left, out.shape[-1]), min(right, out.shape[-1])
        top, bottom = min(top, out.shape[-2]), min(bottom, out.shape[-2])
        for x in range(left):
            out[:, :, x] *= (x + 1.0) / left
        for x in range(right):
            out[:, :, -x] *= (x + 1) / right
        for y in range(top):
            out[:, y, :] *= (y + 1) / top
        for y in range(bottom):
            out[:, -y, :] *= (y + 1) / bottom
        return (out,)


class ThresholdMask(Node):
    def run(self, ctx, mask, value):
        mask = np.asarray(mask, dtype=np.float32)
        return ((mask > np.float32(value)).astype(np.float32),)


class KorniaError(Exception):
    """What kornia's KORNIA_CHECK raises (its type's name as ComfyUI reports it)."""


KorniaError.__module__, KorniaError.__qualname__ = "kornia.core.exceptions", "BaseError"


class Canny(Node):
    """Any deterministic edge map: Sobel magnitude of luminance with the two thresholds. Like
    kornia's canny (ComfyUI 0.3.40's), it refuses a low threshold above the high one (found on a
    real ComfyUI: execution_error at the Canny node)."""

    def run(self, ctx, image, low_threshold, high_threshold):
        if low_threshold > high_threshold:
            raise KorniaError("Invalid input thresholds. low_threshold should be smaller than or equal to the "
                              f"high_threshold. Got: {low_threshold}>{high_threshold}")
        lum = image[..., :3] @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
        p = np.pad(lum, ((0, 0), (1, 1), (1, 1)), mode="edge")
        gx = (p[:, 1:-1, 2:] - p[:, 1:-1, :-2])
        gy = (p[:, 2:, 1:-1] - p[:, :-2, 1:-1])
        mag = np.sqrt(gx * gx + gy * gy)
        strong = mag >= high_threshold
        weak = mag >= low_threshold
        near = np.pad(strong, ((0, 0), (1, 1), (1, 1)))
        near_strong = np.zeros_like(strong)
        for dy in range(3):
            for dx in range(3):
                near_strong |= near[:, dy:dy + strong.shape[1], dx:dx + strong.shape[2]]
        edges = (strong | (weak & near_strong)).astype(np.float32)
        return (np.repeat(edges[..., None], 3, axis=-1),)


# --- custom node packs (only in object_info when FakeComfyUI(custom_nodes=...) loads them) -----

class FaceRestoreModelLoader(Node):
    def run(self, ctx, model_name):
        return (FaceRestoreModel(model_name),)


class FaceRestoreCFWithModel(Node):
    """facerestore_cf: the fake "finds" one face, the centre box (the middle half of each side),
    and "restores" it: 0.8 * 3x3 blur + 0.2, blended in with weight 1 - codeformer_fidelity / 2."""

    def run(self, ctx, facerestore_model, image, facedetection, codeformer_fidelity):
        out = np.array(image, dtype=np.float32)
        h, w = out.shape[1], out.shape[2]
        top, left, bottom, right = h // 4, w // 4, h - h // 4, w - w // 4
        weight = 1.0 - 0.5 * float(codeformer_fidelity)
        restored = np.clip(imaging.box_blur3(out) * 0.8 + 0.2, 0.0, 1.0)
        box = (slice(None), slice(top, bottom), slice(left, right))
        out[box] = out[box] * (1.0 - weight) + restored[box] * weight
        ctx.note(model_name=facerestore_model.name, facedetection=facedetection, face_box=[top, left, bottom, right],
                 weight=weight)
        return (out.astype(np.float32),)


NODE_CLASSES: dict[str, type[Node]] = {cls.__name__: cls for cls in (
    CheckpointLoaderSimple, CLIPTextEncode, CLIPSetLastLayer, LoadImage, LoadImageMask, VAEEncode,
    VAEEncodeForInpaint, VAEDecode, SetLatentNoiseMask, RepeatLatentBatch, EmptyLatentImage, LatentUpscale,
    KSampler, KSamplerAdvanced, SaveImage, PreviewImage, ImageScale, ImageCrop, ImageCompositeMasked,
    ImageInvert, ImagePadForOutpaint, MaskToImage, ImageToMask, InvertMask, GrowMask, SolidMask, LoraLoader,
    ControlNetLoader, ControlNetApplyAdvanced, SetUnionControlNetType, Canny, UpscaleModelLoader,
    ImageUpscaleWithModel, LatentUpscaleBy, ImageScaleBy, VAEEncodeTiled, VAEDecodeTiled, VAELoader,
    InpaintModelConditioning, DifferentialDiffusion, FeatherMask, ThresholdMask, ImageBlend,
    FaceRestoreModelLoader, FaceRestoreCFWithModel)}
