#!/usr/bin/env python3
"""Smoke test for a running img2img service: one inpainting request, end to end.

    python test_mask_upload.py [--url http://localhost:5004] [--model NAME] [--steps N]

Creates an input image and a mask (black = the area to inpaint), sends them as multipart with
the parameters as an async job, shows a live progress bar from the job's event stream (or, with
--sync, waits on one request), downloads every returned image and checks that it is a PNG of the
input's size. Exits 0 on success, non-zero with the reason otherwise; removes the files it created.
"""
from __future__ import annotations

import argparse
import io
import json
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import requests
from PIL import Image, ImageDraw

WIDTH, HEIGHT = 256, 192


def make_inputs(folder: Path) -> tuple:
    """A colourful input image and a mask that inpaints a centred rectangle."""
    image = Image.new("RGB", (WIDTH, HEIGHT), (40, 90, 160))
    draw = ImageDraw.Draw(image)
    for i in range(0, WIDTH, 16):
        draw.line([(i, 0), (WIDTH - i, HEIGHT)], fill=(230, 180 - i // 2, 60), width=3)
    mask = Image.new("L", (WIDTH, HEIGHT), 255)  # white = keep
    ImageDraw.Draw(mask).rectangle([WIDTH // 4, HEIGHT // 4, 3 * WIDTH // 4, 3 * HEIGHT // 4], fill=0)
    image_path, mask_path = folder / "smoke_image.png", folder / "smoke_mask.png"
    image.save(image_path)
    mask.save(mask_path)
    return image_path, mask_path


class Waiting:
    """Shows that the request is still running (elapsed seconds) until stopped."""

    def __init__(self, stream=sys.stderr):
        self.stream, self._stop = stream, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        start = time.monotonic()
        while not self._stop.wait(0.5):
            self.stream.write(f"\r  waiting for the service ... {time.monotonic() - start:5.1f}s")
            self.stream.flush()
        self.stream.write("\r" + " " * 50 + "\r")

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def progress_bar(value, maximum, width=30) -> str:
    done = int(width * value / maximum) if maximum else 0
    return f"[{'#' * done}{'.' * (width - done)}] {value}/{maximum}"


def follow_job(job: dict, timeout: float, stream=sys.stderr) -> tuple:
    """Read the job's Server-Sent Events, drawing a progress bar; returns (kind, data) of the last."""
    kind, last = None, (None, {})
    with requests.get(job["events_url"], stream=True, timeout=timeout) as resp:
        resp.raise_for_status()
        for line in resp.iter_lines(decode_unicode=True):
            if line.startswith("event: "):
                kind = line[7:]
            elif line.startswith("data: "):
                data = json.loads(line[6:])
                last = (kind, data)
                if kind == "queued":
                    where = data.get("position")
                    stream.write(f"\r  queued{'' if where is None else f' (position {where})'}" + " " * 30)
                elif kind == "progress":
                    stream.write(f"\r  {progress_bar(data['value'], data['max'])} node {data.get('node')}   ")
                stream.flush()
    stream.write("\n")
    return last


def check_image(data: bytes, expected_size: tuple) -> str | None:
    """None if ``data`` is a PNG of ``expected_size``, else what is wrong."""
    if not data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "not a PNG"
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            if im.size != expected_size:
                return f"size {im.size[0]}x{im.size[1]}, expected {expected_size[0]}x{expected_size[1]}"
    except Exception as exc:  # noqa: BLE001 - any decoding failure is the finding
        return f"cannot be decoded: {exc}"
    return None


def run(url: str, model: str | None, steps: int, timeout: float, keep: bool, sync: bool = False) -> int:
    url = url.rstrip("/")
    folder = Path(tempfile.mkdtemp(prefix="dreamlayer-smoke-"))
    try:
        image_path, mask_path = make_inputs(folder)
        params = {"prompt": "a small wooden cabin, detailed", "negative_prompt": "blurry", "steps": steps,
                  "denoising_strength": 1.0, "seed": 1234, "batch_size": 1}
        if model:
            params["model_name"] = model
        print(f"POST {url}/api/img2img  ({WIDTH}x{HEIGHT} image, mask inpaints the centre, {steps} steps)")
        start = time.monotonic()
        if not sync:
            params["async"] = True
        try:
            with open(image_path, "rb") as img, open(mask_path, "rb") as msk:
                files = {"image": ("image.png", img, "image/png"), "mask": ("mask.png", msk, "image/png")}
                if sync:
                    with Waiting():
                        resp = requests.post(f"{url}/api/img2img", timeout=timeout,
                                             data={"params": json.dumps(params)}, files=files)
                else:
                    resp = requests.post(f"{url}/api/img2img", timeout=60, data={"params": json.dumps(params)},
                                         files=files)
            body = resp.json()
            if resp.status_code == 202:
                kind, body = follow_job(body, timeout)
                if kind != "done":
                    print(f"FAIL: the job ended with '{kind}': {body.get('code')}: {body.get('message')}",
                          file=sys.stderr)
                    return 1
        except requests.RequestException as exc:
            print(f"FAIL: cannot reach the service at {url}: {exc}", file=sys.stderr)
            return 2
        except ValueError:
            print(f"FAIL: HTTP {resp.status_code} with a body that is not JSON", file=sys.stderr)
            return 1
        elapsed = time.monotonic() - start
        if resp.status_code not in (200, 202):
            print(f"FAIL: HTTP {resp.status_code} {body.get('code')}: {body.get('message')}", file=sys.stderr)
            return 1
        images = (body.get("comfy_response") or {}).get("generated_images") or []
        if not images:
            print("FAIL: the response lists no generated images", file=sys.stderr)
            return 1
        problems = []
        for i, item in enumerate(images):
            got = requests.get(item["url"], timeout=30)
            problem = (f"HTTP {got.status_code}" if not got.ok else check_image(got.content, (WIDTH, HEIGHT)))
            if problem:
                problems.append(f"{item['url']}: {problem}")
            else:
                (folder / f"result_{i}.png").write_bytes(got.content)
        for warning in body.get("warnings") or []:
            print(f"  warning: {warning}")
        print(f"{len(images)} image(s) in {elapsed:.1f}s, seed {body.get('seed')}, run {body.get('run_id')}")
        for item in images:
            print(f"  {item['url']}")
        if problems:
            print("FAIL: " + "; ".join(problems), file=sys.stderr)
            return 1
        print("OK: every image is a PNG of the input's size")
        if keep:
            print(f"kept the files in {folder}")
        return 0
    finally:
        if not keep:
            shutil.rmtree(folder, ignore_errors=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--url", default="http://localhost:5004", help="the img2img service (default %(default)s)")
    ap.add_argument("--model", default=None, help="checkpoint file name (default: the service's default)")
    ap.add_argument("--steps", type=int, default=20, help="sampling steps (default %(default)s)")
    ap.add_argument("--timeout", type=float, default=900, help="seconds to wait for the answer")
    ap.add_argument("--keep", action="store_true", help="keep the created and downloaded files")
    ap.add_argument("--sync", action="store_true", help="one synchronous request instead of an async job")
    args = ap.parse_args(argv)
    return run(args.url, args.model, args.steps, args.timeout, args.keep, args.sync)


if __name__ == "__main__":
    sys.exit(main())
