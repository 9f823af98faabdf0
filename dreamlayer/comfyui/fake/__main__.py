"""Run the fake ComfyUI on its own: ``python -m dreamlayer.comfyui.fake --host 127.0.0.1 --port 8188 --root DIR``. start_dream_layer --demo uses it so that the whole request path can be
tried on a machine without a GPU or ComfyUI. It is a stand-in that runs no diffusion model.
"""
from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading

from .fake import FakeComfyUI

BANNER = ("FAKE ComfyUI — a test stand-in from dreamlayer/comfyui/fake, NOT ComfyUI. It runs no "
          "diffusion model: the images it returns are synthetic.")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dreamlayer.comfyui.fake", description=BANNER)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8188)
    parser.add_argument("--root", required=True, help="folder for its input/, output/ and temp/")
    parser.add_argument("--step-delay", type=float, default=None,
                        help="seconds per sampler step (makes progress visible)")
    parser.add_argument("--custom-nodes", nargs="*", default=(), metavar="PACK",
                        help="custom node packs to load (off by default, like --disable-all-custom-nodes): "
                             "facerestore_cf")
    args = parser.parse_args(argv)

    stop = threading.Event()
    for name in ("SIGINT", "SIGTERM", "SIGBREAK"):
        if hasattr(signal, name):
            signal.signal(getattr(signal, name), lambda signum, frame: stop.set())

    fake = FakeComfyUI(args.root, custom_nodes=tuple(args.custom_nodes))
    fake.host = args.host
    if args.step_delay is not None:
        fake.step_delay = args.step_delay
    fake.start()  # FakeComfyUI binds a free port; move it to the one asked for
    try:
        fake.refuse_connections()
        fake.port = args.port
        fake.accept_connections()
    except OSError as exc:
        fake.stop()
        print(f"fake_comfyui: cannot listen on {args.host}:{args.port}: {exc}", file=sys.stderr)
        return 1
    # logging from here on: the fake's own "listening on" line names the temporary port
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    print(f"{BANNER}\nListening on {fake.url} (root {fake.folders.root}). Ctrl-C stops it.", flush=True)
    try:
        while not stop.wait(0.5):
            pass
    finally:
        fake.stop()
    print("fake ComfyUI stopped", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
