"""Image work done in the service around a ComfyUI run (Pillow only; pure functions).

Before the run: crop to the masked area ("only masked"), resize to the requested size, pad to a
multiple of 8 (ComfyUI's VAE crops each side to a multiple of 8; padding loses nothing).
After the run: undo the padding and scaling and paste the result into the original through the
(blurred) mask, so that pixels outside the mask stay bit-for-bit the original.
Masks here are "keep" luminance images (mode L): 255 = keep, 0 = inpaint.
"""
from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Optional

from PIL import Image, ImageChops, ImageFilter, PngImagePlugin

from dreamlayer.img2img.png_writer import png_bytes

VAE_MULTIPLE = 8


@dataclass(frozen=True)
class Plan:
    """How the image sent to ComfyUI relates to the original."""

    original_size: tuple  # (w, h) of the input image
    box: tuple            # (left, top, right, bottom): the region of the original that is regenerated
    work_size: tuple      # (w, h) the region is scaled to before generation
    padded_size: tuple    # work_size padded up to multiples of 8: what ComfyUI receives
    paste_back: bool
    mask_blur: int
    #: ComfyUI's workflow pastes back and crops itself (img2img_workflow.finish_outputs): its
    #: output already is the final image
    final_from_comfyui: bool = False
    #: Resize mode 3: the encoded input is stretched to this size (w, h) in the latent.
    latent_resize: Optional[tuple] = None
    #: The hires fix upscales the first pass to this size (w, h), padding included.
    hires_size: Optional[tuple] = None
    #: ((w, h), crop) scalings of the generation in the workflow, in order, for the paste-back.
    scale_steps: tuple = ()
    #: The final image's size when the workflow scales the generation (None = work_size).
    output_size: Optional[tuple] = None

    @property
    def final_size(self) -> tuple:
        return tuple(self.output_size or self.work_size)

    @property
    def whole(self) -> bool:
        return self.box == (0, 0, *self.original_size)


