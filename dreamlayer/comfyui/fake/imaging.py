"""Numpy stand-ins for the few torch operations ComfyUI's image nodes rely on.

Masks and images are resized with torch's rules in ComfyUI (bilinear with align_corners=False,
"nearest-exact", adaptive "area"); reproducing them keeps the fake's pixel results close enough
that mask-placement tests mean something. Arrays are float32, channels last like ComfyUI's IMAGE.
"""
from __future__ import annotations

import math

import numpy as np
from PIL import Image


def _linear_weights(n_in: int, n_out: int):
    """Source indices and weights of torch's bilinear (align_corners=False) along one axis."""
    scale = n_in / n_out
    src = (np.arange(n_out, dtype=np.float64) + 0.5) * scale - 0.5
    src = np.maximum(src, 0.0)
    lo = np.minimum(np.floor(src).astype(np.int64), n_in - 1)
    hi = np.minimum(lo + 1, n_in - 1)
    frac = (src - lo).astype(np.float32)
    return lo, hi, frac


def resize_bilinear(a: np.ndarray, height: int, width: int) -> np.ndarray:
    """Resize the two axes (-2, -1) of `a` like torch.nn.functional.interpolate(mode="bilinear")."""
    a = np.asarray(a, dtype=np.float32)
    h, w = a.shape[-2], a.shape[-1]
    if (h, w) == (height, width):
        return a.copy()
    lo, hi, f = _linear_weights(h, height)
    a = a[..., lo, :] * (1 - f)[:, None] + a[..., hi, :] * f[:, None]
    lo, hi, f = _linear_weights(w, width)
    a = a[..., lo] * (1 - f) + a[..., hi] * f
    return a.astype(np.float32)


def resize_nearest_exact(a: np.ndarray, height: int, width: int) -> np.ndarray:
    h, w = a.shape[-2], a.shape[-1]
    rows = np.minimum(np.floor((np.arange(height) + 0.5) * (h / height)).astype(np.int64), h - 1)
    cols = np.minimum(np.floor((np.arange(width) + 0.5) * (w / width)).astype(np.int64), w - 1)
    return np.asarray(a, dtype=np.float32)[..., rows, :][..., cols]


