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

is what the service (and the HTTP between the three) costs a user. Beside it, the floor comparison
times a minimal ComfyUI client (benchmarks/floor_client.py) and the HTTP hop alone
(benchmarks/http_hop.py: the service's web server with a view that does nothing). See
docs/performance.md.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import requests

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
SERVICE_SCRIPT = HERE / "service.py"
HOP_SCRIPT = HERE / "http_hop.py"
sys.path.insert(0, str(HERE))

from floor_client import FloorClient  # noqa: E402
from workload import JsonBodies, write_inputs  # noqa: E402

#: The fake's checkpoint, for the floor's own workflow.
CKPT = "tiny-sd15-random.safetensors"
#: Targets of the floor comparison (service added - floor added, ms at p50), per case.
FLOOR_TARGETS = {"64": 3.0, "64_mask": 3.0, "512_mask": 6.0}

# ---------------------------------------------------------------------------------------------
# processes
# ---------------------------------------------------------------------------------------------


MIB = 1024 * 1024


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def reap(proc: subprocess.Popen) -> None:
    """Wait for a process asked to stop; kill it if it has not within 15 s."""
    try:
        proc.wait(15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


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
        self.url, self.input_dir, self.output_dir = info["url"], info["input_dir"], info["output_dir"]
        self.step_delay, self.history_delay = info["step_delay"], info["history_delay"]
        self.session = requests.Session()

    def execution(self, prompt_id: str) -> tuple:
        """(start, end) in seconds since the epoch: execution_start → execution_success, from the
        fake's own /history entry (its worker's clock, millisecond resolution)."""
        deadline = time.monotonic() + 10
        while True:  # the service may answer before the fake has filed the entry (a few ms later)
            entry = self.session.get(f"{self.url}/history/{prompt_id}", timeout=10).json().get(prompt_id)
            if entry is not None or time.monotonic() > deadline:
                break
            time.sleep(0.01)
        if entry is None:
            raise SystemExit(f"the fake never filed prompt {prompt_id} in /history")
        stamps = {name: data["timestamp"] / 1000 for name, data in entry["status"]["messages"]}
        return stamps["execution_start"], stamps["execution_success"]

    def stop(self):
        self.proc.stdin.close()  # the fake's signal to stop
        reap(self.proc)
        self.log.close()


class HttpHop:
    """benchmarks/http_hop.py: the service's web server with a view that does nothing."""

    def __init__(self):
        self.proc = subprocess.Popen([sys.executable, str(HOP_SCRIPT)], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        line = self.proc.stdout.readline()
        if not line:
            raise SystemExit("benchmarks/http_hop.py did not start")
        self.url = json.loads(line)["url"]

    def stop(self):
        self.proc.stdin.close()  # its signal to stop
        reap(self.proc)


class Service:
    def __init__(self, fake: Fake, work: Path, wait: str, shared_output: bool = True):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {k: v for k, v in os.environ.items() if not k.startswith(("IMG2IMG_", "COMFY"))}
        env.update(COMFY_API_URL=fake.url, COMFYUI_INPUT_DIR=fake.input_dir, IMG2IMG_HOST="127.0.0.1",
                   IMG2IMG_PORT=str(self.port), PUBLIC_BASE_URL=self.url, SERVED_IMAGES_DIR=str(work / f"served-{wait}"),
                   COMFY_TIMEOUT_S="300", LOG_LEVEL="INFO", PYTHONUNBUFFERED="1")
        if shared_output:  # as with a local ComfyUI (COMFYUI_DIR); else results come over GET /view
            env["COMFYUI_OUTPUT_DIR"] = fake.output_dir
        self.log = open(work / f"service-{wait}.log", "wb")
        self.proc = subprocess.Popen([sys.executable, str(SERVICE_SCRIPT), "--wait", wait],
                                     stdin=subprocess.DEVNULL, stdout=self.log, stderr=subprocess.STDOUT, env=env)
        self.wait_healthy()

    def wait_healthy(self, seconds: float = 30) -> None:
        """Until /health answers 200; exits if the process dies or does not answer in time."""
        deadline = time.monotonic() + seconds
        while True:
            try:
                if requests.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except requests.RequestException:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"the service did not start; see {self.log.name}")
            time.sleep(0.05)

    def stop(self):
        self.proc.terminate()
        reap(self.proc)
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
    # client wall clock when the answer arrived: compared with the fake's own wall-clock stamps, read
    # as they are (start + seconds drifts from them if the clock is stepped or slewed meanwhile: a
    # run on 2 Dec saw P2's "execution end -> answer" at -39 ms)
    answered: float | None = None

    @property
    def end(self) -> float:
        return self.start + self.seconds if self.answered is None else self.answered

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
    seconds, answered = time.perf_counter() - started, time.time()
    if resp.status_code != 200:
        raise SystemExit(f"the service answered {resp.status_code}: {resp.text[:500]}")
    return Sample(wall, seconds, resp.json()["comfy_response"]["prompt_id"], answered=answered)


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


def floor_comparison(service: Service, fake: Fake, inputs: Path, sizes, n: int, steps: int, seeds) -> dict:
    """The service and a minimal client (benchmarks/floor_client.py) against the same fake, request
    for request alternately, on the same images and masks: what the service adds beyond the floor."""
    floor = FloorClient(fake.url, fake.input_dir, fake.output_dir, CKPT)
    hop = HttpHop()
    session, hop_session = requests.Session(), requests.Session()
    out = {}
    try:
        for size in sizes:
            image_path, mask_path = write_inputs(inputs, size)
            image_png, mask_png = image_path.read_bytes(), mask_path.read_bytes()
            for masked in (False, True):
                m = mask_png if masked else None
                bodies = JsonBodies(image_png, m, steps)
                svc, flo, hops = [], [], []
                for i in range(n + 2):  # two warm-up pairs, not counted
                    body = bodies.body(next(seeds))
                    s = post(session, service.url, body)
                    wall, started = time.time(), time.perf_counter()
                    prompt_id, _ = floor.run(image_png, m, next(seeds), steps)
                    f = Sample(wall, time.perf_counter() - started, prompt_id)
                    started = time.perf_counter()
                    hop_session.post(hop.url + "/api/img2img", data=body,
                                     headers={"Content-Type": "application/json"}, timeout=60).raise_for_status()
                    h = time.perf_counter() - started
                    if i >= 2:
                        svc.append(s)
                        flo.append(f)
                        hops.append(h)
                with_executions(fake, svc)
                with_executions(fake, flo)
                out[f"{size}{'_mask' if masked else ''}"] = {
                    "service": summary([x.added for x in svc]), "floor": summary([x.added for x in flo]),
                    # per pair (adjacent requests): steadier than a difference of percentiles
                    "paired": summary([x.added - y.added for x, y in zip(svc, flo)]),
                    "service_total": summary([x.seconds for x in svc]),
                    "floor_total": summary([x.seconds for x in flo]),
                    "http_hop": summary(hops)}
    finally:
        floor.close()
        hop.stop()
    return out


def floor_rows(floor: dict) -> list:
    rows = []
    for case, d in floor.items():
        size, _, masked = case.partition("_")
        diff50 = (d["service"]["p50"] - d["floor"]["p50"]) * 1000
        diff95 = (d["service"]["p95"] - d["floor"]["p95"]) * 1000
        target = FLOOR_TARGETS.get(case)
        ok = target is None or (diff50 <= target and diff95 <= 2 * max(diff50, 0.5))
        rows.append(("P1", f"added over the floor, {size}x{size}{' with mask' if masked else ''}, "
                     f"{d['service']['n']} pairs: service / floor / difference, p50 | p95 ms",
                     f"{ms(d['service']['p50'])} / {ms(d['floor']['p50'])} / {diff50:.1f} | "
                     f"{ms(d['service']['p95'])} / {ms(d['floor']['p95'])} / {diff95:.1f}",
                     "" if target is None else f"<= {target:g} | <= 2x p50", "" if target is None else verdict(ok)))
    return rows


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
    # Each request's own added latency: before its prompt started, the time ComfyUI could have
    # started it but had not (it was neither busy with the previous prompt nor waiting for the
    # request to arrive), plus the time from the end of its execution to the client's answer.
    own, before, after = [], [], []
    previous_end = None
    for s in runs:
        ready = s.start if previous_end is None else max(s.start, previous_end)
        before.append(max(0.0, s.exec_start - ready))
        after.append(s.end - s.exec_end)
        own.append(before[-1] + after[-1])
        previous_end = s.exec_end
    return {"wall": wall, "sum_exec": total_exec, "ratio": wall / total_exec,
            "lead_in": runs[0].exec_start - first_send, "idle_between": sum(gaps), "max_gap": max(gaps),
            "tail": last_answer - max(s.exec_end for s in samples),
            "added_raw": summary([s.added for s in samples]), "added_own": summary(own),
            "added_before": summary(before), "added_after": summary(after),
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
            "pillow": PIL.__version__, "os": f"{platform.system()} {platform.release()}", "load": load()}


def load() -> str:
    """The 1-minute load average: what else the machine was doing (2 cores: above 1 is contention)."""
    try:
        return f"{os.getloadavg()[0]:.2f}"
    except OSError:
        return "unknown"


def ms(x: float) -> str:
    return f"{x * 1000:.1f}"


def verdict(ok: bool) -> str:
    return "MET" if ok else "NOT MET"


def table(rows: list) -> str:
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(rows[0]))]
    lines = []
    for n, row in enumerate(rows):
        lines.append("  ".join(str(cell).ljust(w) for cell, w in zip(row, widths)).rstrip())
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def print_report(r: dict) -> None:
    m, cfg = r["machine"], r["config"]
    p1n, p1m, c, poll = r["p1_nomask"], r["p1_mask"], r["p2"], r["polling"]
    print()
    print("img2img service benchmark (python benchmarks/run.py)")
    print(f"machine: {m['cpu']}, {m['cores']} cores, {m['ram']} RAM; Python {m['python']}, Pillow {m['pillow']}, "
          f"{m['os']}; load average {m['load']} before the run, {r['load_after']} after")
    print(f"fake ComfyUI (own process): {cfg['steps']} steps x {cfg['step_delay'] * 1000:g} ms = "
          f"{cfg['steps'] * cfg['step_delay'] * 1000:g} ms of sampling per prompt plus its pixel model, one prompt "
          f"at a time; /history written {cfg['history_delay'] * 1000:g} ms after execution_success (late, as "
          "ComfyUI 0.3.40)")
    print("service (own process): img2img_server.main(), waitress, inputs staged in the fake's input folder, "
          + ("results downloaded with GET /view" if r["config"]["view"] else "results read from its output folder"))
    print("added = client-observed request time - the fake's execution time of that prompt (execution_start ->")
    print("        execution_success in its /history), so it includes the fake's own HTTP handling too.")
    if r.get("burners"):
        print(f"BUSY: {r['burners']} CPU-burning process(es) ran during P1, P2 and the polling comparison")
    print("NOTE: a noisy 2-core machine shared with other work: the ratios and the differences between rows")
    print("      are what count, not the absolute times.")
    print()
    rows = [("", "measure", "measured", "target", "verdict")]

    def p1_row(name, d):
        a = d["added"]
        return ("P1", f"added latency, {name}, {a['n']} sequential 512x512 JSON requests, p50 / p95 / p99 ms",
                f"{ms(a['p50'])} / {ms(a['p95'])} / {ms(a['p99'])}", "(the floor rows)", "")

    rows.append(p1_row("no mask", p1n))
    rows.append(p1_row("with mask", p1m))
    rows += floor_rows(r["floor"])
    rows.append(("P2", f"wall time / sum of execution times, {c['exec']['n']} requests from {cfg['clients']} clients "
                 f"({c['wall']:.2f} s / {c['sum_exec']:.2f} s)", f"{c['ratio']:.3f}", "<= 1.05",
                 verdict(c["ratio"] <= 1.05)))
    own = c["added_own"]
    rows.append(("P2", "added latency per request (not waiting for ComfyUI), p50 / p95 / max ms",
                 f"{ms(own['p50'])} / {ms(own['p95'])} / {ms(own['max'])}", "", ""))
    if "p3" in r:
        u = r["p3"]
        svc, pil = u["service"], u["pillow"]
        ratio = svc["median"] / pil["median"]
        rows.append(("P3", f"upload handling time, service / Pillow bare decode+encode, {svc['width']}x{svc['height']} "
                     f"({svc['median']:.3f} s / {pil['median']:.3f} s)", f"{ratio:.2f}", "<= 1.5", verdict(ratio <= 1.5)))
        if svc["peak_bytes"] is not None:
            times = svc["peak_bytes"] / svc["decoded_bytes"]
            rows.append(("P3", f"peak memory / decoded image ({svc['peak_bytes'] / MIB:.0f} MiB / "
                         f"{svc['decoded_bytes'] / MIB:.0f} MiB)", f"{times:.2f}", "<= 3", verdict(times <= 3)))
    rows.append(("vs", f"mean added latency, WebSocket (this service) vs DreamLayer's 2-s polling, "
                 f"{poll['websocket']['n']} requests, ms", f"{ms(poll['websocket']['mean'])} vs "
                 f"{ms(poll['poll2s']['mean'])}", "", ""))
    print(table(rows))
    print()
    print("Details")
    for name, d in (("no mask", p1n), ("with mask", p1m)):
        a, e = d["added"], d["exec"]
        print(f"  P1 {name:<9}: added mean {ms(a['mean'])}, max {ms(a['max'])} ms; the fake's execution p50 "
              f"{ms(e['p50'])} ms")
    print(f"  P1 first request after start (object_info fetched, connections opened): {ms(r['cold_added'])} ms added")
    for case, d in r["floor"].items():
        print(f"  P1 floor {case:<8}: total client time p50 service {ms(d['service_total']['p50'])} ms, floor "
              f"{ms(d['floor_total']['p50'])} ms (the service's paste-back runs inside ComfyUI's execution); "
              f"difference per pair p50 {ms(d['paired']['p50'])} ms, p95 {ms(d['paired']['p95'])} ms")
        hop = d["http_hop"]["p50"]
        print(f"  P1 floor {case:<8}: of the difference, the HTTP hop alone (benchmarks/http_hop.py: the same body "
              f"to a view that does nothing, same web server) p50 {ms(hop)} ms; the rest "
              f"{ms(d['service']['p50'] - d['floor']['p50'] - hop)} ms")
    print(f"  P2 the fake was idle {ms(c['lead_in'])} ms before the first prompt, {ms(c['idle_between'])} ms between "
          f"prompts in all (longest gap {ms(c['max_gap'])} ms), {ms(c['tail'])} ms after the last; execution p50 "
          f"{ms(c['exec']['p50'])} ms (sequential: {ms(p1m['exec']['p50'])} ms)")
    raw, bef, aft = c["added_raw"], c["added_before"], c["added_after"]
    print(f"  P2 added per request = ComfyUI idle before the prompt started although the request had arrived and "
          f"the previous prompt was done (p50 {ms(bef['p50'])}, max {ms(bef['max'])} ms; includes ComfyUI's own gap "
          f"between prompts) + execution end -> answer (p50 {ms(aft['p50'])}, max {ms(aft['max'])} ms)")
    print(f"  P2 request time - own execution, queueing behind the other prompts included: p50 {ms(raw['p50'])}, "
          f"max {ms(raw['max'])} ms")
    print(f"  vs execution times spread over one polling period ({poll['exec_min']:.2f}-{poll['exec_max']:.2f} s): "
          f"WebSocket added p50 {ms(poll['websocket']['p50'])}, max {ms(poll['websocket']['max'])} ms; 2-s polling "
          f"p50 {ms(poll['poll2s']['p50'])}, max {ms(poll['poll2s']['max'])} ms "
          f"({poll['poll2s']['mean'] / max(poll['websocket']['mean'], 1e-9):.0f}x the WebSocket's mean)")
    if "p3" in r:
        u = r["p3"]
        svc, pil, b = u["service"], u["pillow"], u.get("base64")
        print(f"  P3 input: {svc['input_sizes'][0] / MIB:.1f} MiB PNG + {svc['input_sizes'][1] / MIB:.2f} MiB mask PNG; "
              f"service steps: decode_image, decode_mask, plan, prepare, png_bytes, paste_weight, comfy_mask_png; Pillow bare: "
              f"open+load both, save both as PNG at the service's level {u['level']}"
              f"{' (Pillow at its fastest)' if u['level'] == 0 else ''}")
        print(f"  P3 peak memory: RSS high-water mark above the RSS before (uploads already in memory); "
              f"Pillow bare {pil['peak_bytes'] / MIB:.0f} MiB")
        if b:
            print(f"  P3 JSON form only, base64 data URLs -> bytes before that: {b['median']:.3f} s, peak "
                  f"{b['peak_bytes'] / MIB:.0f} MiB above the text")
    print()


