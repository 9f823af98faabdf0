"""The floor: a minimal ComfyUI client in the style of ComfyUI's
script_examples/websockets_api_example.py, for benchmarks/run.py to measure beside the service.

Per request it does only what any img2img client must: write the input image and an alpha mask
(the mask as LoadImageMask(channel="alpha") reads it) into ComfyUI's input folder, queue an
img2img / inpainting workflow over a WebSocket that is already open, wait for its prompt's end,
and read the output file from ComfyUI's output folder. No validation, no paste-back, no cleanup
guarantees: what the service adds on top of this is its own cost.
"""
from __future__ import annotations

import io
import json
import uuid
from pathlib import Path

import requests
import websocket
from PIL import Image


def alpha_mask_png(mask_png: bytes) -> bytes:
    """White = keep, black = inpaint, as LoadImageMask(channel="alpha") needs it (1 - alpha)."""
    keep = Image.open(io.BytesIO(mask_png)).convert("L")
    out = io.BytesIO()
    Image.merge("LA", (keep, keep)).save(out, format="PNG", compress_level=1)
    return out.getvalue()


def workflow(image: str, mask: str | None, seed: int, steps: int, ckpt: str, prefix: str) -> dict:
    wf = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt}},
        "2": {"class_type": "LoadImage", "inputs": {"image": image}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"text": "a photo", "clip": ["1", 1]}},
        "4": {"class_type": "CLIPTextEncode", "inputs": {"text": "blurry", "clip": ["1", 1]}},
        "5": {"class_type": "VAEEncode", "inputs": {"pixels": ["2", 0], "vae": ["1", 2]}},
        "6": {"class_type": "KSampler", "inputs": {"model": ["1", 0], "positive": ["3", 0], "negative": ["4", 0],
                                                   "latent_image": ["5", 0], "seed": seed, "steps": steps, "cfg": 7.0,
                                                   "sampler_name": "euler", "scheduler": "normal", "denoise": 0.75}},
        "7": {"class_type": "VAEDecode", "inputs": {"samples": ["6", 0], "vae": ["1", 2]}},
        "8": {"class_type": "SaveImage", "inputs": {"images": ["7", 0], "filename_prefix": prefix}},
    }
    if mask is not None:
        wf["9"] = {"class_type": "LoadImageMask", "inputs": {"image": mask, "channel": "alpha"}}
        wf["5"] = {"class_type": "VAEEncodeForInpaint", "inputs": {"pixels": ["2", 0], "vae": ["1", 2],
                                                                  "mask": ["9", 0], "grow_mask_by": 6}}
        wf["6"]["inputs"]["denoise"] = 1.0
    return wf


class FloorClient:
    def __init__(self, url: str, input_dir: str, output_dir: str, ckpt: str):
        self.url, self.input_dir, self.output_dir, self.ckpt = url, Path(input_dir), Path(output_dir), ckpt
        self.client_id = uuid.uuid4().hex
        self.session = requests.Session()
        self.ws = websocket.create_connection(f"{url.replace('http', 'ws', 1)}/ws?clientId={self.client_id}")

    def close(self):
        self.ws.close()

    def run(self, image_png: bytes, mask_png: bytes | None, seed: int, steps: int) -> tuple:
        """(prompt_id, output bytes) for one request."""
        name = uuid.uuid4().hex
        (self.input_dir / f"floor_{name}.png").write_bytes(image_png)
        mask = None
        if mask_png is not None:
            mask = f"floor_{name}_mask.png"
            (self.input_dir / mask).write_bytes(alpha_mask_png(mask_png))
        prompt = workflow(f"floor_{name}.png", mask, seed, steps, self.ckpt, f"floor_{name}")
        resp = self.session.post(f"{self.url}/prompt", json={"prompt": prompt, "client_id": self.client_id})
        prompt_id = resp.json()["prompt_id"]
        images = []
        while True:
            frame = self.ws.recv()
            if not isinstance(frame, str):
                continue  # previews
            message = json.loads(frame)
            data = message.get("data", {})
            if data.get("prompt_id") != prompt_id:
                continue
            if message["type"] == "executed":
                images += data["output"].get("images", [])
            elif message["type"] == "execution_success":
                break
            elif message["type"] in ("execution_error", "execution_interrupted"):
                raise RuntimeError(f"floor prompt failed: {message}")
        out = images[0]
        return prompt_id, (self.output_dir / out["subfolder"] / out["filename"]).read_bytes()
