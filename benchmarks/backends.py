"""Throughput with 1, 2 and 4 ComfyUI backends behind one img2img service, and the latency the
Redis job queue (REDIS_URL) adds over the in-process path (docs/scaling.md).

    python benchmarks/backends.py            # about four minutes
    python benchmarks/backends.py --quick    # fewer requests (figures not reportable)

Each backend is a fake ComfyUI in its own process whose prompts take a fixed time (sampler steps
× step delay, sleeping: a GPU's time, not this machine's CPU). The service is the real one
(img2img_server.main() in its own process, COMFY_API_URL listing the backends). Clients send the
same requests with more clients than backends, so work always waits; throughput = requests per
second over the whole run. Targets: ≥ 1.9× the single-backend throughput with 2 backends, ≥ 3.6×
with 4. Both in this process (the default) and with REDIS_URL (the same service as one replica
with its queue workers, on a redis-server this benchmark starts).

Latency: two services side by side on one fake ComfyUI with no execution time — one in-process,
one with REDIS_URL — answer the same requests alternately, one at a time; the Redis path's cost is
the difference of the client times of adjacent requests, each less its prompt's execution time in
the fake (the fake's own stamps; the pixel work it does at 512² is no path's cost). Target: ≤ 3 ms
at p50.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import requests

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from run import SERVICE_SCRIPT, Fake, Service, free_port, percentile  # noqa: E402
from workload import JsonBodies, write_inputs  # noqa: E402

TARGETS = {2: 1.9, 4: 3.6}
#: The most the Redis path may add to a request, at p50 (milliseconds).
REDIS_TARGET_MS = 3.0


class RedisServer:
    """A redis-server of this benchmark, on a Unix socket in its work folder."""

    def __init__(self, work: Path):
        self.socket = work / "redis.sock"
        self.url = f"unix://{self.socket}"
        self.proc = subprocess.Popen(["redis-server", "--port", "0", "--unixsocket", str(self.socket), "--save", "",
                                      "--dir", str(work)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while not self.socket.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit("redis-server did not start")
            time.sleep(0.01)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(15)


class MultiService(Service):
    """The real service with COMFY_API_URL listing every fake; the first shares its disk. With
    ``redis_url``, jobs go through Redis and the service's own queue workers."""

    def __init__(self, fakes: list, work: Path, redis_url: str | None = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        tag = f"{len(fakes)}{'-redis' if redis_url else ''}"
        env = {k: v for k, v in os.environ.items() if not k.startswith(("IMG2IMG_", "COMFY", "REDIS_"))}
        env.update(COMFY_API_URL=",".join(f.url for f in fakes), COMFYUI_INPUT_DIR=fakes[0].input_dir,
                   COMFYUI_OUTPUT_DIR=fakes[0].output_dir, IMG2IMG_HOST="127.0.0.1", IMG2IMG_PORT=str(self.port),
                   PUBLIC_BASE_URL=self.url, SERVED_IMAGES_DIR=str(work / f"served-{tag}"),
                   COMFY_TIMEOUT_S="300", LOG_LEVEL="WARNING", PYTHONUNBUFFERED="1")
        if redis_url:
            env["REDIS_URL"] = redis_url
        self.log = open(work / f"service-{tag}.log", "wb")
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


def measure_throughput(work: Path, bodies_of, per_backend: int, step_delay: float, redis_url=None) -> list:
    rows = []
    for count in (1, 2, 4):
        fakes = [Fake(Path(tempfile.mkdtemp(dir=work)) / "comfy", step_delay, None) for _ in range(count)]
        service = None
        try:
            service = MultiService(fakes, work, redis_url)
            bodies = [bodies_of.body(seed) for seed in range(1, per_backend * 4 + 1)]
            throughput(service.url, bodies[:count], count)  # warm-up: every backend's object_info etc.
            started = time.time()
            rate, seconds = throughput(service.url, bodies, clients=8)
            rows.append((count, len(bodies), seconds, rate, idle_times(fakes, started, time.time(), len(bodies))))
        finally:
            if service is not None:
                service.stop()
            for fake in fakes:
                fake.stop()
    return rows


def idle_times(fakes: list, started: float, ended: float, expected: int) -> dict:
    """Where each backend's "GPU" stood idle during a throughput run, from the fakes' own
    execution_start / execution_success stamps: between two prompts (the service's hand-over
    from one job to the next on a backend), before its first prompt and after its last."""
    deadline = time.monotonic() + 10
    while True:  # a fake files a prompt in /history a few ms after the answer may have gone out
        per_fake = [runs_since(fake, started - 0.002) for fake in fakes]  # stamps are whole ms
        if sum(map(len, per_fake)) >= expected or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    gaps, lead, tail, jobs = [], [], [], []
    for runs in per_fake:
        jobs.append(len(runs))
        if runs:
            gaps += [(b[0] - a[1]) * 1000 for a, b in zip(runs, runs[1:])]
            lead.append((runs[0][0] - started) * 1000)
            tail.append((ended - runs[-1][1]) * 1000)
    return {"gap_p50": percentile(gaps, 50) if gaps else 0.0, "lead_max": max(lead, default=0.0),
            "tail_max": max(tail, default=0.0), "jobs": jobs}


def runs_since(fake, since: float) -> list:
    """(execution_start, execution_success) of the fake's prompts that started after ``since``."""
    runs = []
    for entry in fake.session.get(f"{fake.url}/history", timeout=30).json().values():
        stamps = {name: data["timestamp"] / 1000 for name, data in entry["status"]["messages"]}
        if stamps.get("execution_start", 0) >= since and "execution_success" in stamps:
            runs.append((stamps["execution_start"], stamps["execution_success"]))
    return sorted(runs)


def print_throughput(title: str, rows: list) -> bool:
    base = rows[0][3]
    print(f"\n{title}\n")
    print(f"{'backends':>8} {'requests':>8} {'seconds':>8} {'req/s':>7} {'speed-up':>8} {'target':>7}")
    ok = True
    for count, n, seconds, rate, _ in rows:
        target = TARGETS.get(count)
        speed = rate / base
        met = target is None or speed >= target
        ok &= met
        print(f"{count:>8} {n:>8} {seconds:>8.2f} {rate:>7.2f} {speed:>7.2f}× "
              f"{'' if target is None else ('≥ %.1f× ' % target) + ('met' if met else 'MISSED'):>7}")
    print("\nbackends idle (the fakes' own stamps): between two prompts p50 / before the first / after the last "
          "(longest of the backends), jobs per backend")
    for count, _, _, _, idle in rows:
        print(f"{count:>8}   {idle['gap_p50']:.1f} / {idle['lead_max']:.0f} / {idle['tail_max']:.0f} ms   "
              f"{'/'.join(map(str, idle['jobs']))}")
    return ok


def measure_redis_latency(work: Path, redis_url: str, requests_each: int) -> list:
    """Per workload: (name, in-process samples, Redis samples), alternating request by request; a
    sample is (client ms, the fake's execution ms of its prompt)."""
    fake = Fake(Path(tempfile.mkdtemp(dir=work)) / "comfy", 0.0, None)
    local = queued = None
    rows = []
    try:
        local = MultiService([fake], work)
        queued = MultiService([fake], work, redis_url)
        for size, with_mask in ((64, False), (64, True), (512, True)):
            image_path, mask_path = write_inputs(work / "inputs", size)
            bodies_of = JsonBodies(image_path.read_bytes(), mask_path.read_bytes() if with_mask else None, 2)
            sent = {local.url: [], queued.url: []}  # (client ms, prompt id)
            sessions = {local.url: requests.Session(), queued.url: requests.Session()}
            for seed in range(1, requests_each + 6):
                order = (local, queued) if seed % 2 else (queued, local)
                for service in order:
                    body = bodies_of.body(seed * 2 + (service is queued))
                    started = time.perf_counter()
                    resp = sessions[service.url].post(service.url + "/api/img2img", data=body,
                                                      headers={"Content-Type": "application/json"}, timeout=60)
                    seconds = time.perf_counter() - started
                    if resp.status_code != 200:
                        raise SystemExit(f"a request failed: {resp.status_code} {resp.text[:300]}")
                    if seed > 5:  # the first ones warm up both services
                        sent[service.url].append((seconds * 1000, resp.json()["comfy_response"]["prompt_id"]))

            def samples(url):
                return [(ms, executed_ms(fake, prompt_id)) for ms, prompt_id in sent[url]]

            rows.append((f"{size}²{' mask' if with_mask else ''}", samples(local.url), samples(queued.url)))
    finally:
        for service in (local, queued):
            if service is not None:
                service.stop()
        fake.stop()
    return rows


def executed_ms(fake, prompt_id: str) -> float:
    start, end = fake.execution(prompt_id)
    return (end - start) * 1000


def print_latency(rows: list) -> bool:
    """The added latency of a request is its Redis time minus the time of the in-process request
    sent next to it (same seed pair, alternating), each less its prompt's execution in the fake
    (its own stamps): pairing cancels the machine's drift, and taking out the executions their
    spread — at 512² the fake's pixel work takes about 100 ms, ± 15 ms from run to run, which
    no path adds. The difference of the two plain p50s is printed too."""
    print("\nThe Redis path's cost: client time with REDIS_URL minus in-process, same fake ComfyUI "
          "(no execution time), alternating, one request at a time; added = per pair of adjacent requests, "
          "each less its prompt's execution in the fake\n")
    print(f"{'workload':>10} {'n':>4} {'in-process p50':>15} {'Redis p50':>10} {'execution p50':>14} "
          f"{'added p50':>10} {'added p95':>10} {'p50 − p50':>10} {'target':>12}")
    ok = True
    for name, local, queued in rows:
        added = [(q - qx) - (l - lx) for (l, lx), (q, qx) in zip(local, queued)]
        added50, added95 = percentile(added, 50), percentile(added, 95)
        met = added50 <= REDIS_TARGET_MS
        ok &= met
        local_p50, queued_p50 = percentile([l for l, _ in local], 50), percentile([q for q, _ in queued], 50)
        executions = percentile([x for _, x in local + queued], 50)
        print(f"{name:>10} {len(local):>4} {local_p50:>12.1f} ms {queued_p50:>7.1f} ms {executions:>11.1f} ms "
              f"{added50:>7.2f} ms {added95:>7.2f} ms {queued_p50 - local_p50:>7.2f} ms "
              f"{'≤ %.0f ms ' % REDIS_TARGET_MS + ('met' if met else 'MISSED'):>12}")
    return ok


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    steps, step_delay = 6, 0.05  # 0.3 s of "GPU" per prompt
    per_backend = 4 if args.quick else 24  # 96 requests a row: 48 left ±0.1× of spread at 4 backends
    with tempfile.TemporaryDirectory(prefix="dreamlayer-backends-") as tmp:
        work = Path(tmp)
        image_path, _ = write_inputs(work / "inputs", 64)
        bodies_of = JsonBodies(image_path.read_bytes(), None, steps)
        title = (f"Throughput with N fake ComfyUI backends ({steps} steps × {step_delay * 1000:.0f} ms = "
                 f"{steps * step_delay:.1f} s per prompt, 8 clients)")
        ok = print_throughput(title + ", in this process", measure_throughput(work, bodies_of, per_backend, step_delay))
        if shutil.which("redis-server") is None:
            print("\nredis-server is not installed: the REDIS_URL figures are skipped")
            return 0 if ok else 1
        redis = RedisServer(work)
        try:
            ok &= print_throughput(title + ", REDIS_URL (one replica, its queue workers)",
                                   measure_throughput(work, bodies_of, per_backend, step_delay, redis.url))
            ok &= print_latency(measure_redis_latency(work, redis.url, 10 if args.quick else 100))
        finally:
            redis.stop()
        print(f"\nideal: {1 / (steps * step_delay):.2f} req/s per backend")
        return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