def _area_axis(a: np.ndarray, n_out: int, axis: int) -> np.ndarray:
    n_in = a.shape[axis]
    a = np.moveaxis(a, axis, -1)
    out = np.empty(a.shape[:-1] + (n_out,), dtype=np.float32)
    for i in range(n_out):
        start = (i * n_in) // n_out
        end = -((-(i + 1) * n_in) // n_out)
        out[..., i] = a[..., start:end].mean(axis=-1)
    return np.moveaxis(out, -1, axis)


def resize_area(a: np.ndarray, height: int, width: int) -> np.ndarray:
    """torch adaptive average pooling ("area")."""
    a = np.asarray(a, dtype=np.float32)
    return _area_axis(_area_axis(a, height, a.ndim - 2), width, a.ndim - 1)


def _resize_pil(a: np.ndarray, height: int, width: int, resample) -> np.ndarray:
    """Per-plane float resize through PIL (mode F), for bicubic."""
    a = np.asarray(a, dtype=np.float32)
    lead = a.shape[:-2]
    planes = a.reshape((-1,) + a.shape[-2:])
    out = [np.asarray(Image.fromarray(p, mode="F").resize((width, height), resample=resample), dtype=np.float32)
           for p in planes]
    return np.stack(out).reshape(lead + (height, width))


def resize_lanczos(a: np.ndarray, height: int, width: int) -> np.ndarray:
    """comfy.utils.lanczos: each image goes to 8 bits (clip(255 * x), truncated), Pillow resizes it
    with LANCZOS (in 8 bits: it clamps between its horizontal and vertical passes), then back to
    0..1. Pillow resamples the bands of an RGB image alike, so plane by plane ("L") is the same."""
    a = np.asarray(a, dtype=np.float32)
    lead = a.shape[:-2]
    planes = np.clip(255.0 * a, 0, 255).astype(np.uint8).reshape((-1,) + a.shape[-2:])
    out = [np.asarray(Image.fromarray(p).resize((width, height), resample=Image.Resampling.LANCZOS))
           for p in planes]
    return (np.stack(out).astype(np.float32) / 255.0).reshape(lead + (height, width))


def resize_planes(a: np.ndarray, height: int, width: int, method: str) -> np.ndarray:
    """Resize axes (-2, -1) with one of ComfyUI's upscale_method names."""
    if method == "nearest-exact":
        return resize_nearest_exact(a, height, width)
    if method == "area":
        return resize_area(a, height, width)
    if method == "bicubic":
        return _resize_pil(a, height, width, Image.Resampling.BICUBIC)
    if method == "lanczos":
        return resize_lanczos(a, height, width)
    return resize_bilinear(a, height, width)  # bilinear, and bislerp approximated by it


def center_crop_margins(old_w: int, old_h: int, new_w: int, new_h: int) -> tuple:
    """comfy.utils.common_upscale's crop="center": the (x, y) cut off each side to reach the
    new aspect (Python's round, as there)."""
    old_aspect, new_aspect = old_w / old_h, new_w / new_h
    x = y = 0
    if old_aspect > new_aspect:
        x = round((old_w - old_w * (new_aspect / old_aspect)) / 2)
    elif old_aspect < new_aspect:
        y = round((old_h - old_h * (old_aspect / new_aspect)) / 2)
    return x, y


def common_upscale(image: np.ndarray, width: int, height: int, method: str, crop: str) -> np.ndarray:
    """comfy.utils.common_upscale for channels-last images [B,H,W,C]."""
    planes = np.moveaxis(image, -1, 1)  # B,C,H,W
    if crop == "center":
        old_h, old_w = planes.shape[-2], planes.shape[-1]
        x, y = center_crop_margins(old_w, old_h, width, height)
        planes = planes[..., y:old_h - y, x:old_w - x]
    return np.moveaxis(resize_planes(planes, height, width, method), 1, -1).astype(np.float32)


def box_grow(mask: np.ndarray, size: int) -> np.ndarray:
    """conv2d(mask, ones(size,size), padding=ceil((size-1)/2)) over [N,1,H,W], like VAEEncodeForInpaint.

    With an even kernel the output is one pixel larger than the input; the caller crops, as
    ComfyUI does, which shifts the grown mask by half a pixel towards the top-left.
    """
    pad = math.ceil((size - 1) / 2)
    p = np.pad(mask.astype(np.float64), [(0, 0)] * (mask.ndim - 2) + [(pad, pad), (pad, pad)])
    c = p.cumsum(axis=-2).cumsum(axis=-1)
    c = np.pad(c, [(0, 0)] * (mask.ndim - 2) + [(1, 0), (1, 0)])
    out = c[..., size:, size:] - c[..., :-size, size:] - c[..., size:, :-size] + c[..., :-size, :-size]
    return out.astype(np.float32)


def grey_morph(m: np.ndarray, footprint: np.ndarray, dilate: bool) -> np.ndarray:
    """scipy.ndimage.grey_dilation / grey_erosion with a 3x3 footprint (edges replicated)."""
    p = np.pad(m, 1, mode="edge")
    h, w = m.shape
    shifted = [p[dy:dy + h, dx:dx + w] for dy in range(3) for dx in range(3) if footprint[dy, dx]]
    stack = np.stack(shifted)
    return (stack.max(axis=0) if dilate else stack.min(axis=0)).astype(np.float32)


def to_uint8(image_hwc: np.ndarray) -> np.ndarray:
    """SaveImage's 8-bit conversion: clip(255*x) then truncate (astype), not round."""
    return np.clip(255.0 * image_hwc, 0, 255).astype(np.uint8)


def box_blur3(image_bhwc: np.ndarray) -> np.ndarray:
    """3x3 mean over H and W of [B,H,W,C] with edges replicated."""
    p = np.pad(np.asarray(image_bhwc, dtype=np.float32), ((0, 0), (1, 1), (1, 1), (0, 0)), mode="edge")
    h, w = image_bhwc.shape[1], image_bhwc.shape[2]
    acc = np.zeros(image_bhwc.shape, dtype=np.float32)
    for dy in range(3):
        for dx in range(3):
            acc += p[:, dy:dy + h, dx:dx + w, :]
    return (acc / 9.0).astype(np.float32)


def upscale_repeat(image_bhwc: np.ndarray, scale: int) -> np.ndarray:
    """Integer nearest-neighbour upscale of [B,H,W,C] (each pixel becomes a scale x scale block)."""
    return np.repeat(np.repeat(image_bhwc, scale, axis=1), scale, axis=2)
