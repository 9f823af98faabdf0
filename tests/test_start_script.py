"""start_dream_layer.sh run for real on ports the test holds: the demo (fake ComfyUI) brings both services
up, an inpainting request goes through, and SIGINT leaves no process behind. The .bat is
checked statically for the same commands and variables."""
from __future__ import annotations

import io
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

import psutil
import pytest
import requests
from PIL import Image

from waiting import wait_until

ROOT = Path(__file__).resolve().parent.parent
SH = ROOT / "start_dream_layer.sh"
BAT = ROOT / "start_dream_layer.bat"

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="runs the POSIX script")


#: Upper bound for a script to start or stop its services (never reached when they do).
DEADLINE = 60


def answers(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=5):
            return True
    except OSError:
        return False


def descendants(pid: int) -> set:
    """Every live process below ``pid``."""
    try:
        return {child.pid for child in psutil.Process(pid).children(recursive=True)}
    except psutil.NoSuchProcess:
        return set()


def alive(pid: int) -> bool:
    """Running (a zombie of a process nobody reaped does not count)."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


class Script:
    """start_dream_layer.sh in its own session, its console output collected."""

    def __init__(self, tmp_path: Path, ports: dict, *args, **env_extra):
        self.ports = ports
        py_in_venv = Path(sys.prefix) / "bin" / "python"
        if not py_in_venv.exists():
            pytest.skip("the tests must run inside a virtualenv (the script reuses it)")
        env = dict(os.environ)
        for var in ("COMFYUI_DIR", "COMFYUI_INPUT_DIR", "COMFYUI_OUTPUT_DIR", "DREAMLAYER_DEMO", "IMG2IMG_API_KEY"):
            env.pop(var, None)
        env.update({
            "DREAMLAYER_VENV": sys.prefix, "DREAMLAYER_SKIP_INSTALL": "1",
            "DREAMLAYER_LOG_DIR": str(tmp_path / "logs"), "DREAMLAYER_DEMO_DIR": str(tmp_path / "demo"),
            "DREAMLAYER_SETTINGS_FILE": str(tmp_path / "settings.json"),
            "SERVED_IMAGES_DIR": str(tmp_path / "served"), "DREAMLAYER_HEALTH_TIMEOUT_S": str(DEADLINE),
            "DREAMLAYER_PORT": str(self.ports["dl"]), "IMG2IMG_PORT": str(self.ports["img"]),
            "PUBLIC_BASE_URL": f"http://127.0.0.1:{self.ports['img']}",
            "COMFY_API_URL": f"http://127.0.0.1:{self.ports['comfy']}",
        })
        env.update(env_extra)
        self.log_dir = tmp_path / "logs"
        self.lines: list = []
        self.proc = subprocess.Popen(["bash", str(SH), *args], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, text=True,
                                     start_new_session=True)
        self.seen: set = set()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self):
        for line in self.proc.stdout:
            self.lines.append(line)

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def wait_for(self, text: str) -> None:
        def printed_or_exited():
            self.seen |= descendants(self.proc.pid)
            return text in self.output or self.proc.poll() is not None
        try:
            wait_until(printed_or_exited, 2 * DEADLINE, what=f"{text!r} to be printed", interval=0.05)
        except AssertionError:
            pass
        if text in self.output:
            return
        logs = "".join(f"\n--- {p.name}\n{p.read_text(errors='replace')[-2000:]}"
                       for p in sorted(self.log_dir.glob("*.log")))
        pytest.fail(f"{text!r} not printed (exit code {self.proc.poll()}):\n{self.output}{logs}")

    def interrupt(self, timeout: float = DEADLINE) -> int:
        self.seen |= descendants(self.proc.pid)
        self.proc.send_signal(signal.SIGINT)
        code = self.proc.wait(timeout)
        self._reader.join(5)
        return code

    def cleanup(self) -> None:
        """After a failed test: stop exactly what this script started."""
        self.seen |= descendants(self.proc.pid) if self.proc.poll() is None else set()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(5)
        for pid in self.seen:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)


@pytest.fixture
def script_runner(tmp_path, reserve_port):
    """Runs the script on three ports this test holds (see service_fixtures.reserve_port)."""
    started = []

    def run(*args, **env):
        ports = {"dl": reserve_port(), "img": reserve_port(), "comfy": reserve_port()}
        s = Script(tmp_path, ports, *args, **env)
        started.append(s)
        return s
    yield run
    for s in started:
        s.cleanup()


def png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return buf.getvalue()


def test_demo_end_to_end_and_clean_stop(script_runner, tmp_path):
    # a real install's folders configured for normal runs: the demo's stand-in must not use them
    real_input, real_output = tmp_path / "real-comfyui" / "input", tmp_path / "real-comfyui" / "output"
    real_input.mkdir(parents=True)
    real_output.mkdir()
    s = script_runner("--demo", COMFYUI_INPUT_DIR=str(real_input), COMFYUI_OUTPUT_DIR=str(real_output))
    s.wait_for("Press Ctrl-C")
    dl, img, comfy = s.ports["dl"], s.ports["img"], s.ports["comfy"]
    assert "DEMO MODE" in s.output and "runs NO diffusion model" in s.output
    assert f"http://127.0.0.1:{dl}" in s.output and f"http://127.0.0.1:{img}" in s.output
    assert len(s.seen) >= 3, s.seen  # fake ComfyUI, dream_layer, img2img

    health = requests.get(f"http://127.0.0.1:{dl}/health", timeout=5).json()
    assert health["comfyui"]["reachable"] is True and health["comfyui"]["demo"] is True
    assert "no diffusion model" in health["comfyui"]["note"]
    assert requests.get(f"http://127.0.0.1:{img}/health", timeout=5).json()["comfyui"]["reachable"] is True
    models = requests.get(f"http://127.0.0.1:{dl}/api/models", timeout=5).json()
    assert models["models"][0]["filename"] == "tiny-sd15-random.safetensors"

    # an inpainting request through the started img2img service (black = inpaint)
    image = Image.new("RGB", (64, 64), (200, 120, 40))
    mask = Image.new("L", (64, 64), 255)
    mask.paste(0, (16, 16, 48, 48))
    params = {"prompt": "a red apple", "steps": 2, "model_name": "tiny-sd15-random.safetensors",
              "batch_size": 1, "seed": 7}
    resp = requests.post(f"http://127.0.0.1:{img}/api/img2img", timeout=30, files={
        "image": ("image.png", png(image), "image/png"), "mask": ("mask.png", png(mask), "image/png")},
        data={"params": json.dumps(params)})
    assert resp.status_code == 200, resp.text[:1000]
    images = resp.json()["comfy_response"]["generated_images"]
    assert images
    got = requests.get(images[0]["url"], timeout=10)
    assert got.status_code == 200 and got.content[:8] == b"\x89PNG\r\n\x1a\n"

    assert s.interrupt() == 0
    assert "Stopped." in s.output
    left = [pid for pid in s.seen if alive(pid)]
    assert not left, f"processes left behind: {left}"
    for port in (dl, img, comfy):
        assert not answers(port), f"port {port} still answers"
    for name in ("dream_layer.log", "img2img.log", "fake_comfyui.log"):
        assert (s.log_dir / name).stat().st_size > 0
    assert "It runs no diffusion model" in (s.log_dir / "fake_comfyui.log").read_text()
    assert not any(real_input.iterdir()) and not any(real_output.iterdir())
    assert "COMFYUI_OUTPUT_DIR" not in (s.log_dir / "img2img.log").read_text()  # no stray output folder


def test_fake_comfyui_standalone_refuses_a_busy_port(tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        result = subprocess.run([sys.executable, "-m", "dreamlayer.comfyui.fake", "--port", str(port), "--root",
                                 str(tmp_path / "root")], env=env, capture_output=True, text=True, timeout=30)
    assert result.returncode == 1 and f"cannot listen on 127.0.0.1:{port}" in result.stderr


def test_without_comfyui_the_services_start_and_say_how_to_point_at_one(script_runner):
    s = script_runner()
    s.wait_for("Press Ctrl-C")
    assert "NOT answering" in s.output
    assert "COMFYUI_DIR" in s.output and "COMFY_API_URL" in s.output and "--demo" in s.output
    health = requests.get(f"http://127.0.0.1:{s.ports['dl']}/health", timeout=5).json()
    assert health["comfyui"]["reachable"] is False and "COMFY_API_URL" in health["comfyui"]["hint"]
    assert "demo" not in health["comfyui"]
    assert s.interrupt() == 0
    assert not [pid for pid in s.seen if alive(pid)]


def test_a_busy_port_is_reported_and_nothing_is_killed(script_runner):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        s = script_runner("--demo", IMG2IMG_PORT=str(port))
        code = s.proc.wait(DEADLINE)
        s._reader.join(5)
        assert answers(port)  # the other listener is untouched
    assert code == 1
    assert f"Port {port} (img2img) is already in use" in s.output and "IMG2IMG_PORT" in s.output
    assert "started" not in s.output


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP])
def test_sigterm_and_a_closed_terminal_also_stop_everything(script_runner, signum):
    s = script_runner("--demo")
    s.wait_for("Press Ctrl-C")
    s.seen |= descendants(s.proc.pid)
    s.proc.send_signal(signum)
    assert s.proc.wait(DEADLINE) == 0
    assert not [pid for pid in s.seen if alive(pid)]


def test_a_service_that_dies_takes_the_rest_down_with_its_log(script_runner):
    s = script_runner("--demo")
    s.wait_for("Press Ctrl-C")
    s.seen |= descendants(s.proc.pid)
    img2img_pid = int(re.search(r"started img2img \(pid (\d+)", s.output).group(1))
    os.kill(img2img_pid, signal.SIGKILL)
    assert s.proc.wait(DEADLINE) == 1
    s._reader.join(5)
    assert "img2img exited with code -9" in s.output and "img2img.log" in s.output
    assert not [pid for pid in s.seen if alive(pid)]


def test_unknown_option_and_help():
    result = subprocess.run(["bash", str(SH), "--bogus"], capture_output=True, text=True, timeout=10)
    assert result.returncode == 2 and "unknown option --bogus" in result.stderr
    result = subprocess.run(["bash", str(SH), "--help"], capture_output=True, text=True, timeout=10)
    assert result.returncode == 0 and "--demo" in result.stdout


# ---------------------------------------------------------------------------- the .bat, statically

def _variables(text: str, pattern: str) -> set:
    return set(re.findall(pattern, text))


def test_bat_matches_the_shell_script():
    sh, bat = SH.read_text(), BAT.read_text()
    # the same knobs, under the same names
    for var in ("DREAMLAYER_VENV", "DREAMLAYER_SKIP_INSTALL", "PYTHON"):
        assert var in sh and var in bat, var
    for flag in ("--demo", "--no-install"):
        assert flag in sh and flag in bat, flag
    # the same steps: a virtualenv, pip from the right requirements, then the shared supervisor
    assert "-m venv" in sh and "-m venv" in bat
    assert re.search(r"pip install .*-r", sh) and re.search(r"pip install .*-r", bat)
    assert "requirements.txt" in bat and "requirements-demo.txt" in bat
    assert 'start_dream_layer.py" "$@"' in sh
    assert 'start_dream_layer.py" %*' in bat
    assert r"\Scripts\python.exe" in bat and "/bin/python" in sh
    # and none of what DreamLayer's scripts did to other people's processes
    for text in (sh, bat):
        for forbidden in ("kill -9", "lsof", "taskkill", "netstat", "killall", "pkill"):
            assert forbidden not in text.lower(), forbidden
    # every label jumped to exists; errors end the script with a non-zero code
    labels = set(re.findall(r"^:(\w+)", bat, re.M))
    assert set(re.findall(r"goto (\w+)", bat)) <= labels
    assert "exit /b 1" in bat and "exit /b %errorlevel%" in bat


def test_bat_is_checked_out_with_crlf():
    attributes = (ROOT / ".gitattributes").read_text()
    assert re.search(r"^\*\.bat\s+text\s+eol=crlf", attributes, re.M)


def test_supervisor_reads_the_services_variables():
    """Hosts and ports come from the variables the services read (through the same Config classes)."""
    text = (ROOT / "dreamlayer" / "launcher.py").read_text()
    assert "DreamLayerConfig.from_env" in text
    from dreamlayer.launcher import Plan
    plan = Plan.from_env(False, {"DREAMLAYER_HOST": "127.0.0.2", "DREAMLAYER_PORT": "6002",
                                 "IMG2IMG_HOST": "127.0.0.3", "IMG2IMG_PORT": "6004",
                                 "COMFY_API_URL": "http://127.0.0.1:9999"})
    assert (plan.dl.host, plan.dl.port, plan.img2img.host, plan.img2img.port) == ("127.0.0.2", 6002, "127.0.0.3", 6004)
    assert plan.dl.comfy_api_url == "http://127.0.0.1:9999"


# ---------------------------------------------------------------------------- venv and install steps

STUB_PYTHON = """#!/bin/sh
# records each call; "-m venv DIR" makes a venv holding a copy of this stub
echo "$0 $*" >> "$STUB_CALLS"
if [ "$1" = "-m" ] && [ "$2" = "venv" ]; then mkdir -p "$3/bin" && cp "$0" "$3/bin/python" && exit 0; fi
exit 0
"""


@pytest.fixture
def stub_python(tmp_path):
    stub = tmp_path / "stub_python3"
    stub.write_text(STUB_PYTHON)
    stub.chmod(0o755)
    return stub


def run_sh(tmp_path, *args, cwd=None, **env_extra):
    env = dict(os.environ, STUB_CALLS=str(tmp_path / "calls.txt"), **env_extra)
    env.pop("DREAMLAYER_SKIP_INSTALL", None)
    result = subprocess.run(["bash", str(SH), *args], env=env, capture_output=True, text=True, timeout=20,
                            cwd=cwd)
    calls = (tmp_path / "calls.txt").read_text().splitlines() if (tmp_path / "calls.txt").exists() else []
    (tmp_path / "calls.txt").unlink(missing_ok=True)
    return result, calls


def test_creates_the_venv_installs_once_and_hands_over(tmp_path, stub_python):
    venv = tmp_path / "venv"
    result, calls = run_sh(tmp_path, PYTHON=str(stub_python), DREAMLAYER_VENV=str(venv))
    assert result.returncode == 0, result.stderr
    assert f"-m venv {venv}" in calls[1]  # after the version check
    vpy = f"{venv}/bin/python"
    assert calls[2] == f"{vpy} -m pip install -q --disable-pip-version-check -r {ROOT}/requirements.txt"
    assert calls[3] == f"{vpy} {ROOT}/start_dream_layer.py"
    # second run: venv reused, requirements unchanged -> no pip
    result, calls = run_sh(tmp_path, PYTHON=str(stub_python), DREAMLAYER_VENV=str(venv))
    assert calls == [f"{vpy} {ROOT}/start_dream_layer.py"]
    # the demo needs requirements-demo.txt (aiohttp, numpy for the fake ComfyUI)
    result, calls = run_sh(tmp_path, "--demo", PYTHON=str(stub_python), DREAMLAYER_VENV=str(venv))
    assert calls == [f"{vpy} -m pip install -q --disable-pip-version-check -r {ROOT}/requirements-demo.txt",
                     f"{vpy} {ROOT}/start_dream_layer.py --demo"]
    # --no-install skips pip even when requirements would need it
    (venv / ".dreamlayer-installed").unlink()
    result, calls = run_sh(tmp_path, "--no-install", PYTHON=str(stub_python), DREAMLAYER_VENV=str(venv))
    assert calls == [f"{vpy} {ROOT}/start_dream_layer.py --no-install"]


def test_a_relative_venv_is_where_the_script_was_run(tmp_path, stub_python):
    """The script changes to the project folder before it hands over: a relative
    DREAMLAYER_VENV was created in the current folder, then looked for in the project's."""
    result, calls = run_sh(tmp_path, PYTHON=str(stub_python), DREAMLAYER_VENV="relvenv", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert f"-m venv {tmp_path}/relvenv" in calls[1]
    assert calls[-1] == f"{tmp_path}/relvenv/bin/python {ROOT}/start_dream_layer.py"


def test_missing_python_is_explained(tmp_path):
    result, _ = run_sh(tmp_path, PYTHON=str(tmp_path / "no-such-python"), DREAMLAYER_VENV=str(tmp_path / "v"))
    assert result.returncode == 1 and "Install Python 3.10 or newer" in result.stderr


# ---------------------------------------------------------------------------- with a ComfyUI install

@pytest.fixture
def comfy_install(tmp_path):
    from test_comfyui_process import FAKE_MAIN
    d = tmp_path / "ComfyUI"
    d.mkdir()
    (d / "main.py").write_text(FAKE_MAIN)
    return d


def test_starts_comfyui_from_comfyui_dir_and_stops_it(script_runner, comfy_install):
    s = script_runner(COMFYUI_DIR=str(comfy_install), COMFYUI_PYTHON=sys.executable)
    s.wait_for("Press Ctrl-C")
    assert f"Starting ComfyUI from {comfy_install}" in s.output
    assert "started by this script" in s.output
    started = json.loads((comfy_install / "started.json").read_text())
    assert started["pid"] in s.seen | descendants(s.proc.pid)
    assert started["argv"][started["argv"].index("--port") + 1] == str(s.ports["comfy"])
    health = requests.get(f"http://127.0.0.1:{s.ports['dl']}/health", timeout=5).json()
    assert health["comfyui"]["reachable"] is True
    assert s.interrupt() == 0
    assert not alive(started["pid"])
    assert not [pid for pid in s.seen if alive(pid)]
    assert not answers(s.ports["comfy"])


def test_a_comfyui_that_fails_to_start_leaves_the_services_running(script_runner, comfy_install):
    s = script_runner(COMFYUI_DIR=str(comfy_install), COMFYUI_PYTHON=sys.executable, FAKE_MAIN_EXIT="3")
    s.wait_for("Press Ctrl-C")
    assert "WARNING: ComfyUI exited" in s.output and "comfyui.log" in s.output
    assert "failing on purpose" in s.output  # the log's last lines are shown
    assert requests.get(f"http://127.0.0.1:{s.ports['img']}/health", timeout=5).status_code == 200
    assert s.interrupt() == 0
    assert not [pid for pid in s.seen if alive(pid)]


def test_an_answering_comfyui_is_used_not_started(script_runner, fake_comfy, comfy_install):
    s = script_runner(COMFY_API_URL=fake_comfy.url, COMFYUI_DIR=str(comfy_install))
    s.wait_for("Press Ctrl-C")
    assert f"ComfyUI      {fake_comfy.url}  answers" in s.output
    assert not (comfy_install / "started.json").exists()
    assert s.interrupt() == 0
    assert requests.get(f"{fake_comfy.url}/system_stats", timeout=5).status_code == 200


@pytest.fixture
def web_page():
    """A web server (not ComfyUI) answering every GET with a 200 HTML page, on a socket it owns."""
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Page(BaseHTTPRequestHandler):
        def do_GET(self):
            body = b"<html><body>a router's admin page</body></html>"
            self.send_response(200)
            self.send_header("Content-Type", "text/html")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Page)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_a_web_page_at_comfyuis_address_is_not_called_comfyui(script_runner, web_page, comfy_install):
    s = script_runner(COMFY_API_URL=web_page, COMFYUI_DIR=str(comfy_install))
    s.wait_for("Press Ctrl-C")
    assert f"ComfyUI      {web_page}  something answers there, but not ComfyUI" in s.output
    assert not (comfy_install / "started.json").exists()  # its port is taken: not started
    assert s.interrupt() == 0


