"""Starting a local ComfyUI (COMFYUI_DIR) — against a fake main.py, no real ComfyUI needed."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest
import requests

from dreamlayer.comfyui.process import ComfyUIProcess, LaunchError, LaunchSpec, choose_python, launch_spec, listen_address
from dreamlayer.config.saved_paths import Directories
from waiting import wait_until

ROOT = Path(__file__).resolve().parent.parent

#: Stands in for ComfyUI's main.py: records how it was started, answers /system_stats.
FAKE_MAIN = textwrap.dedent('''
    import argparse, http.server, json, os, sys
    p = argparse.ArgumentParser()
    p.add_argument("--listen"); p.add_argument("--port", type=int)
    p.add_argument("--output-directory"); p.add_argument("--input-directory")
    p.add_argument("--base-directory"); p.add_argument("--enable-cors-header")
    p.add_argument("--cpu", action="store_true")
    a = p.parse_args()
    with open("started.json", "w") as f:
        json.dump({"argv": sys.argv, "cwd": os.getcwd(), "pid": os.getpid()}, f)
    if os.environ.get("FAKE_MAIN_EXIT"):
        print("fake ComfyUI failing on purpose", flush=True)
        sys.exit(int(os.environ["FAKE_MAIN_EXIT"]))

    class H(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            body = b'{"system": {"comfyui_version": "fake"}}'
            self.send_response(200 if self.path == "/system_stats" else 404)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        def log_message(self, *args):
            pass

    print("To see the GUI go to: http://%s:%d" % (a.listen, a.port), flush=True)
    http.server.HTTPServer((a.listen, a.port), H).serve_forever()
''')


@pytest.fixture
def comfy_dir(tmp_path):
    d = tmp_path / "ComfyUI"
    d.mkdir()
    (d / "main.py").write_text(FAKE_MAIN)
    return d


def is_up(url):
    def check():
        try:
            return requests.get(url + "/system_stats", timeout=1).status_code == 200
        except requests.RequestException:
            return False
    return check


def gone(pid: int) -> bool:
    """Not running (a zombie of a process we did not reap counts as stopped)."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def wait_gone(pid: int) -> None:
    wait_until(lambda: gone(pid), what=f"process {pid} to end")


def test_command_line(tmp_path):
    spec = LaunchSpec(comfyui_dir=tmp_path, host="127.0.0.1", port=8188, output_dir=tmp_path / "out",
                      input_dir=tmp_path / "in", models_dir=tmp_path / "base", python="/py",
                      cors_origin="http://localhost:8080", extra_args=("--cpu",))
    assert spec.command() == [
        "/py", str(tmp_path / "main.py"), "--listen", "127.0.0.1", "--port", "8188",
        "--output-directory", str(tmp_path / "out"), "--input-directory", str(tmp_path / "in"),
        "--base-directory", str(tmp_path / "base"), "--enable-cors-header", "http://localhost:8080", "--cpu"]
    bare = LaunchSpec(comfyui_dir=tmp_path, host="127.0.0.1", port=1, output_dir=tmp_path, input_dir=tmp_path)
    assert "--base-directory" not in bare.command() and "--enable-cors-header" not in bare.command()


def test_listen_address():
    assert listen_address("http://localhost:8188") == ("127.0.0.1", 8188)
    assert listen_address("http://127.0.0.1:9000/") == ("127.0.0.1", 9000)
    assert listen_address("http://127.0.0.1") == ("127.0.0.1", 80)
    with pytest.raises(LaunchError, match="not an address of this machine"):
        listen_address("http://192.0.2.1:8188")  # TEST-NET-1: never local


def test_choose_python(tmp_path):
    assert choose_python(tmp_path, "/opt/py") == "/opt/py"
    assert choose_python(tmp_path) == sys.executable
    venv_py = tmp_path / "venv" / ("Scripts" if os.name == "nt" else "bin") / ("python.exe" if os.name == "nt" else "python")
    venv_py.parent.mkdir(parents=True)
    venv_py.write_text("")
    assert choose_python(tmp_path) == str(venv_py)


def test_launch_spec_uses_saved_directories(comfy_dir, tmp_path):
    spec = launch_spec(comfyui_dir=comfy_dir, comfy_api_url="http://localhost:8190",
                       input_dir=comfy_dir / "input", directories=Directories(tmp_path / "out", None),
                       python="/py")
    assert (spec.host, spec.port, spec.output_dir, spec.models_dir) == ("127.0.0.1", 8190, tmp_path / "out", None)
    default = launch_spec(comfyui_dir=comfy_dir, comfy_api_url="http://127.0.0.1:8190",
                          input_dir=comfy_dir / "input", directories=Directories(None, None))
    assert default.output_dir == comfy_dir / "output"


def test_missing_main_py_is_a_clear_error(tmp_path):
    spec = LaunchSpec(comfyui_dir=tmp_path, host="127.0.0.1", port=1, output_dir=tmp_path, input_dir=tmp_path)
    with pytest.raises(LaunchError, match="has no main.py"):
        ComfyUIProcess(spec, tmp_path / "log").start()


def test_start_wait_and_stop(comfy_dir, tmp_path, reserve_port):
    port = reserve_port()
    spec = LaunchSpec(comfyui_dir=comfy_dir, host="127.0.0.1", port=port, output_dir=tmp_path / "out",
                      input_dir=comfy_dir / "input", python=sys.executable)
    proc = ComfyUIProcess(spec, tmp_path / "logs" / "comfyui.log").start()
    try:
        assert proc.wait_until_up(is_up(f"http://127.0.0.1:{port}"), timeout=60, interval=0.05)
        started = json.loads((comfy_dir / "started.json").read_text())
        assert started["argv"][1:] == spec.command()[2:]
        assert Path(started["cwd"]) == comfy_dir
        assert (tmp_path / "out").is_dir() and (comfy_dir / "input").is_dir()
    finally:
        proc.stop(timeout=5)
    assert not proc.running()
    log = (tmp_path / "logs" / "comfyui.log").read_text()
    assert "starting:" in log and f"To see the GUI go to: http://127.0.0.1:{port}" in log


