"""What the service does to a mask before planning, once, so that ComfyUI's noise mask and the
paste-back weights agree: thresholding (anti-aliased editor masks), growing or shrinking, and the
outpainting canvas. Pure: Pillow images ("keep" masks, mode L, 255 = keep, 0 = inpaint) in and out.
"""
from __future__ import annotations

from dataclasses import dataclass

from PIL import Image, ImageChops, ImageFilter

#: The outpainting border is a multiple of this on each side (the VAE works on 8x8 cells).
OUTPAINT_MULTIPLE = 8


@dataclass(frozen=True)
class Outpaint:
    """Pixels added on each side (multiples of 8) and the feathering into the original."""
    left: int = 0
    top: int = 0
    right: int = 0
    bottom: int = 0
    feathering: int = 0

    @property
    def any(self) -> bool:
        return bool(self.left or self.top or self.right or self.bottom)

    def padded_size(self, size: tuple) -> tuple:
        return size[0] + self.left + self.right, size[1] + self.top + self.bottom


def threshold(keep: Image.Image, level: int) -> Image.Image:
    """Binary keep mask: a pixel at ``level`` or brighter keeps, darker is inpainted. For masks
    drawn with an anti-aliased brush, whose grey edge would otherwise be a partial inpaint."""
    return keep.point(lambda v: 255 if v >= level else 0)


def grow(keep: Image.Image, pixels: int) -> Image.Image:
    """Grow the inpainted area by ``pixels`` (negative: shrink it), one pixel per step in all 8
    directions (a square, as ComfyUI's GrowMask with tapered_corners off). Grey levels spread as
    a grey-scale erosion of the keep mask (dilation of the inpaint mask) does."""
    step = ImageFilter.MinFilter(3) if pixels > 0 else ImageFilter.MaxFilter(3)
    for _ in range(abs(pixels)):
        keep = keep.filter(step)
    return keep


def feather_weights(size: tuple, out: Outpaint) -> Image.Image | None:
    """ImagePadForOutpaint's feathering, as a keep mask of the original area: a pixel d px from a
    side that grows (d < feathering) is inpainted by ((feathering - d) / feathering)^2."""
    if out.feathering <= 0:
        return None
    width, height = size
    f = out.feathering
    # one row and one column of distances, then the per-pixel minimum through Pillow
    def ramp(length, near, far):
        values = []
        for i in range(length):
            d = min(i if near else length, (length - 1 - i) if far else length)
            v = ((f - d) / f) ** 2 if d < f else 0.0
            values.append(round(255 * (1 - v)))
        return values
    cols = ramp(width, out.left > 0, out.right > 0)
    rows = ramp(height, out.top > 0, out.bottom > 0)
    col_img = Image.new("L", (width, 1))
    col_img.putdata(cols)
    row_img = Image.new("L", (1, height))
    row_img.putdata(rows)
    return ImageChops.darker(col_img.resize((width, height), Image.NEAREST),
                             row_img.resize((width, height), Image.NEAREST))


def pad_image(image: Image.Image, out: Outpaint) -> Image.Image:
    """The canvas grown by ``out``: the original in place, the new border filled by stretching the
    outermost row / column of pixels outwards (a start the sampler can work from; the border is
    inpainted in full)."""
    width, height = image.size
    canvas = Image.new(image.mode, out.padded_size(image.size))
    canvas.paste(image, (out.left, out.top))
    x0, y0, x1, y1 = out.left, out.top, out.left + width, out.top + height
    cw, ch = canvas.size
    if out.left:
        canvas.paste(canvas.crop((x0, y0, x0 + 1, y1)).resize((out.left, height)), (0, y0))
    if out.right:
        canvas.paste(canvas.crop((x1 - 1, y0, x1, y1)).resize((out.right, height)), (x1, y0))
    if out.top:
        canvas.paste(canvas.crop((0, y0, cw, y0 + 1)).resize((cw, out.top)), (0, 0))
    if out.bottom:
        canvas.paste(canvas.crop((0, y1 - 1, cw, y1)).resize((cw, out.bottom)), (0, y1))
    return canvas


def pad_keep(keep: Image.Image | None, size: tuple, out: Outpaint) -> Image.Image:
    """The keep mask of the grown canvas: the new border is inpainted; the original area keeps
    the given mask (or all of it), less the feathering."""
    inner = keep if keep is not None else Image.new("L", size, 255)
    feather = feather_weights(size, out)
    if feather is not None:
        inner = ImageChops.darker(inner, feather)
    canvas = Image.new("L", out.padded_size(size), 0)
    canvas.paste(inner, (out.left, out.top))
    return canvas
