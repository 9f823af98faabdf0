"""A bounded load test: 200 requests from 16 threads against the app served by waitress and the
fake ComfyUI (short step delay). Every request must get its own, correct images; nothing may
collide, fail or leak (files, threads, file descriptors, sockets, memory)."""
from __future__ import annotations

import base64
import gc
import io
import json
import threading
import time
import tracemalloc
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import psutil
import requests
from PIL import Image

from corpus.media import multipart
from images import png
from waiting import wait_until

N_REQUESTS = 200
THREADS = 16
WARMUP = 16
HALF = (N_REQUESTS - WARMUP) // 2
#: Threads of the fake ComfyUI (in this process): its loop, its worker, its loop's executor pool.
FAKE_THREADS = ("fake-comfyui", "asyncio_")
#: Short-lived threads of the ComfyUI client (cancelling a timed-out prompt), which outlive the
#: request by a moment: a snapshot waits for them to end. (Its socket worker, "comfy-spare-ws",
#: lives as long as idle sockets are kept: one thread, in both snapshots.)
CLIENT_THREADS = ("comfy-cancel-",)
#: big enough that a leaked image per request (about 1 MB in Pillow) shows in the RSS
SIZES = [(512, 384), (384, 512), (448, 448), (504, 400)]


def colour_of(i: int) -> tuple:
    """A distinct colour per request (the red channel alone differs for every i < 256)."""
    return (i, (i * 37 + 11) % 256, 255 - (i * 91) % 256)


