"""A finished run's HTTP uploads are made small (temp_uploads.UploadShrinker), against the fake
ComfyUI over real HTTP."""
from __future__ import annotations

from PIL import Image

from dreamlayer.comfyui.client import ComfyClient
from dreamlayer.img2img.staging import InputStager
from dreamlayer.img2img.temp_uploads import PLACEHOLDER, UploadShrinker
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
