"""The real img2img service for the benchmark: ``img2img_server.main()`` unchanged (waitress,
configuration from the environment, INFO logging), in a process of its own.

    python benchmarks/service.py [--wait websocket|poll2s]

``--wait poll2s`` swaps ComfyClient.run for DreamLayer's old loop (shared_utils.wait_for_image:
queue the prompt, then GET /queue — and /history once the prompt has left the queue — every
2 seconds). Everything else in the request path stays the same, so the difference between the two
services is the wait alone.
"""
from __future__ import annotations

import argparse
import sys
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from dreamlayer.comfyui import client as comfy_client  # noqa: E402
from dreamlayer.comfyui.errors import ComfyTimeout  # noqa: E402
from dreamlayer.comfyui.protocol import RunResult, queue_ids, raise_for_history  # noqa: E402
from dreamlayer.img2img import app as img2img_server  # noqa: E402

POLL_SECONDS = 2.0


class DreamLayerPollingClient(comfy_client.ComfyClient):
    """ComfyClient whose run() waits the way DreamLayer's img2img server did: no WebSocket,
    GET /queue right after queueing and then every 2 s; GET /history once the prompt left the queue."""

    def run(self, prompt, *, timeout, on_progress=None, on_queued=None, cancel_on_timeout=True):
        deadline = time.monotonic() + timeout
        prompt_id = self.queue_prompt(prompt, str(uuid.uuid4()))
        if on_queued is not None:
            on_queued(prompt_id)
        while time.monotonic() < deadline:
            queue = self.get_queue()
            queued = queue_ids(queue, "queue_running") | queue_ids(queue, "queue_pending")
            if prompt_id not in queued:
                entry = self.get_history(prompt_id)
                if entry is not None:
                    raise_for_history(prompt_id, entry)
                    return RunResult(prompt_id, self.output_images(entry), entry, "polling")
            time.sleep(POLL_SECONDS)
        raise ComfyTimeout(timeout)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--wait", choices=("websocket", "poll2s"), default="websocket")
    args = parser.parse_args(argv)
    if args.wait == "poll2s":
        comfy_client.ComfyClient = DreamLayerPollingClient  # create_app() builds its client from here
    return img2img_server.main([])


if __name__ == "__main__":
    sys.exit(main())