def test_the_banner_names_each_backend_and_blames_no_503_on_img2img_when_one_answers(
        script_runner, fake_comfy, reserve_port):
    """With the first of two backends down it said generation would fail with 503 (img2img ran on
    the second all along), and it said nothing of the others."""
    dead = f"http://127.0.0.1:{reserve_port()}"
    s = script_runner(COMFY_API_URL=f"{dead},{fake_comfy.url}")
    s.wait_for("Press Ctrl-C")
    assert f"NOT answering at {dead} (the first backend" in s.output
    assert f"ComfyUI      {fake_comfy.url}  answers" in s.output
    assert "generation and model lists fail with 503" not in s.output
    assert s.interrupt() == 0


def test_supervisor_takes_a_list_of_backends_and_watches_the_first():
    """COMFY_API_URL with several backends (docs/scaling.md) is handed on unchanged; the launcher
    probes and (with COMFYUI_DIR) starts only the first."""
    from dreamlayer.launcher import Plan
    plan = Plan.from_env(False, {"COMFY_API_URL": "http://127.0.0.1:9991,http://127.0.0.1:9992"})
    assert plan.dl.comfy_api_url == "http://127.0.0.1:9991"
    assert plan.img2img.comfy_api_urls == ("http://127.0.0.1:9991", "http://127.0.0.1:9992")