def box_of(size) -> tuple:
    w, h = size
    return (w // 2, h // 2, w - 4, h - 4)  # the inpainted box: lower right


def request_body(i: int):
    size = SIZES[i % len(SIZES)]
    image = png(Image.new("RGB", size, colour_of(i)))
    mask = Image.new("L", size, 255)
    mask.paste(0, box_of(size))
    mask = png(mask)
    params = {"prompt": f"request {i}", "steps": 2, "seed": 1000 + i, "grow_mask_by": 0, "mask_blur": 0}
    if i % 2:  # half JSON with base64, half multipart
        return {"json": {**params, "input_image": "data:image/png;base64," + base64.b64encode(image).decode(),
                         "mask_image": base64.b64encode(mask).decode()}}
    # one boundary for all: werkzeug compiles (and re caches, up to 512) two regexes per boundary,
    # which would read as growth here
    ctype, body = multipart([("image", image, "in.png", "image/png"), ("mask", mask, "mask.png", "image/png"),
                             ("params", json.dumps(params), None, None)])
    return {"data": body, "headers": {"Content-Type": ctype}}


class Probe:
    """Threads, file descriptors, sockets and memory of this process (which runs the service)."""

    def __init__(self):
        self.process = psutil.Process()
        self.rss: list = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, name="rss-sampler", daemon=True)

    def fds(self) -> int:
        """Open file descriptors (handles on Windows)."""
        return self.process.num_fds() if hasattr(self.process, "num_fds") else self.process.num_handles()

    def snapshot(self, fake) -> dict:
        """Counts and traced memory, without what the fake ComfyUI (in this process) keeps of
        every prompt: its records for tests (prompts, node runs) and its history (cleared as a
        ComfyUI user could)."""
        fake.wait_idle()  # the last prompts' /history entries are written (the service did not wait)
        wait_until(lambda: not [t for t in threading.enumerate() if t.name.startswith(CLIENT_THREADS)],
                   what="the ComfyUI client's short-lived threads to end")
        fake.prompts.clear()
        fake.node_runs.clear()  # about 1 KB a request: a third of the budget below, not the service's
        requests.post(f"{fake.url}/history", json={"clear": True}, timeout=5).raise_for_status()
        gc.collect()
        names = sorted(t.name for t in threading.enumerate())
        ours = [n for n in names if not n.startswith(FAKE_THREADS)]
        return {"threads": len(ours), "names": ours, "fds": self.fds(),
                "sockets": len(self.process.net_connections(kind="all")),
                "traced": tracemalloc.get_traced_memory()[0], "t": time.monotonic()}

    def rss_bytes(self) -> int:
        return self.process.memory_info().rss

    def _sample(self):
        while not self._stop.wait(0.1):
            self.rss.append((time.monotonic(), self.rss_bytes()))

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def test_200_requests_from_16_threads(live_server, fake_comfy, service_config):
    fake_comfy.step_delay = 0.002
    local = threading.local()

    def one(i):
        session = getattr(local, "session", None) or requests.Session()
        local.session = session
        resp = session.post(f"{live_server.url}/api/img2img", timeout=60, **request_body(i))
        assert resp.status_code == 200, (i, resp.text[:300])
        data = resp.json()
        images = data["comfy_response"]["generated_images"]
        assert len(images) == 1 and data["seed"] == 1000 + i
        got = session.get(images[0]["url"], timeout=30)
        assert got.status_code == 200 and got.headers["Content-Type"] == "image/png"
        out = np.asarray(Image.open(io.BytesIO(got.content)).convert("RGB"), dtype=int)
        size = SIZES[i % len(SIZES)]
        assert out.shape == (size[1], size[0], 3), (i, out.shape)
        inside = np.zeros(out.shape[:2], bool)
        l, t, r, b = box_of(size)
        inside[t:b, l:r] = True
        assert (out[~inside] == colour_of(i)).all(), f"request {i} got someone else's pixels"
        assert (out[inside] != colour_of(i)).any(axis=-1).mean() > 0.9, f"request {i} was not inpainted"
        return images[0]["filename"]

    start = time.monotonic()
    tracemalloc.start()
    try:
        with Probe() as probe, ThreadPoolExecutor(THREADS) as pool:
            names = list(pool.map(one, range(WARMUP)))  # fills the pools: threads, connections
            base = probe.snapshot(fake_comfy)
            names += list(pool.map(one, range(WARMUP, WARMUP + HALF)))
            mid = probe.snapshot(fake_comfy)
            names += list(pool.map(one, range(WARMUP + HALF, N_REQUESTS)))
            end = probe.snapshot(fake_comfy)
    finally:
        tracemalloc.stop()
    elapsed = time.monotonic() - start

    # every request got its own, distinct file; nothing else is served or left in ComfyUI's input
    assert len(names) == N_REQUESTS and len(set(names)) == N_REQUESTS
    assert sorted(p.name for p in service_config.served_images_dir.iterdir()) == sorted(names)
    assert [p for p in fake_comfy.input_dir.rglob("*") if p.is_file()] == []

    # no leaks: the second half of the run ends where the first half did (pools are full by then)
    # (a leak of one thread, fd or socket per request would add 92 in the second half)
    assert end["threads"] - mid["threads"] <= 1 and end["threads"] - base["threads"] <= 2, (base, mid, end)
    assert end["fds"] - mid["fds"] <= 16 and end["fds"] - base["fds"] <= 32, (base, mid, end)
    assert end["sockets"] - mid["sockets"] <= 16, (base, mid, end)
    growth_first, growth_second = mid["traced"] - base["traced"], end["traced"] - mid["traced"]
    assert growth_second < 512 * 1024, f"traced memory grew {growth_second / 1e6:.1f} MB in the second half"
    rss = probe.rss
    first = [v for t, v in rss if base["t"] <= t <= mid["t"]]
    second = [v for t, v in rss if mid["t"] <= t <= end["t"]]
    assert first and second
    assert max(second) <= max(first) + 48 * 1024 * 1024, \
        f"RSS keeps growing: {max(first) / 1e6:.0f} MB -> {max(second) / 1e6:.0f} MB"
    print(f"\nload: {N_REQUESTS} requests in {elapsed:.1f} s; threads {base['threads']}/{mid['threads']}/"
          f"{end['threads']}, fds {base['fds']}/{mid['fds']}/{end['fds']}, traced memory growth "
          f"{growth_first / 1e6:.2f} / {growth_second / 1e6:.2f} MB, RSS max {max(first) / 1e6:.0f} / "
          f"{max(second) / 1e6:.0f} MB")
