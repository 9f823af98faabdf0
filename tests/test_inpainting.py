"""The service-side image work around a run: planning, padding, cropping and pasting back."""
import numpy as np
import pytest
from PIL import Image

from dreamlayer.img2img import inpainting as I
from images import box_mask, gradient


def noise(size, seed=0):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def a(im):
    return np.asarray(im, dtype=np.int16)


def test_sizes_are_padded_to_multiples_of_8_and_restored():
    src = gradient(203, 141)
    p = I.plan(src.size, None)
    assert p.padded_size == (208, 144) and p.work_size == (203, 141)
    gen, keep = I.prepare(src, None, p)
    assert gen.size == (208, 144) and keep is None
    assert (a(gen)[:141, :203] == a(src)).all()
    assert (a(gen)[:141, 207] == a(src)[:, 202]).all()
    out = I.finish(gen, src, None, p)
    assert out.size == src.size and (a(out) == a(src)).all()


def test_width_height_without_mask_set_the_output_size():
    p = I.plan((300, 200), None, width=100, height=60)
    gen, _ = I.prepare(gradient(300, 200), None, p)
    assert gen.size == (104, 64)
    assert I.finish(gen, gradient(300, 200), None, p).size == (100, 60)


def test_padding_is_never_inpainted():
    keep = box_mask((21, 13), (0, 0, 21, 13))  # everything inpainted
    p = I.plan(keep.size, keep)
    _, gen_keep = I.prepare(gradient(21, 13), keep, p)
    k = np.asarray(gen_keep)
    assert (k[:13, :21] == 0).all() and (k[13:, :] == 255).all() and (k[:, 21:] == 255).all()


@pytest.mark.parametrize("blur", [0, 2, 4])
def test_paste_back_keeps_far_pixels_exact(blur):
    src, box = gradient(96, 80), (24, 20, 72, 60)
    keep = box_mask(src.size, box)
    p = I.plan(src.size, keep, mask_blur=blur)
    out = a(I.finish(noise(p.padded_size), src, keep, p))
    inp = a(src)
    far = np.ones((80, 96), bool)
    far[max(0, box[1] - 3 * blur):box[3] + 3 * blur, max(0, box[0] - 3 * blur):box[2] + 3 * blur] = False
    assert (out[far] == inp[far]).all()
    core = np.zeros((80, 96), bool)
    core[box[1] + 3 * blur:box[3] - 3 * blur, box[0] + 3 * blur:box[2] - 3 * blur] = True
    assert (out[core] != inp[core]).any(-1).mean() > 0.95


def test_blur_band_is_about_mask_blur_wide():
    keep = Image.new("L", (120, 10), 255)
    keep.paste(0, (60, 0, 120, 10))
    alpha = np.asarray(I.paste_mask(keep, 4))[5]
    partial = np.nonzero((alpha > 0) & (alpha < 255))[0]
    assert partial.min() >= 60 - 3 * 4 and partial.max() <= 60 + 3 * 4
    assert np.asarray(I.paste_mask(keep, 0))[5].tolist() == [0] * 60 + [255] * 60


def test_only_masked_crop_box_has_the_generation_aspect_and_stays_inside():
    keep = box_mask((400, 300), (100, 100, 120, 110))
    box = I.crop_box_for(keep, 32, 1.0)
    w, h = box[2] - box[0], box[3] - box[1]
    assert w == h and box[0] <= 68 and box[2] >= 152
    edge = I.crop_box_for(box_mask((400, 300), (0, 0, 10, 10)), 32, 2.0)
    assert edge[0] == 0 and edge[1] == 0 and (edge[2] - edge[0]) == 2 * (edge[3] - edge[1])


def test_only_masked_pastes_into_the_original_at_full_size():
    src, box = gradient(300, 200), (140, 90, 160, 110)
    keep = box_mask(src.size, box)
    p = I.plan(src.size, keep, area="only_masked", padding=16, width=128, height=128, mask_blur=0)
    gen, gen_keep = I.prepare(src, keep, p)
    assert gen.size == (128, 128) and gen_keep.size == (128, 128)
    out = a(I.finish(noise((128, 128)), src, keep, p))
    assert out.shape == (200, 300, 3)
    outside = np.ones((200, 300), bool)
    outside[box[1]:box[3], box[0]:box[2]] = False
    assert (out[outside] == a(src)[outside]).all()
    assert (out[~outside] != a(src)[~outside]).any(-1).mean() > 0.9


def test_only_masked_without_paste_back_pastes_the_rectangle():
    src, box = gradient(300, 200), (140, 90, 160, 110)
    keep = box_mask(src.size, box)
    p = I.plan(src.size, keep, area="only_masked", padding=16, width=64, height=64, paste_back=False)
    out = a(I.finish(noise((64, 64)), src, keep, p))
    l, t, r, b = p.box
    assert (out[:t] == a(src)[:t]).all() and (out[b:] == a(src)[b:]).all()
    assert (out[t:b, l:r] != a(src)[t:b, l:r]).any(-1).mean() > 0.9


def test_untouched_output_is_passed_through_as_is():
    import io
    buf = io.BytesIO()
    gradient(64, 48).save(buf, "PNG")
    p = I.plan((64, 48), None)
    assert I.finish_png(buf.getvalue(), gradient(64, 48), None, p) == buf.getvalue()