def test_early_exit_is_reported_quickly(comfy_dir, tmp_path, monkeypatch, reserve_port):
    monkeypatch.setenv("FAKE_MAIN_EXIT", "3")
    spec = LaunchSpec(comfyui_dir=comfy_dir, host="127.0.0.1", port=reserve_port(), output_dir=tmp_path / "o",
                      input_dir=tmp_path / "i", python=sys.executable)
    proc = ComfyUIProcess(spec, tmp_path / "comfyui.log").start()
    started = time.monotonic()
    assert not proc.wait_until_up(lambda: False, timeout=120, interval=0.05)
    assert time.monotonic() - started < 60  # when it exits, not at the 120 s timeout
    assert proc.exit_code() == 3
    assert "failing on purpose" in (tmp_path / "comfyui.log").read_text()


def _env(comfy_dir, tmp_path, comfy_port, **extra):
    env = dict(os.environ, COMFYUI_DIR=str(comfy_dir), COMFY_API_URL=f"http://127.0.0.1:{comfy_port}",
               COMFYUI_PYTHON=sys.executable, DREAMLAYER_LOG_DIR=str(tmp_path / "logs"),
               DREAMLAYER_SETTINGS_FILE=str(tmp_path / "settings.json"),
               SERVED_IMAGES_DIR=str(tmp_path / "served"), COMFYUI_START_TIMEOUT_S="60")
    env.pop("DREAMLAYER_DEMO", None)
    env.update(extra)
    return env


def test_dream_layer_start_comfyui_serves_and_stops_its_child(comfy_dir, tmp_path, reserve_port):
    comfy_port, port = reserve_port(), reserve_port()
    out = tmp_path / "chosen_output"
    out.mkdir()
    (tmp_path / "settings.json").write_text(json.dumps({"outputDirectory": str(out)}))
    proc = subprocess.Popen([sys.executable, str(ROOT / "dream_layer.py"), "--start-comfyui"], cwd=ROOT,
                            env=_env(comfy_dir, tmp_path, comfy_port, DREAMLAYER_PORT=str(port)),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        def comfy_up():
            assert proc.poll() is None, proc.stdout.read().decode()
            return is_up(f"http://127.0.0.1:{comfy_port}")()
        wait_until(comfy_up, what="the ComfyUI started by dream_layer.py to answer")

        def healthy():
            try:
                body = requests.get(f"http://127.0.0.1:{port}/health", timeout=1).json()
            except requests.RequestException:
                return False
            return body["comfyui"]["reachable"]
        wait_until(healthy, what="dream_layer.py to report ComfyUI reachable")
        health = requests.get(f"http://127.0.0.1:{port}/health", timeout=2).json()
        child = health["comfyui"]["started_by_dream_layer"]
        assert child["running"] and child["log"] == str(tmp_path / "logs" / "comfyui.log")
        started = json.loads((comfy_dir / "started.json").read_text())
        assert started["pid"] == child["pid"]
        argv = started["argv"]
        assert argv[argv.index("--output-directory") + 1] == str(out)
        assert argv[argv.index("--port") + 1] == str(comfy_port)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
    assert proc.returncode == 0
    wait_gone(started["pid"])


def test_comfyui_only_runs_in_foreground_and_stops_on_sigterm(comfy_dir, tmp_path, reserve_port):
    comfy_port = reserve_port()
    proc = subprocess.Popen([sys.executable, str(ROOT / "dream_layer.py"), "--comfyui-only"], cwd=ROOT,
                            env=_env(comfy_dir, tmp_path, comfy_port),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_until(is_up(f"http://127.0.0.1:{comfy_port}"), what="ComfyUI to answer")
        pid = json.loads((comfy_dir / "started.json").read_text())["pid"]
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
    assert proc.returncode == 0
    wait_gone(pid)
    # nothing is left listening
    assert not is_up(f"http://127.0.0.1:{comfy_port}")()


def test_comfyui_only_refuses_when_one_answers(comfy_dir, tmp_path, reserve_port):
    comfy_port = reserve_port()
    spec = LaunchSpec(comfyui_dir=comfy_dir, host="127.0.0.1", port=comfy_port, output_dir=tmp_path / "o",
                      input_dir=tmp_path / "i", python=sys.executable)
    first = ComfyUIProcess(spec, tmp_path / "first.log").start()
    try:
        assert first.wait_until_up(is_up(f"http://127.0.0.1:{comfy_port}"), timeout=60, interval=0.05)
        result = subprocess.run([sys.executable, str(ROOT / "dream_layer.py"), "--comfyui-only"], cwd=ROOT,
                                env=_env(comfy_dir, tmp_path, comfy_port), capture_output=True, text=True,
                                timeout=60)
        assert result.returncode == 3
        assert "already answers" in result.stderr
    finally:
        first.stop(timeout=5)


def test_without_comfyui_dir_the_flag_explains(tmp_path, reserve_port):
    env = _env(tmp_path, tmp_path, reserve_port())
    env.pop("COMFYUI_DIR")
    result = subprocess.run([sys.executable, str(ROOT / "dream_layer.py"), "--comfyui-only"], cwd=ROOT,
                            env=env, capture_output=True, text=True, timeout=30)
    assert result.returncode == 2
    assert "COMFYUI_DIR is not set" in result.stderr
