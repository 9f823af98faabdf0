"""A finished run's HTTP uploads are made small (temp_uploads.UploadShrinker), against the fake
ComfyUI over real HTTP."""
from __future__ import annotations

import pytest
from PIL import Image

from dreamlayer.comfyui.client import ComfyClient
from dreamlayer.comfyui.errors import ComfyError
from dreamlayer.img2img.staging import InputStager
from dreamlayer.img2img.temp_uploads import PLACEHOLDER, UploadShrinker, shrink_lost_uploads
from images import gradient, png


def test_a_stagers_uploads_are_overwritten_with_a_tiny_png_when_it_ends_and_only_then(fake_comfy):
    client, shrinker = ComfyClient(fake_comfy.url), UploadShrinker()
    data = png(gradient(64, 48))
    try:
        with InputStager(client, None, shrinker) as stager:
            ref = stager.put("img2img_abc_image.png", data)
            assert ref == "dreamlayer_img2img/img2img_abc_image.png [temp]"
            path = fake_comfy.temp_dir / "dreamlayer_img2img" / "img2img_abc_image.png"
            assert path.read_bytes() == data  # what the run reads
        shrinker.join()
        assert path.read_bytes() == PLACEHOLDER and len(PLACEHOLDER) < 100
        with Image.open(path) as im:
            assert im.size == (1, 1)
    finally:
        shrinker.close()
        client.close()


def test_a_backend_that_went_away_is_skipped_without_holding_anything_up(fake_comfy):
    client, shrinker = ComfyClient(fake_comfy.url), UploadShrinker()
    try:
        with InputStager(client, None, shrinker) as stager:
            stager.put("img2img_def_image.png", png(gradient(8, 8)))
            fake_comfy.refuse_connections()
        shrinker.join()  # dealt with: the failure is skipped (a restarted ComfyUI empties temp/)
        assert (fake_comfy.temp_dir / "dreamlayer_img2img" / "img2img_def_image.png").read_bytes() != PLACEHOLDER
        fake_comfy.accept_connections()
        with InputStager(client, None, shrinker) as stager:  # and the thread goes on working
            stager.put("img2img_ghi_image.png", png(gradient(8, 8)))
        shrinker.join()
        assert (fake_comfy.temp_dir / "dreamlayer_img2img" / "img2img_ghi_image.png").read_bytes() == PLACEHOLDER
    finally:
        shrinker.close()
        client.close()


def test_a_lost_runs_uploads_are_made_small_where_they_are_and_nothing_is_created_elsewhere(fake_comfy):
    """shrink_lost_uploads, for a run whose process died: HEAD /view finds what it had uploaded
    (a ControlNet image may be missing between others), and a backend without its image never
    had its inputs: nothing is written there."""
    client, sub = ComfyClient(fake_comfy.url), "dreamlayer_img2img"
    names = [f"img2img_lost_{n}.png" for n in ("image", "mask", "control0", "control1")]
    folder = fake_comfy.temp_dir / sub
    try:
        for name in (names[0], names[1], names[3]):
            client.upload_image(png(gradient(16, 16)), name, subfolder=sub, type="temp")
        other = "img2img_other_image.png"
        client.upload_image(png(gradient(16, 16)), other, subfolder=sub, type="temp")
        assert shrink_lost_uploads(client, names, sub) == 3
        assert [(folder / n).read_bytes() == PLACEHOLDER for n in (names[0], names[1], names[3])] == [True] * 3
        assert not (folder / names[2]).exists() and (folder / other).read_bytes() != PLACEHOLDER

        elsewhere = [f"img2img_never_{n}.png" for n in ("image", "mask")]
        assert shrink_lost_uploads(client, elsewhere, sub) == 0
        assert not any((folder / n).exists() for n in elsewhere)

        fake_comfy.refuse_connections()
        with pytest.raises(ComfyError):  # the caller logs it and goes on
            shrink_lost_uploads(client, names, sub)
    finally:
        fake_comfy.accept_connections()
        client.close()
