"""Makes docs/images/outpaint_before.png and outpaint_after.png for docs/inpainting.md: a drawn
picture outpainted by the service against the project's fake ComfyUI (no GPU, no model).

    python docs/images/make_outpaint_pictures.py
"""
import io
import json
import sys
import tempfile
from pathlib import Path

from PIL import Image, ImageDraw

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent.parent))

from dreamlayer.comfyui.fake import FakeComfyUI  # noqa: E402
from dreamlayer.config.img2img import Config  # noqa: E402
from dreamlayer.img2img.app import create_app  # noqa: E402


def scene() -> Image.Image:
    im = Image.new("RGB", (96, 64), (120, 170, 230))
    draw = ImageDraw.Draw(im)
    draw.rectangle((0, 44, 95, 63), fill=(70, 140, 60))
    draw.polygon([(20, 44), (48, 14), (76, 44)], fill=(110, 100, 95))
    draw.ellipse((70, 6, 84, 20), fill=(250, 220, 90))
    return im


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp, FakeComfyUI(Path(tmp) / "comfy") as fake:
        app = create_app(Config(comfy_api_url=fake.url, comfyui_input_dir=fake.input_dir,
                                served_images_dir=Path(tmp) / "served"))
        before = scene()
        buf = io.BytesIO()
        before.save(buf, "PNG")
        buf.seek(0)
        params = {"prompt": "a wide valley", "steps": 4, "seed": 7, "denoising_strength": 1.0,
                  "outpaint": {"left": 32, "right": 32, "top": 16, "feathering": 8}}
        client = app.test_client()
        resp = client.post("/api/img2img", data={"params": json.dumps(params), "image": (buf, "scene.png")},
                           content_type="multipart/form-data")
        body = resp.get_json()
        if resp.status_code != 200:
            raise SystemExit(f"the service answered {resp.status_code}: {body}")
        name = body["comfy_response"]["generated_images"][0]["filename"]
        after = Image.open(io.BytesIO(client.get("/images/" + name).data)).convert("RGB")
        before.save(HERE / "outpaint_before.png", optimize=True)
        after.save(HERE / "outpaint_after.png", optimize=True)
        print(f"before {before.size}, after {after.size}: written to {HERE}")


if __name__ == "__main__":
    main()
