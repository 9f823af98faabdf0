"""How much time the img2img service adds to ComfyUI's own, measured against the fake ComfyUI.

    python benchmarks/run.py            # everything, about 3 minutes on 2 cores
    python benchmarks/run.py --quick    # fewer requests, for a smoke run (figures not reportable)

Three processes, as in production: the fake ComfyUI (benchmarks/fake_server.py), the real service
(benchmarks/service.py = img2img_server.main(): waitress, 32 threads, INFO logging) and this
script's HTTP clients. The fake runs one prompt at a time with a known execution time (sampler
steps × step_delay, plus its small pixel model), and it reports that time itself: every
/history entry carries execution_start and execution_success timestamps, written by the fake's
worker. So

    added latency = request time seen by the client − the fake's execution time of that prompt

is what the service (and the HTTP between the three) costs a user. See docs/performance.md.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import requests

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
SERVICE_SCRIPT = HERE / "service.py"
sys.path.insert(0, str(HERE))

from workload import JsonBodies, write_inputs  # noqa: E402

# ---------------------------------------------------------------------------------------------
# processes
# ---------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Fake:
    def __init__(self, root: Path, step_delay: float, history_delay: float | None):
        cmd = [sys.executable, str(HERE / "fake_server.py"), "--root", str(root), "--step-delay", str(step_delay)]
        if history_delay is not None:
            cmd += ["--history-delay", str(history_delay)]
        self.log = open(root.parent / "fake.log", "wb")
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log)
        line = self.proc.stdout.readline()
        if not line:
            raise SystemExit(f"the fake ComfyUI did not start; see {self.log.name}")
        info = json.loads(line)
        self.url, self.input_dir = info["url"], info["input_dir"]
        self.step_delay, self.history_delay = info["step_delay"], info["history_delay"]
        self.session = requests.Session()

    def execution(self, prompt_id: str) -> tuple:
        """(start, end) in seconds since the epoch: execution_start → execution_success, from the
        fake's own /history entry (its worker's clock, millisecond resolution)."""
        entry = self.session.get(f"{self.url}/history/{prompt_id}", timeout=10).json()[prompt_id]
        stamps = {name: data["timestamp"] / 1000 for name, data in entry["status"]["messages"]}
        return stamps["execution_start"], stamps["execution_success"]

    def stop(self):
        self.proc.stdin.close()
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


class Service:
    def __init__(self, fake: Fake, work: Path, wait: str):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {k: v for k, v in os.environ.items() if not k.startswith(("IMG2IMG_", "COMFY"))}
        env.update(COMFY_API_URL=fake.url, COMFYUI_INPUT_DIR=fake.input_dir, IMG2IMG_HOST="127.0.0.1",
                   IMG2IMG_PORT=str(self.port), PUBLIC_BASE_URL=self.url, SERVED_IMAGES_DIR=str(work / f"served-{wait}"),
                   COMFY_TIMEOUT_S="300", LOG_LEVEL="INFO", PYTHONUNBUFFERED="1")
        self.log = open(work / f"service-{wait}.log", "wb")
        self.proc = subprocess.Popen([sys.executable, str(SERVICE_SCRIPT), "--wait", wait],
                                     stdin=subprocess.DEVNULL, stdout=self.log, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + 30
        while True:
            try:
                if requests.get(self.url + "/health", timeout=2).status_code == 200:
                    break
            except requests.RequestException:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"the service did not start; see {self.log.name}")
            time.sleep(0.05)

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


# ---------------------------------------------------------------------------------------------
# requests
# ---------------------------------------------------------------------------------------------


@dataclass
class Sample:
    start: float          # client wall clock (epoch seconds) when the request was sent
    seconds: float        # client-observed request time (perf_counter)
    prompt_id: str
    exec_start: float = 0.0
    exec_end: float = 0.0

    @property
    def end(self) -> float:
        return self.start + self.seconds

    @property
    def exec_seconds(self) -> float:
        return self.exec_end - self.exec_start

    @property
    def added(self) -> float:
        return self.seconds - self.exec_seconds


def post(session: requests.Session, url: str, body: bytes) -> Sample:
    wall, started = time.time(), time.perf_counter()
    resp = session.post(url + "/api/img2img", data=body, headers={"Content-Type": "application/json"},
                        timeout=300)
    seconds = time.perf_counter() - started
    if resp.status_code != 200:
        raise SystemExit(f"the service answered {resp.status_code}: {resp.text[:500]}")
    return Sample(wall, seconds, resp.json()["comfy_response"]["prompt_id"])


def with_executions(fake: Fake, samples: list) -> list:
    for s in samples:
        s.exec_start, s.exec_end = fake.execution(s.prompt_id)
    return samples


def sequential(service: Service, fake: Fake, bodies: list) -> list:
    session = requests.Session()
    samples = [post(session, service.url, body) for body in bodies]
    return with_executions(fake, samples)


def concurrent(service: Service, fake: Fake, bodies: list, clients: int) -> tuple:
    """``clients`` threads, each with its own connection, take the next body until none is left."""
    samples, lock, todo = [], threading.Lock(), list(reversed(bodies))
    barrier = threading.Barrier(clients)
    errors = []

    def client():
        session = requests.Session()
        barrier.wait()
        while True:
            with lock:
                if not todo:
                    return
                body = todo.pop()
            try:
                sample = post(session, service.url, body)
            except BaseException as exc:  # noqa: BLE001 - reported below
                errors.append(exc)
                return
            with lock:
                samples.append(sample)

    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise SystemExit(f"a concurrent request failed: {errors[0]}")
    return with_executions(fake, samples)


# ---------------------------------------------------------------------------------------------
# statistics
# ---------------------------------------------------------------------------------------------


def percentile(values, q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default)."""
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def summary(values) -> dict:
    return {"n": len(values), "p50": percentile(values, 50), "p95": percentile(values, 95),
            "p99": percentile(values, 99), "max": max(values), "mean": statistics.fmean(values)}


