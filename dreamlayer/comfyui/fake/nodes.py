"""The fake's pixel model: one small class per ComfyUI node class.

Values mirror ComfyUI's tensors as numpy float32: IMAGE [B,H,W,C] in 0..1, MASK [B,H,W] or [H,W],
LATENT {"samples": ..., "noise_mask"?: [B,1,H,W], "batch_index"?: [...]}. The fake's "latent" is
the image itself at full resolution (the VAE is the identity), so a test can look at a saved PNG
and tell exactly which pixels the sampler touched. Models, CLIP, VAE and ControlNets are opaque
tokens that only remember what was applied to them.

Each class has `run(ctx, **inputs)` returning a tuple of outputs or {"ui": ..., "result": ...}
(ComfyUI's FUNCTION contract), plus `VALIDATE_INPUTS` / `IS_CHANGED` where ComfyUI has them.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import random
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

@dataclass(frozen=True)
class Model:
    ckpt: str
    loras: tuple = ()


@dataclass(frozen=True)
class Clip:
    ckpt: str
    stop_at_layer: int = -1
    loras: tuple = ()


@dataclass(frozen=True)
class Vae:
    ckpt: str


@dataclass(frozen=True)
class UpscaleModel:
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
        return (UpscaleModel(model_name),)


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


class VAEEncode(Node):
    def run(self, ctx, pixels, vae):
        return ({"samples": _crop_to_multiple_of_8(np.asarray(pixels, dtype=np.float32))[..., :3].copy()},)


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
        return (np.clip(samples["samples"], 0.0, 1.0).astype(np.float32),)


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
        out["samples"] = imaging.common_upscale(s, (width // 8) * 8, (height // 8) * 8, upscale_method, crop)
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


def _perturb(noise: np.ndarray, model: Model, positive: Conditioning) -> np.ndarray:
    """LoRAs and ControlNets nudge the noise deterministically, so tests can see they applied."""
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


def _preview(latent: np.ndarray, sampled: np.ndarray, t: float) -> Image.Image:
    frame = np.clip(latent[0] * (1 - t) + sampled[0] * t, 0, 1)
    return Image.fromarray(imaging.to_uint8(frame))


def common_ksampler(ctx, model, seed, steps, positive, latent, denoise, add_noise=True, start=None, end=None):
    """sampled = latent*(1-d) + noise*d; with a noise_mask only the masked area changes.

    Emits one progress message per step (honouring step_delay, /interrupt and hang_next)."""
    x = np.asarray(latent["samples"], dtype=np.float32)
    run_steps = steps
    effective = float(denoise)
    if start is not None or end is not None:
        first = start or 0
        last = min(end if end is not None else steps, steps)
        run_steps = max(0, last - first)
        effective = run_steps / steps if steps else 0.0
    if run_steps <= 0 or effective <= 0:
        return ({**latent, "samples": x.copy()},)

    if add_noise:
        noise = _seed_noise(seed, x.shape, latent.get("batch_index"))
    else:
        noise = x.copy()
    noise = _perturb(noise, model, positive)
    sampled = x * (1.0 - effective) + noise * effective

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
        out_samples = x * (1.0 - m) + sampled * m
    out = dict(latent)
    out["samples"] = out_samples.astype(np.float32)
    return (out,)


class KSampler(Node):
    def run(self, ctx, model, seed, steps, cfg, sampler_name, scheduler, positive, negative, latent_image,
            denoise=1.0):
        return common_ksampler(ctx, model, seed, steps, positive, latent_image, denoise)


class KSamplerAdvanced(Node):
    def run(self, ctx, model, add_noise, noise_seed, steps, cfg, sampler_name, scheduler, positive, negative,
            latent_image, start_at_step, end_at_step, return_with_leftover_noise, denoise=1.0):
        return common_ksampler(ctx, model, noise_seed, steps, positive, latent_image, denoise,
                               add_noise=(add_noise != "disable"), start=start_at_step, end=end_at_step)


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


class Canny(Node):
    """Any deterministic edge map: Sobel magnitude of luminance with the two thresholds."""

    def run(self, ctx, image, low_threshold, high_threshold):
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


NODE_CLASSES: dict[str, type[Node]] = {cls.__name__: cls for cls in (
    CheckpointLoaderSimple, CLIPTextEncode, CLIPSetLastLayer, LoadImage, LoadImageMask, VAEEncode,
    VAEEncodeForInpaint, VAEDecode, SetLatentNoiseMask, RepeatLatentBatch, EmptyLatentImage, LatentUpscale,
    KSampler, KSamplerAdvanced, SaveImage, PreviewImage, ImageScale, ImageCrop, ImageCompositeMasked,
    ImageInvert, ImagePadForOutpaint, MaskToImage, ImageToMask, InvertMask, GrowMask, SolidMask, LoraLoader,
    ControlNetLoader, ControlNetApplyAdvanced, SetUnionControlNetType, Canny, UpscaleModelLoader)}
