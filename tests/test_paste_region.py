"""inpainting.paste_mask blurs only around the inpainted area and finish pastes only where the
alpha is not 0: both must give exactly what the whole-image operations give."""
from __future__ import annotations

import random

import pytest
from PIL import Image, ImageDraw, ImageFilter, ImageOps

from dreamlayer.img2img import inpainting
from images import box_mask, gradient


def random_keep(rng: random.Random) -> Image.Image:
    w, h = rng.randint(1, 150), rng.randint(1, 150)
    keep = Image.new("L", (w, h), 255)
    draw = ImageDraw.Draw(keep)
    for _ in range(rng.randint(0, 3)):
        x0, y0 = rng.randint(-10, w), rng.randint(-10, h)
        draw.ellipse((x0, y0, x0 + rng.randint(0, 50), y0 + rng.randint(0, 50)),
                     fill=rng.choice([0, 30, 128, 254]))
    if rng.random() < 0.3:
        keep.putpixel((rng.randrange(w), rng.randrange(h)), rng.randint(0, 254))
    return keep


@pytest.mark.parametrize("seed", range(6))
def test_paste_mask_equals_a_whole_image_blur(seed):
    rng = random.Random(seed)
    for _ in range(60):
        keep = random_keep(rng)
        blur = rng.choice([0, 1, 2, 3, 4, 5, 8, 13, 32, 64])
        expected = ImageOps.invert(keep)
        if blur:
            expected = expected.filter(ImageFilter.GaussianBlur(blur))
        assert inpainting.paste_mask(keep, blur).tobytes() == expected.tobytes(), (keep.size, blur)


@pytest.mark.parametrize("area,blur", [("whole", 4), ("whole", 0), ("only_masked", 4), ("only_masked", 16)])
def test_finish_equals_a_whole_image_paste(area, blur):
    original = gradient(96, 80)
    keep = box_mask((96, 80), (30, 20, 50, 44))
    p = inpainting.plan(original.size, keep, area=area, padding=8, width=64, height=64, mask_blur=blur)
    generated = Image.new("RGB", p.padded_size, (250, 5, 120))
    alpha = ImageOps.invert(keep)
    if blur:
        alpha = alpha.filter(ImageFilter.GaussianBlur(blur))
    result = generated.crop((0, 0, *p.work_size))
    box_size = (p.box[2] - p.box[0], p.box[3] - p.box[1])
    if result.size != box_size:
        result = result.resize(box_size, Image.LANCZOS)
    expected = original.copy()
    expected.paste(result, p.box[:2], alpha.crop(p.box))
    assert inpainting.finish(generated, original, keep, p).tobytes() == expected.tobytes()