def overlap(a0, a1, b0, b1) -> float:
    return max(0.0, min(a1, b1) - max(a0, b0))


def concurrency_report(samples: list) -> dict:
    first_send = min(s.start for s in samples)
    last_answer = max(s.end for s in samples)
    wall = last_answer - first_send
    total_exec = sum(s.exec_seconds for s in samples)
    runs = sorted(samples, key=lambda s: s.exec_start)
    gaps = [max(0.0, b.exec_start - a.exec_end) for a, b in zip(runs, runs[1:])]
    # each request's own overhead: its time minus its own execution minus the time ComfyUI spent
    # running *other* prompts while this one waited in the queue
    own = []
    for s in samples:
        busy = sum(overlap(o.exec_start, o.exec_end, s.start, s.exec_start) for o in samples if o is not s)
        own.append(s.seconds - s.exec_seconds - busy)
    return {"wall": wall, "sum_exec": total_exec, "ratio": wall / total_exec,
            "lead_in": runs[0].exec_start - first_send, "idle_between": sum(gaps), "max_gap": max(gaps),
            "tail": last_answer - max(s.exec_end for s in samples),
            "added_raw": summary([s.added for s in samples]), "added_own": summary(own),
            "exec": summary([s.exec_seconds for s in samples])}


# ---------------------------------------------------------------------------------------------
# P3
# ---------------------------------------------------------------------------------------------


