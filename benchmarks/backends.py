"""Throughput with 1, 2 and 4 ComfyUI backends behind one img2img service (docs/scaling.md).

    python benchmarks/backends.py            # about a minute
    python benchmarks/backends.py --quick    # fewer requests (figures not reportable)

Each backend is a fake ComfyUI in its own process whose prompts take a fixed time (sampler steps
× step delay, sleeping: a GPU's time, not this machine's CPU). The service is the real one
(img2img_server.main() in its own process, COMFY_API_URL listing the backends). Clients send the
same requests with more clients than backends, so work always waits; throughput = requests per
second over the whole run. Targets: ≥ 1.9× the single-backend throughput with 2 backends, ≥ 3.6×
with 4.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import requests

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from run import SERVICE_SCRIPT, Fake, Service, free_port  # noqa: E402
from workload import JsonBodies, write_inputs  # noqa: E402

TARGETS = {2: 1.9, 4: 3.6}


class MultiService(Service):
    """The real service with COMFY_API_URL listing every fake; the first shares its disk."""

    def __init__(self, fakes: list, work: Path):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {k: v for k, v in os.environ.items() if not k.startswith(("IMG2IMG_", "COMFY"))}
        env.update(COMFY_API_URL=",".join(f.url for f in fakes), COMFYUI_INPUT_DIR=fakes[0].input_dir,
                   COMFYUI_OUTPUT_DIR=fakes[0].output_dir, IMG2IMG_HOST="127.0.0.1", IMG2IMG_PORT=str(self.port),
                   PUBLIC_BASE_URL=self.url, SERVED_IMAGES_DIR=str(work / f"served-{len(fakes)}"),
                   COMFY_TIMEOUT_S="300", LOG_LEVEL="WARNING", PYTHONUNBUFFERED="1")
        self.log = open(work / f"service-{len(fakes)}.log", "wb")
        self.proc = subprocess.Popen([sys.executable, str(SERVICE_SCRIPT)], stdin=subprocess.DEVNULL,
                                     stdout=self.log, stderr=subprocess.STDOUT, env=env)
        self.wait_healthy()


def throughput(url: str, bodies: list, clients: int) -> tuple:
    """(requests per second, seconds) for ``bodies`` sent by ``clients`` threads."""
    todo, lock, errors = list(bodies), threading.Lock(), []
    barrier = threading.Barrier(clients + 1)

    def client():
        session = requests.Session()
        barrier.wait()
        while True:
            with lock:
                if not todo:
                    return
                body = todo.pop()
            resp = session.post(url + "/api/img2img", data=body, headers={"Content-Type": "application/json"},
                                timeout=300)
            if resp.status_code != 200:
                errors.append(f"{resp.status_code}: {resp.text[:300]}")
                return

    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    barrier.wait()
    started = time.perf_counter()
    for t in threads:
        t.join()
    seconds = time.perf_counter() - started
    if errors:
        raise SystemExit(f"a request failed: {errors[0]}")
    return len(bodies) / seconds, seconds


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    steps, step_delay = 6, 0.05  # 0.3 s of "GPU" per prompt
    per_backend = 4 if args.quick else 12
    with tempfile.TemporaryDirectory(prefix="dreamlayer-backends-") as tmp:
        work = Path(tmp)
        image_path, _ = write_inputs(work / "inputs", 64)
        bodies_of = JsonBodies(image_path.read_bytes(), None, steps)
        rows = []
        for count in (1, 2, 4):
            fakes = [Fake(Path(tempfile.mkdtemp(dir=work)) / "comfy", step_delay, None) for _ in range(count)]
            service = None
            try:
                service = MultiService(fakes, work)
                bodies = [bodies_of.body(seed) for seed in range(1, per_backend * 4 + 1)]
                throughput(service.url, bodies[:count], count)  # warm-up: every backend's object_info etc.
                rate, seconds = throughput(service.url, bodies, clients=8)
                rows.append((count, len(bodies), seconds, rate))
            finally:
                if service is not None:
                    service.stop()
                for fake in fakes:
                    fake.stop()
        base = rows[0][3]
        print(f"\nThroughput with N fake ComfyUI backends ({steps} steps × {step_delay * 1000:.0f} ms = "
              f"{steps * step_delay:.1f} s per prompt, 8 clients)\n")
        print(f"{'backends':>8} {'requests':>8} {'seconds':>8} {'req/s':>7} {'speed-up':>8} {'target':>7}")
        ok = True
        for count, n, seconds, rate in rows:
            target = TARGETS.get(count)
            speed = rate / base
            met = target is None or speed >= target
            ok &= met
            print(f"{count:>8} {n:>8} {seconds:>8.2f} {rate:>7.2f} {speed:>7.2f}× "
                  f"{'' if target is None else ('≥ %.1f× ' % target) + ('met' if met else 'MISSED'):>7}")
        print(f"\nideal: {1 / (steps * step_delay):.2f} req/s per backend")
        return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
