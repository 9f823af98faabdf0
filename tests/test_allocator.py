"""The service's process keeps a request's memory for the next one instead of handing it back to
the kernel and faulting it in again (dreamlayer/allocator.py: glibc's malloc, one arena, buffers
up to 4 MiB kept), unless the user tunes malloc with glibc's own variables."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import requests

from dreamlayer import allocator
from images import box_mask, gradient, png

ROOT = Path(__file__).resolve().parent.parent
glibc_only = pytest.mark.skipif(allocator.glibc_mallopt() is None, reason="glibc's malloc only")


@pytest.mark.parametrize("environ, tuned", [
    ({}, False),
    ({"PATH": "/usr/bin", "GLIBC_TUNABLES": "glibc.rtld.optional_static_tls=2048"}, False),
    ({"GLIBC_TUNABLES": "glibc.malloc.arena_max=4"}, True),
    ({"GLIBC_TUNABLES": "glibc.rtld.nns=2:glibc.malloc.trim_threshold=0"}, True),
    ({"MALLOC_ARENA_MAX": "2"}, True),
    ({"MALLOC_TRIM_THRESHOLD_": "0"}, True),
])
def test_glibcs_own_malloc_variables_are_the_users_choice(environ, tuned):
    assert allocator.user_tuned(environ) is tuned


def test_nothing_is_changed_when_the_user_tunes_malloc():
    assert allocator.tune_for_requests({"MALLOC_ARENA_MAX": "4"}) == {}


PAGE_FAULTS = textwrap.dedent("""
    import json, resource, sys, threading
    from dreamlayer import allocator
    applied = allocator.tune_for_requests({}) if sys.argv[1] == "tuned" else {}

    def request_like():  # a dozen buffers of 0.8 MB, written, then freed
        buffers = [bytearray(800_000) for _ in range(12)]
        for b in buffers:
            b[::4096] = b"x" * len(range(0, len(b), 4096))
        del buffers

    faults = []
    def waitress_thread():  # not the main thread: with glibc's defaults it has an arena of its own
        request_like()
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        for _ in range(20):
            request_like()
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    t = threading.Thread(target=waitress_thread)
    t.start()
    t.join()
    print(json.dumps({"applied": applied, "faults": faults[0]}))
""")


def page_faults(mode: str) -> dict:
    out = subprocess.run([sys.executable, "-c", PAGE_FAULTS, mode], cwd=ROOT, capture_output=True, text=True,
                         timeout=60, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


@glibc_only
def test_a_threads_freed_request_buffers_are_reused_without_page_faults():
    plain, tuned = page_faults("plain"), page_faults("tuned")
    assert tuned["applied"] == {"arena_max": 1, "mmap_threshold": 4 << 20, "trim_threshold": 32 << 20}
    pages_touched = 20 * 12 * (800_000 // 4096)
    assert plain["faults"] > pages_touched // 2  # the premise: glibc's defaults fault them in again
    assert tuned["faults"] < pages_touched // 50


def minor_faults(pid: int) -> int:
    """The process's minor page faults so far (proc(5): the 10th field of /proc/PID/stat)."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    return int(stat.rsplit(")", 1)[1].split()[7])


def faults_per_request(service, n: int = 6) -> float:
    files = {"image": ("i.png", png(gradient(512, 512))), "mask": ("m.png", png(box_mask((512, 512), (128, 128, 384, 384))))}
    params = {"prompt": "a red cube", "steps": 2, "seed": 3}

    def one(seed):
        resp = requests.post(f"{service.url}/api/img2img", files=files,
                             data={"params": json.dumps({**params, "seed": seed})}, timeout=60)
        assert resp.status_code == 200, resp.text
    for seed in range(3):  # threads started, connections opened, caches filled
        one(seed)
    before = minor_faults(service.pid)
    for seed in range(3, 3 + n):
        one(seed)
    return (minor_faults(service.pid) - before) / n


@glibc_only
@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc")
def test_the_service_process_keeps_a_requests_memory_for_the_next(service_process):
    """python img2img_server.py tunes malloc at start; MALLOC_ARENA_MAX set by the user leaves
    glibc's defaults, under which every 512² request with a mask faults its buffers in again."""
    tuned = faults_per_request(service_process())
    untuned = faults_per_request(service_process(MALLOC_ARENA_MAX="8"))
    assert untuned > 400, untuned  # 1.6 MB and more of pages touched anew per request (measured: 727)
    assert tuned < untuned / 3, (tuned, untuned)  # (measured: 127)