def upload_cost(what: str, image: Path, mask: Path, repeat: int) -> dict:
    out = subprocess.run([sys.executable, str(HERE / "upload_cost.py"), "--what", what, "--repeat", str(repeat),
                          str(image), str(mask)], capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise SystemExit(f"upload_cost.py --what {what} failed:\n{out.stderr}")
    result = json.loads(out.stdout.strip().splitlines()[-1])
    result["median"] = statistics.median(result["seconds"])
    return result


# ---------------------------------------------------------------------------------------------
# machine and output
# ---------------------------------------------------------------------------------------------


def machine() -> dict:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
        mem = next(int(l.split()[1]) for l in Path("/proc/meminfo").read_text().splitlines()
                   if l.startswith("MemTotal"))
        ram = f"{mem / 1024 / 1024:.1f} GiB"
    except (OSError, StopIteration):
        ram = "unknown"
    import PIL
    return {"cpu": cpu, "cores": os.cpu_count(), "ram": ram, "python": platform.python_version(),
            "pillow": PIL.__version__, "os": f"{platform.system()} {platform.release()}"}


def ms(x: float) -> str:
    return f"{x * 1000:8.1f}"


def verdict(ok: bool) -> str:
    return "MET" if ok else "NOT MET"


def print_report(r: dict) -> None:
    m = r["machine"]
    cfg = r["config"]
    print()
    print("img2img service benchmark (python benchmarks/run.py)")
    print(f"machine: {m['cpu']}, {m['cores']} cores, {m['ram']} RAM; Python {m['python']}, Pillow {m['pillow']}, "
          f"{m['os']}")
    print(f"fake ComfyUI: {cfg['steps']} steps x {cfg['step_delay'] * 1000:g} ms = "
          f"{cfg['steps'] * cfg['step_delay'] * 1000:g} ms of sampling per prompt (+ its pixel model), "
          f"one prompt at a time; /history written {cfg['history_delay'] * 1000:g} ms after execution_success "
          "(as ComfyUI 0.3.40 does, late)")
    print("NOTE: a noisy 2-core machine. Ratios and differences are what count, not absolute times;")
    print("      'added' = client-observed request time - the fake's own execution time (from its /history).")
    print()
    print("P1  added latency, sequential, 512x512 JSON (base64) requests              p50      p95      p99      max   (ms)")
    for name, key in (("no mask", "p1_nomask"), ("with mask (inpainting)", "p1_mask")):
        s = r[key]["added"]
        e = r[key]["exec"]
        print(f"    {name:<24} n={s['n']:<4} exec p50 {e['p50'] * 1000:6.1f} ms    "
              f"{ms(s['p50'])} {ms(s['p95'])} {ms(s['p99'])} {ms(s['max'])}")
    ok = all(r[k]["added"]["p50"] <= 0.020 and r[k]["added"]["p99"] <= 0.060 for k in ("p1_nomask", "p1_mask"))
    print(f"    target p50 <= 20 ms, p99 <= 60 ms: {verdict(ok)}")
    print(f"    first request after start (object_info fetched, connections opened): "
          f"{r['cold_added'] * 1000:.1f} ms added")
    print()
    c = r["p2"]
    print(f"P2  {cfg['clients']} concurrent clients, {c['exec']['n']} requests with mask, fake running one prompt at a time")
    print(f"    wall time {c['wall']:.2f} s, sum of execution times {c['sum_exec']:.2f} s: "
          f"ratio {c['ratio']:.3f} (target <= 1.05: {verdict(c['ratio'] <= 1.05)})")
    print(f"    fake idle: {c['lead_in'] * 1000:.0f} ms before the first prompt, {c['idle_between'] * 1000:.0f} ms "
          f"between prompts (longest gap {c['max_gap'] * 1000:.0f} ms), {c['tail'] * 1000:.0f} ms after the last")
    print(f"    execution time p50 {c['exec']['p50'] * 1000:.1f} ms (sequential: {r['p1_mask']['exec']['p50'] * 1000:.1f} ms)")
    for label, key in (("request - own execution (incl. queueing)", "added_raw"),
                       ("... minus other prompts' execution while queued", "added_own")):
        s = c[key]
        print(f"    added, {label:<48} p50 {ms(s['p50'])}  p95 {ms(s['p95'])}  max {ms(s['max'])} ms")
    print()
    p = r["polling"]
    print(f"vs  DreamLayer's 2-second polling loop: the same {p['websocket']['n']} requests with mask, execution "
          f"times spread over one polling period ({p['exec_min']:.2f}-{p['exec_max']:.2f} s)")
    for label, key in (("this service (WebSocket)", "websocket"), ("2 s polling of /queue + /history", "poll2s")):
        s = p[key]
        print(f"    {label:<34} added mean {ms(s['mean'])}  p50 {ms(s['p50'])}  max {ms(s['max'])} ms")
    print(f"    polling adds {p['poll2s']['mean'] / max(p['websocket']['mean'], 1e-9):.0f}x as much on average")
    print()
    if "p3" in r:
        u = r["p3"]
        svc, pil = u["service"], u["pillow"]
        mib = 1024 * 1024
        print(f"P3  upload handling, {svc['width']}x{svc['height']} RGB PNG ({svc['input_sizes'][0] / mib:.1f} MiB) "
              f"+ mask PNG ({svc['input_sizes'][1] / mib:.2f} MiB); decoded image {svc['decoded_bytes'] / mib:.0f} MiB")
        print(f"    service (decode_image, decode_mask, plan, prepare, png_bytes, comfy_mask_png): "
              f"{svc['median']:.3f} s (median of {len(svc['seconds'])})")
        print(f"    Pillow bare decode + encode (PNG level {u['level']}), same files:                "
              f"{pil['median']:.3f} s")
        ratio = svc["median"] / pil["median"]
        print(f"    ratio {ratio:.2f} (target <= 1.5: {verdict(ratio <= 1.5)})")
        peak = svc["peak_bytes"]
        if peak is not None:
            times = peak / svc["decoded_bytes"]
            print(f"    peak memory of the service's handling: {peak / mib:.0f} MiB = {times:.2f} x the decoded image "
                  f"(target <= 3: {verdict(times <= 3)}); Pillow bare: {pil['peak_bytes'] / mib:.0f} MiB")
        b = u.get("base64")
        if b:
            print(f"    JSON form only: base64 data URLs -> bytes: {b['median']:.3f} s, peak {b['peak_bytes'] / mib:.0f} MiB "
                  f"above the request body's text")
    print()


# ---------------------------------------------------------------------------------------------


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=60, help="sequential requests per P1 variant (>= 50)")
    parser.add_argument("--clients", type=int, default=16, help="P2 concurrent clients")
    parser.add_argument("--concurrent-requests", type=int, default=64, help="P2 requests")
    parser.add_argument("--polling-requests", type=int, default=10, help="requests in the polling comparison")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--step-delay", type=float, default=0.02, help="fake's seconds per sampler step")
    parser.add_argument("--history-delay", type=float, default=None, help="fake's late /history write (s)")
    parser.add_argument("--p3-size", type=int, default=4096)
    parser.add_argument("--p3-repeat", type=int, default=3)
    parser.add_argument("--skip-p3", action="store_true")
    parser.add_argument("--quick", action="store_true", help="few requests: a smoke run, not figures")
    parser.add_argument("--json", type=Path, help="also write the raw results here")
    args = parser.parse_args(argv)
    if args.quick:
        args.requests, args.concurrent_requests, args.polling_requests, args.p3_repeat = 8, 16, 3, 1

    work = Path(tempfile.mkdtemp(prefix="img2img-bench-"))
    inputs = HERE / ".inputs"  # generated once, reused (ignored by git)
    img512, mask512 = write_inputs(inputs, 512)
    with_mask = JsonBodies(img512.read_bytes(), mask512.read_bytes(), args.steps)
    without_mask = JsonBodies(img512.read_bytes(), None, args.steps)
    seeds = iter(range(1, 1_000_000))
    report: dict = {"machine": machine()}

    print(f"benchmark: work folder {work}", file=sys.stderr)
    fake = Fake(work / "comfyui", args.step_delay, args.history_delay)
    report["config"] = {"steps": args.steps, "step_delay": fake.step_delay, "history_delay": fake.history_delay,
                        "clients": args.clients}
    try:
        service = Service(fake, work, "websocket")
        try:
            print("P1 ...", file=sys.stderr)
            cold = sequential(service, fake, [with_mask.body(next(seeds))])[0]
            report["cold_added"] = cold.added
            sequential(service, fake, [b.body(next(seeds)) for b in (with_mask, without_mask) for _ in range(3)])
            for key, bodies in (("p1_nomask", without_mask), ("p1_mask", with_mask)):
                samples = sequential(service, fake, [bodies.body(next(seeds)) for _ in range(args.requests)])
                report[key] = {"added": summary([s.added for s in samples]),
                               "exec": summary([s.exec_seconds for s in samples])}
            print("P2 ...", file=sys.stderr)
            samples = concurrent(service, fake, [with_mask.body(next(seeds)) for _ in range(args.concurrent_requests)],
                                 args.clients)
            report["p2"] = concurrency_report(samples)
            print("polling comparison (WebSocket) ...", file=sys.stderr)
            # steps spread so that the execution times cover one 2-s polling period evenly
            period_steps = round(2.0 / args.step_delay)
            spread = [args.steps + (period_steps * i) // args.polling_requests for i in range(args.polling_requests)]
            ws = sequential(service, fake, [with_mask.body(next(seeds), steps=n) for n in spread])
        finally:
            service.stop()
        print("polling comparison (2-s polling) ...", file=sys.stderr)
        service = Service(fake, work, "poll2s")
        try:
            poll = sequential(service, fake, [with_mask.body(next(seeds), steps=n) for n in spread])
        finally:
            service.stop()
        report["polling"] = {"websocket": summary([s.added for s in ws]), "poll2s": summary([s.added for s in poll]),
                             "exec_min": min(s.exec_seconds for s in ws + poll),
                             "exec_max": max(s.exec_seconds for s in ws + poll)}
    finally:
        fake.stop()

    if not args.skip_p3:
        print("P3 ...", file=sys.stderr)
        big_image, big_mask = write_inputs(inputs, args.p3_size)
        sys.path.insert(0, str(ROOT))
        from uploads import PNG_COMPRESS_LEVEL
        report["p3"] = {"level": PNG_COMPRESS_LEVEL,
                        **{what: upload_cost(what, big_image, big_mask, args.p3_repeat)
                           for what in ("service", "pillow", "base64")}}

    print_report(report)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
