"""P3: the cost of the service's upload handling on one big image, in a fresh process.

    python benchmarks/upload_cost.py --what service|pillow|base64 IMAGE MASK [--repeat N]

Prints one JSON line: {"what", "seconds": [...], "peak_bytes", "decoded_bytes", ...}.

- ``service``: what Img2ImgService.generate() does to the uploads before it hands them to
  ComfyUI, with the service's own functions and a default request's parameters:
  uploads.decode_image, uploads.decode_mask, inpainting.plan, inpainting.prepare,
  png_writer.png_bytes (the image, unless png_reader stored it already), inpainting.paste_weight
  and png_writer.comfy_mask_png (the mask).
- ``pillow``: the floor: Pillow's bare Image.open().load() of both files and a PNG encode of each
  at the service's compression level (png_writer.PNG_COMPRESS_LEVEL), nothing else.
- ``base64``: the extra step of the JSON (frontend) form: uploads.decode_base64_image of both
  data URLs, before the ``service`` step.

Peak memory is the process's peak resident set size during the first run minus its resident set
size just before it (Linux: /proc/self/clear_refs resets the peak, /proc/self/status VmHWM
reads it), with the upload bytes already in memory. Image buffers are Pillow's own mallocs, which
tracemalloc does not see; RSS does. The timed runs follow (median is what counts).
"""
from __future__ import annotations

import argparse
import base64
import gc
import io
import json
import re
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from PIL import Image  # noqa: E402

from dreamlayer.img2img import inpainting  # noqa: E402
from dreamlayer.img2img import png_writer, uploads  # noqa: E402
from dreamlayer.config.img2img import Config  # noqa: E402
from dreamlayer.img2img.params import parse_params  # noqa: E402

CONFIG = Config()


def _status(field: str) -> int:
    text = Path("/proc/self/status").read_text()
    return int(re.search(field + r":\s+(\d+) kB", text).group(1)) * 1024


def _reset_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def service(image: bytes, mask: bytes) -> tuple:
    params = parse_params({"prompt": "x", "seed": 1})
    decoded = uploads.decode_image(image, max_pixels=CONFIG.max_image_pixels)
    keep = uploads.decode_mask(mask, size=decoded.image.size, max_bytes=CONFIG.max_mask_bytes,
                               max_pixels=CONFIG.max_image_pixels, invert=params.mask_invert).image
    plan = inpainting.plan(decoded.image.size, keep, area=params.inpaint_area, padding=params.inpaint_padding,
                           width=params.width, height=params.height, paste_back=params.paste_back,
                           mask_blur=params.mask_blur)
    gen_image, gen_keep = inpainting.prepare(decoded.image, keep, plan)
    # generate() hands each to the stager and drops it; an unchanged PNG upload is already stored
    image_png = len(decoded.png if gen_image is decoded.image and decoded.png is not None
                    else png_writer.png_bytes(gen_image))
    # the whole-image paste-back is done by ComfyUI: the mask file carries its weights too
    weight = inpainting.paste_weight(keep, plan) if plan.paste_back and plan.whole else None
    mask_png = len(png_writer.comfy_mask_png(gen_keep, weight))
    return image_png, mask_png


def pillow(image: bytes, mask: bytes) -> tuple:
    sizes = []
    for data in (image, mask):
        im = Image.open(io.BytesIO(data))
        im.load()
        buf = io.BytesIO()
        im.save(buf, format="PNG", compress_level=png_writer.PNG_COMPRESS_LEVEL)
        sizes.append(len(buf.getvalue()))
        del im, buf
    return tuple(sizes)


def base64_step(image_url: str, mask_url: str) -> tuple:
    image = uploads.decode_base64_image(image_url, "input_image")
    mask = uploads.decode_base64_image(mask_url, "mask_image", mask=True)
    return len(image), len(mask)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--what", choices=("service", "pillow", "base64"), required=True)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("image")
    parser.add_argument("mask")
    args = parser.parse_args(argv)

    image, mask = Path(args.image).read_bytes(), Path(args.mask).read_bytes()
    with Image.open(io.BytesIO(image)) as im:
        width, height = im.size
    if args.what == "base64":
        inputs = ("data:image/png;base64," + base64.b64encode(image).decode(),
                  "data:image/png;base64," + base64.b64encode(mask).decode())
        del image, mask
        fn = base64_step
    else:
        inputs = (image, mask)
        fn = service if args.what == "service" else pillow
    # warm-up on a small image: imports and plugin registration are not per-request costs
    small = io.BytesIO()
    Image.new("RGB", (16, 16), (10, 20, 30)).save(small, format="PNG")
    small_mask = io.BytesIO()
    Image.new("L", (16, 16), 0).save(small_mask, format="PNG")
    if args.what != "base64":
        fn(small.getvalue(), small_mask.getvalue())

    gc.collect()
    peak_ok = _reset_peak()
    before = _status("VmRSS")
    started = time.perf_counter()
    result = fn(*inputs)
    first = time.perf_counter() - started
    peak = _status("VmHWM") - before if peak_ok else None
    seconds = [first]
    for _ in range(max(0, args.repeat - 1)):
        gc.collect()
        started = time.perf_counter()
        fn(*inputs)
        seconds.append(time.perf_counter() - started)
    print(json.dumps({"what": args.what, "seconds": seconds, "peak_bytes": peak, "width": width,
                      "height": height, "decoded_bytes": width * height * 3, "output_sizes": result,
                      "input_sizes": [len(x) for x in inputs]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