def round_up(value: int, multiple: int = VAE_MULTIPLE) -> int:
    return -(-value // multiple) * multiple


def pad_to_multiple(im: Image.Image, size: tuple) -> Image.Image:
    """Pad right and bottom to ``size`` by repeating the edge pixels (no new content at the seam)."""
    if im.size == tuple(size):
        return im
    w, h = im.size
    out = Image.new(im.mode, size)
    out.paste(im, (0, 0))
    if size[0] > w:
        out.paste(im.crop((w - 1, 0, w, h)).resize((size[0] - w, h)), (w, 0))
    if size[1] > h:
        out.paste(out.crop((0, h - 1, size[0], h)).resize((size[0], size[1] - h)), (0, h))
    return out


def inpaint_region(keep: Image.Image) -> tuple | None:
    """Bounding box of the pixels to (partly) inpaint, or None when there are none."""
    return ImageChops.invert(keep).getbbox()


def crop_box_for(keep: Image.Image, padding: int, aspect: float) -> tuple:
    """The masked area plus ``padding``, widened to ``aspect`` (w/h) within the image."""
    iw, ih = keep.size
    left, top, right, bottom = inpaint_region(keep) or (0, 0, iw, ih)
    left, top = max(0, left - padding), max(0, top - padding)
    right, bottom = min(iw, right + padding), min(ih, bottom + padding)
    w, h = right - left, bottom - top
    if w / h < aspect:
        w = min(iw, round(h * aspect))
    else:
        h = min(ih, round(w / aspect))
    cx, cy = (left + right) / 2, (top + bottom) / 2
    left = int(min(max(0, round(cx - w / 2)), iw - w))
    top = int(min(max(0, round(cy - h / 2)), ih - h))
    return left, top, left + w, top + h


def plan(original_size: tuple, keep: Image.Image | None, *, area: str = "whole", padding: int = 32,
         width: int | None = None, height: int | None = None, paste_back: bool = True,
         mask_blur: int = 4) -> Plan:
    """Decide what ComfyUI generates: see the module docstring."""
    full = (0, 0, *original_size)
    if keep is None:
        work = (width or original_size[0], height or original_size[1])
        return Plan(original_size, full, work, (round_up(work[0]), round_up(work[1])), False, 0)
    if area == "only_masked":
        gen = (width or 512, height or 512)
        box = crop_box_for(keep, padding, gen[0] / gen[1])
        return Plan(original_size, box, gen, (round_up(gen[0]), round_up(gen[1])), paste_back, mask_blur)
    return Plan(original_size, full, original_size, (round_up(original_size[0]), round_up(original_size[1])),
                paste_back, mask_blur)


def prepare(image: Image.Image, keep: Image.Image | None, p: Plan) -> tuple:
    """(image, keep mask) as ComfyUI should receive them under plan ``p``."""
    def shape(im, fill_resample):
        region = im if p.whole else im.crop(p.box)
        if region.size != p.work_size:
            region = region.resize(p.work_size, fill_resample)
        return pad_to_multiple(region, p.padded_size)

    gen_image = shape(image, Image.LANCZOS)
    gen_keep = None
    if keep is not None:
        gen_keep = shape(keep, Image.BILINEAR)
        if p.padded_size != p.work_size:  # the padding is never inpainted
            white = Image.new("L", p.padded_size, 255)
            white.paste(gen_keep.crop((0, 0, *p.work_size)), (0, 0))
            gen_keep = white
    return gen_image, gen_keep


def prepare_extra(image: Image.Image, original_size: tuple, p: Plan) -> Image.Image:
    """Another image for the same run (a ControlNet hint) in the generation's geometry: cropped
    and scaled like the input when it has the input's size, else scaled to the generation size."""
    image = image.convert("RGB")
    if image.size == tuple(original_size):
        return prepare(image, None, p)[0]
    return image.resize(p.padded_size, Image.LANCZOS)


def blur_reach(blur: int) -> int:
    """How far (px) Pillow's GaussianBlur(blur) carries a pixel: 3 box-blur passes of radius at
    most blur + 0.5 each, so 3 * (blur + 1) px; two pixels more for safety."""
    return 3 * (blur + 2)


def paste_mask(keep: Image.Image, blur: int) -> Image.Image:
    """Alpha for pasting the result: 255 where inpainted, blurred by ``blur`` px at the edges.

    Only the inpainted area plus the blur's reach is blurred: everywhere else the alpha is 0 and
    stays 0 (the result is the same as blurring the whole image, pixel for pixel)."""
    alpha = ImageChops.invert(keep)
    if blur > 0:
        box = alpha.getbbox()
        if box is None:
            return alpha  # nothing inpainted: a blur of zeros is zeros
        reach = blur_reach(blur)
        width, height = alpha.size
        region = (max(0, box[0] - reach), max(0, box[1] - reach),
                  min(width, box[2] + reach), min(height, box[3] + reach))
        if region == (0, 0, width, height):
            return alpha.filter(ImageFilter.GaussianBlur(blur))
        alpha.paste(alpha.crop(region).filter(ImageFilter.GaussianBlur(blur)), region[:2])
    return alpha


def finish(generated: Image.Image, original: Image.Image, keep: Image.Image | None, p: Plan) -> Image.Image:
    """The final image: generated output mapped back onto the original under plan ``p``."""
    result = generated.convert("RGB")
    if result.size != p.padded_size:  # ComfyUI cropped it after all: scale into place
        result = result.resize(p.padded_size, Image.LANCZOS)
    result = result.crop((0, 0, *p.work_size))
    if keep is None:
        return result
    box_size = (p.box[2] - p.box[0], p.box[3] - p.box[1])
    if result.size != box_size:
        result = result.resize(box_size, Image.LANCZOS)
    if p.whole and not p.paste_back:
        return result
    out = original.copy()
    if not p.paste_back:
        out.paste(result, p.box[:2])
        return out
    alpha = paste_mask(keep, p.mask_blur).crop(p.box)
    region = alpha.getbbox()  # where alpha is 0 the original stays: paste only the rest
    if region is not None:
        out.paste(result.crop(region), (p.box[0] + region[0], p.box[1] + region[1]), alpha.crop(region))
    return out


def comfy_can_finish(p: Plan, masked: bool) -> bool:
    """Whether the workflow can make the final image: a paste-back in place and a crop of the
    padding. "Only masked" (a crop, scaled) is put back into the original by the service."""
    return p.whole and (not masked or p.work_size == p.original_size)


def paste_weight(keep: Image.Image, p: Plan) -> Image.Image:
    """How much of the input to keep at each pixel when pasting back (255 outside the inpainted
    area, 0 inside, the blurred edge between), at the size ComfyUI receives; the padding keeps.
    The inverse of ``paste_mask``: ComfyUI pastes the input over the generated image."""
    weight = ImageChops.invert(paste_mask(keep, p.mask_blur))
    if weight.size != p.padded_size:
        padded = Image.new("L", p.padded_size, 255)
        padded.paste(weight, (0, 0))
        weight = padded
    return weight


def needs_work(generated_size: tuple, keep, p: Plan) -> bool:
    """False when ComfyUI's output already is the final image (no crop, scale or paste)."""
    if p.final_from_comfyui:
        return tuple(generated_size) != p.final_size
    return not (keep is None and p.whole and p.work_size == p.original_size == p.padded_size
                and generated_size == p.padded_size)


def finish_png(data: bytes, original: Image.Image, keep: Image.Image | None, p: Plan) -> bytes:
    """``finish`` on PNG bytes from ComfyUI. Its text chunks (the embedded workflow) are kept;
    an output that needs no work is returned as it came."""
    with Image.open(io.BytesIO(data)) as generated:
        if not needs_work(generated.size, keep, p):
            return data
        generated.load()
        info = PngImagePlugin.PngInfo()
        for key, value in (getattr(generated, "text", None) or {}).items():
            info.add_text(key, value)
        final = finish(generated, original, keep, p)
    return png_bytes(final, chunks=info.chunks)
