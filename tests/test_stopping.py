"""Stopping `python img2img_server.py` (SIGTERM, as the start scripts do, or Ctrl-C) without
REDIS_URL: requests in progress still answer, and prompts this service leaves on ComfyUI are
cancelled rather than run for nobody (found with the launcher stopped mid-generation)."""
from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests

from images import gradient, png
from waiting import wait_until

PARAMS = {"prompt": "a red cube", "steps": 4, "seed": 3}


@pytest.fixture
def service(service_process):
    """img2img_server.py in its own process on the fake ComfyUI (inputs over HTTP)."""
    return service_process()


def submit(url, params):
    return requests.post(f"{url}/api/img2img", files={"image": ("i.png", png(gradient(32, 32)))},
                         data={"params": json.dumps(params)}, timeout=60)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_stopping_cancels_the_prompts_it_leaves_on_comfyui(service, fake_comfy, signum):
    fake_comfy.hang_next()
    resp = submit(service.url, {**PARAMS, "async": True})
    assert resp.status_code == 202, resp.text
    wait_until(fake_comfy.running_prompt_id, what="the job's prompt to run on ComfyUI")
    service.send_signal(signum)
    assert service.wait(30) == 0, service.log()[-3000:]
    assert fake_comfy.interrupt_count >= 1, service.log()[-3000:]  # again if it was starting then
    wait_until(lambda: fake_comfy.running_prompt_id() is None, what="ComfyUI to stop the prompt")


def test_a_request_in_progress_still_answers_after_sigterm(service, fake_comfy):
    fake_comfy.hold_views()  # the run ends on ComfyUI; its output download waits here
    try:
        with ThreadPoolExecutor(max_workers=1) as pool:
            answer = pool.submit(submit, service.url, PARAMS)
            wait_until(lambda: fake_comfy.views_held() == 1, what="the request's output download")
            service.terminate()
            port = int(service.url.rsplit(":", 1)[1])

            def refused() -> bool:
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=2).close()
                except ConnectionRefusedError:
                    return True
                return False
            wait_until(refused, what="the service to stop accepting connections")
            fake_comfy.release_views()
            resp = answer.result(timeout=60)
        assert resp.status_code == 200 and resp.json()["status"] == "success", resp.text
        assert service.wait(30) == 0, service.log()[-3000:]
        assert fake_comfy.interrupt_count == 0  # nothing was left to cancel
    finally:
        fake_comfy.release_views()


def test_a_request_still_running_after_the_grace_period_is_cancelled_and_answers(service, fake_comfy):
    """It had its connection closed with no answer (and its prompt cancelled only afterwards):
    now its generation is cancelled first, and it answers 409 before the service ends."""
    fake_comfy.hang_next()
    with ThreadPoolExecutor(max_workers=1) as pool:
        answer = pool.submit(submit, service.url, PARAMS)
        wait_until(fake_comfy.running_prompt_id, what="the request's prompt to run")
        service.terminate()
        resp = answer.result(timeout=60)  # the grace period (10 s), then the cancel
    assert (resp.status_code, resp.json()["code"]) == (409, "interrupted"), resp.text
    assert service.wait(30) == 0, service.log()[-3000:]
    assert fake_comfy.interrupt_count == 1


ROOT = Path(__file__).resolve().parent.parent


def run_script(template: str, **fields) -> subprocess.CompletedProcess:
    """A Python script (template with ``{root}`` and ``fields``) in a process of its own: the
    signals it sends itself and the handlers it sets touch nothing of the test run's."""
    script = template.format(root=str(ROOT), **fields)
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)


SIGNAL_WAIT = """
import os, signal, sys
sys.path.insert(0, {root!r})
from dreamlayer.img2img.graceful_stop import SignalWait
waiter = SignalWait()
os.kill(os.getpid(), signal.SIGTERM)
{then}
os.kill(os.getpid(), signal.SIGTERM)
print("survived the second", flush=True)
"""


@pytest.mark.parametrize("then, said", [
    ("print('caught', flush=True)", "caught"),  # a start still under way: the first one waits
    ("print(waiter.wait().name, flush=True)", "SIGTERM"),  # wait() returns it, then handlers are back
])
def test_a_worker_replicas_signals_the_first_is_kept_for_wait_the_second_ends_the_process(then, said):
    """graceful_stop.SignalWait (IMG2IMG_ROLE=worker): a SIGTERM that comes while the replica
    starts is kept for wait(); a second one ends the process by SIGTERM's own action, before
    wait() (a start that hangs can be stopped) or after it."""
    proc = run_script(SIGNAL_WAIT, then=then)
    assert proc.stdout.split() == [said], proc.stdout + proc.stderr
    assert proc.returncode == -signal.SIGTERM, proc.stderr


SIGNAL_WAIT_FAILED_START = """
import os, signal, sys
sys.path.insert(0, {root!r})
from dreamlayer.img2img.graceful_stop import SignalWait
signal.signal(signal.SIGTERM, lambda signum, frame: print("own handler", flush=True))
try:
    with SignalWait() as waiter:
        raise RuntimeError("the start failed")
except RuntimeError:
    pass
print("wakeup fd", signal.set_wakeup_fd(-1), flush=True)
os.kill(os.getpid(), signal.SIGTERM)
"""


def test_a_worker_replica_whose_start_fails_gets_its_previous_signal_handling_back():
    """Leaving SignalWait's block by an exception (create_app failed) puts back the handlers and
    the wakeup fd that were there before: a later SIGTERM is not swallowed by a wait that never
    comes."""
    proc = run_script(SIGNAL_WAIT_FAILED_START)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == ["wakeup fd -1", "own handler"], proc.stdout + proc.stderr


GRACEFUL_STOP_WHILE_STARTING = """
import logging, os, signal, sys
sys.path.insert(0, {root!r})
from waitress.server import create_server
from dreamlayer.img2img.graceful_stop import GracefulStop
logging.basicConfig(level=logging.INFO, stream=sys.stdout, format="%(message)s")
stopping = GracefulStop()
os.kill(os.getpid(), signal.SIGTERM)  # while "starting": kept
{then}
server = create_server(lambda environ, start_response: [], host="127.0.0.1", port=0)
stopping.serve(server, lambda: print("on_stop", flush=True))
server.run()
print("stopped", stopping.deadline is not None, flush=True)
"""


@pytest.mark.parametrize("then, lines, code", [
    ("", ["SIGTERM while starting: the service stops once it has started", "on_stop",
          "SIGTERM: no new connections or jobs; requests in progress have 10 s to answer", "stopped True"], 0),
    ("os.kill(os.getpid(), signal.SIGTERM)",  # a second one while starting: ends the process there
     ["SIGTERM while starting: the service stops once it has started"], -signal.SIGTERM),
])
def test_a_sigterm_while_the_service_starts_stops_it_once_its_server_exists(then, lines, code):
    """graceful_stop.GracefulStop is created before the queue workers start: a SIGTERM before the
    server exists is kept and stops the server as soon as it is given (its run() returns); a
    second one ends the process at once."""
    proc = run_script(GRACEFUL_STOP_WHILE_STARTING, then=then)
    assert proc.returncode == code, proc.stdout + proc.stderr
    assert sorted(proc.stdout.splitlines()) == sorted(lines), proc.stdout + proc.stderr