# ---------------------------------------------------------------------------------------------


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=60, help="sequential requests per P1 variant (>= 50)")
    parser.add_argument("--floor-requests", type=int, default=30, help="service/floor pairs per floor case")
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
    parser.add_argument("--burners", type=int, default=0,
                        help="CPU-burning processes running during the whole benchmark (issue 17's busy tail)")
    parser.add_argument("--json", type=Path, help="also write the raw results here")
    parser.add_argument("--keep", action="store_true", help="keep the work folder (logs, images)")
    parser.add_argument("--view", action="store_true",
                        help="do not share the fake's output folder: results come over GET /view (ComfyUI elsewhere)")
    args = parser.parse_args(argv)
    if args.quick:
        args.requests, args.concurrent_requests, args.polling_requests, args.p3_repeat = 8, 16, 3, 1
        args.floor_requests = 6

    work = Path(tempfile.mkdtemp(prefix="img2img-bench-"))
    inputs = HERE / ".inputs"  # generated once, reused (ignored by git)
    img512, mask512 = write_inputs(inputs, 512)
    with_mask = JsonBodies(img512.read_bytes(), mask512.read_bytes(), args.steps)
    without_mask = JsonBodies(img512.read_bytes(), None, args.steps)
    seeds = iter(range(1, 1_000_000))
    report: dict = {"machine": machine()}

    print(f"benchmark: work folder {work} (removed at the end unless --keep)", file=sys.stderr)
    burners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(args.burners)]
    report["burners"] = args.burners
    fake = Fake(work / "comfyui", args.step_delay, args.history_delay)
    report["config"] = {"steps": args.steps, "step_delay": fake.step_delay, "history_delay": fake.history_delay,
                        "clients": args.clients, "view": args.view}
    try:
        service = Service(fake, work, "websocket", shared_output=not args.view)
        try:
            print("P1 ...", file=sys.stderr)
            cold = sequential(service, fake, [with_mask.body(next(seeds))])[0]
            report["cold_added"] = cold.added
            sequential(service, fake, [b.body(next(seeds)) for b in (with_mask, without_mask) for _ in range(3)])
            # the two variants alternate, so that whatever else the machine does hits both alike
            bodies = [b.body(next(seeds)) for _ in range(args.requests) for b in (without_mask, with_mask)]
            samples = sequential(service, fake, bodies)
            for key, mine in (("p1_nomask", samples[0::2]), ("p1_mask", samples[1::2])):
                report[key] = {"added": summary([s.added for s in mine]),
                               "exec": summary([s.exec_seconds for s in mine])}
            print("P1 floor comparison ...", file=sys.stderr)
            report["floor"] = floor_comparison(service, fake, inputs, (64, 512), args.floor_requests, 4, seeds)
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
        service = Service(fake, work, "poll2s", shared_output=not args.view)
        try:
            poll = sequential(service, fake, [with_mask.body(next(seeds), steps=n) for n in spread])
        finally:
            service.stop()
        report["polling"] = {"websocket": summary([s.added for s in ws]), "poll2s": summary([s.added for s in poll]),
                             "exec_min": min(s.exec_seconds for s in ws + poll),
                             "exec_max": max(s.exec_seconds for s in ws + poll)}
    finally:
        fake.stop()
        for burner in burners:
            burner.kill()
            burner.wait()

    if not args.skip_p3:
        print("P3 ...", file=sys.stderr)
        big_image, big_mask = write_inputs(inputs, args.p3_size)
        sys.path.insert(0, str(ROOT))
        from dreamlayer.img2img.png_writer import PNG_COMPRESS_LEVEL
        report["p3"] = {"level": PNG_COMPRESS_LEVEL,
                        **{what: upload_cost(what, big_image, big_mask, args.p3_repeat)
                           for what in ("service", "pillow", "base64")}}

    report["load_after"] = load()
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    print_report(report)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
