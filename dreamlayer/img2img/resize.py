"""AUTOMATIC1111's resize modes for an img2img input whose output size differs from its own
(Pillow; the mask goes through the same function, so it follows the image).

0 "Just resize": stretch to the size. 1 "Crop and resize": scale to cover, centre-crop.
2 "Resize and fill": scale to fit, centre, and fill the bands with the image's edge rows or
columns stretched across them. 3 "Just resize (latent upscale)" is done in the workflow
(LatentUpscale after the encode), so it is not here.
"""
from __future__ import annotations

from PIL import Image

JUST_RESIZE, CROP_AND_RESIZE, RESIZE_AND_FILL, LATENT_UPSCALE = 0, 1, 2, 3


def resize_image(mode: int, im: Image.Image, size: tuple) -> Image.Image:
    """``im`` at ``size`` (w, h) under resize mode 0, 1 or 2 (A1111's ``images.resize_image``)."""
    width, height = size
    if im.size == (width, height):
        return im
    resample = Image.LANCZOS if im.mode in ("RGB", "RGBA", "L") else Image.NEAREST
    if mode == JUST_RESIZE:
        return im.resize((width, height), resample)
    ratio, src_ratio = width / height, im.width / im.height
    if mode == CROP_AND_RESIZE:
        src_w = width if ratio > src_ratio else im.width * height // im.height
        src_h = height if ratio <= src_ratio else im.height * width // im.width
        resized = im.resize((src_w, src_h), resample)
        out = Image.new(im.mode, (width, height))
        out.paste(resized, (width // 2 - src_w // 2, height // 2 - src_h // 2))
        return out
    if mode != RESIZE_AND_FILL:
        raise ValueError(f"resize mode {mode} is not a Pillow resize")
    src_w = width if ratio < src_ratio else im.width * height // im.height
    src_h = height if ratio >= src_ratio else im.height * width // im.width
    resized = im.resize((src_w, src_h), resample)
    out = Image.new(im.mode, (width, height))
    left, top = width // 2 - src_w // 2, height // 2 - src_h // 2
    out.paste(resized, (left, top))
    # each band on its own: an odd total of 1 px is all on one side (AUTOMATIC1111 fills both
    # only when the first is not empty, and so leaves that pixel black)
    bottom, right = height - (top + src_h), width - (left + src_w)
    if top > 0:  # bands above and below: the first and last rows, stretched
        out.paste(resized.crop((0, 0, src_w, 1)).resize((width, top)), (0, 0))
    if bottom > 0:
        out.paste(resized.crop((0, src_h - 1, src_w, src_h)).resize((width, bottom)), (0, top + src_h))
    if left > 0:  # bands left and right: the first and last columns
        out.paste(resized.crop((0, 0, 1, src_h)).resize((left, height)), (0, 0))
    if right > 0:
        out.paste(resized.crop((src_w - 1, 0, src_w, src_h)).resize((right, height)), (left + src_w, 0))
    return out
