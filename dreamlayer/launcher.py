"""Starts DreamLayer's backend and keeps it running until Ctrl-C: ComfyUI (when COMFYUI_DIR is set
and none answers; the fake stand-in with --demo), dream_layer.py (:5002) and img2img_server.py
(:5004), each with its log file under logs/.

Run through start_dream_layer.sh / start_dream_layer.bat, which prepare the virtualenv first.
One Python supervisor serves both scripts so Linux, macOS and Windows behave the same. It only
ever stops processes it started, by their PID: never whatever happens to listen on a port.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Optional
from urllib.parse import urlsplit

from dreamlayer.config.backend import DreamLayerConfig
from dreamlayer.config.env import ConfigError, Environment, report
from dreamlayer.config.img2img import Config
from dreamlayer.config.saved_paths import DEMO_NOTE

from dreamlayer import PROJECT_ROOT as ROOT
IS_WINDOWS = os.name == "nt"
STOP_TIMEOUT_S = 20.0  # the services' own graceful stop takes up to 10 s, then 3 + 3 s to cancel what is left
#: Signals that stop everything: Ctrl-C, kill, a closed terminal, Ctrl-Break on Windows.
SIGNALS = ("SIGINT", "SIGTERM") + (("SIGBREAK",) if IS_WINDOWS else ("SIGHUP",))


def say(message: str = "") -> None:
    """Console output of this command-line tool (the services themselves log to files). A closed
    terminal (SIGHUP) must not keep the children from being stopped, so write errors are ignored."""
    try:
        print(message, flush=True)
    except (OSError, ValueError):
        pass


class StartError(RuntimeError):
    """Startup cannot go on; the message says why and what to do."""


class Stop(BaseException):
    """Raised by the signal handlers: stop everything and exit."""


# ---------------------------------------------------------------------------- settings

@dataclass(frozen=True)
class Plan:
    """Everything read from the environment, once: both services' configurations (to probe and
    report their addresses), the launcher's own settings, and the environment the children get."""
    dl: DreamLayerConfig
    img2img: Config
    demo: bool
    log_dir: Path
    demo_dir: Path
    health_timeout_s: float
    #: The variables as given; each child inherits them (and validates them again itself).
    environ: Mapping = field(default_factory=dict)
    #: Deprecated or unknown variables: shown on the console before anything starts.
    warnings: tuple = ()

    @classmethod
    def from_env(cls, demo: bool, environ: Environment | Mapping | None = None) -> "Plan":
        env = Environment.of(environ)
        dl = DreamLayerConfig.from_env(env)
        for name, port in (("DREAMLAYER_PORT", dl.port), ("IMG2IMG_PORT", dl.shared.port)):
            if port == 0:  # the services could take it, but the launcher must know where to look
                raise ConfigError(f"{name}='0': expected a port number 1-65535 with "
                                  "start_dream_layer (it checks each service at its port)")
        return cls(dl=dl, img2img=dl.shared, demo=demo, log_dir=dl.log_dir,
                   demo_dir=env.get("DREAMLAYER_DEMO_DIR"),
                   health_timeout_s=env.get("DREAMLAYER_HEALTH_TIMEOUT_S"),
                   environ=env.snapshot(), warnings=tuple(env.warnings))


def probe_host(host: str) -> str:
    """The address to reach a server bound to ``host`` (a wildcard is reached on loopback)."""
    host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)
    return f"[{host}]" if ":" in host else host


def http_ok(url: str, timeout: float = 2.0) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return resp.status == 200
    except Exception:  # noqa: BLE001 - any failure means "not (yet) answering"
        return False


def comfyui_answers(url: str, timeout: float = 2.0) -> Optional[bool]:
    """True if ComfyUI answers at ``url``, False if something else does (a web page answering
    /system_stats with anything but ComfyUI's object), None if nothing answers."""
    try:
        with urllib.request.urlopen(f"{url}/system_stats", timeout=timeout) as resp:
            body = json.loads(resp.read(1 << 20))
        return isinstance(body, dict) and "system" in body
    except urllib.error.HTTPError:
        return False
    except ValueError:  # not JSON
        return False
    except Exception:  # noqa: BLE001 - any other failure: nothing answers (yet)
        return None


def port_answers(host: str, port: int) -> bool:
    import socket
    try:
        with socket.create_connection((probe_host(host).strip("[]"), port), timeout=0.5):
            return True
    except OSError:
        return False


def log_tail(path: Path, lines: int = 15) -> str:
    try:
        text = path.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return "    (no log written)"
    return "\n".join("    " + line for line in text[-lines:])


# ---------------------------------------------------------------------------- children

@dataclass
class Child:
    name: str
    cmd: list
    log_file: Path
    health_url: Optional[str] = None
    #: optional children (ComfyUI) may exit without taking the services down
    essential: bool = True
    env: dict = field(default_factory=dict)
    proc: Optional[subprocess.Popen] = None

    def start(self) -> None:
        self.log_file.parent.mkdir(parents=True, exist_ok=True)
        kwargs = {}
        if IS_WINDOWS:
            kwargs["creationflags"] = subprocess.CREATE_NEW_PROCESS_GROUP
        else:
            # Its own session: a terminal's Ctrl-C reaches only this supervisor, which then stops
            # the children in order (each one stops what it started itself).
            kwargs["start_new_session"] = True
        with open(self.log_file, "ab") as out:
            out.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} {self.cmd}\n".encode())
            out.flush()
            self.proc = subprocess.Popen(self.cmd, cwd=ROOT, env=self.env, stdout=out,
                                         stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, **kwargs)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def signal_stop(self) -> None:
        if not self.alive():
            return
        try:
            if IS_WINDOWS:
                os.kill(self.proc.pid, signal.CTRL_BREAK_EVENT)
            else:
                self.proc.send_signal(signal.SIGTERM)
        except OSError:
            pass

    def force_stop(self) -> None:
        """Last resort after STOP_TIMEOUT_S. On POSIX the child's own process group goes too (it
        was created for this child, so it holds only the child and what the child started)."""
        if not self.alive():
            return
        try:
            if IS_WINDOWS:
                self.proc.kill()
            else:
                os.killpg(self.proc.pid, signal.SIGKILL)
        except OSError:
            pass
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            pass


class Supervisor:
    def __init__(self, plan: Plan):
        self.plan = plan
        self.children: list = []
        py = sys.executable
        dl, img = plan.dl, plan.img2img
        self.dl_url = f"http://{probe_host(dl.host)}:{dl.port}"
        self.img_url = f"http://{probe_host(img.host)}:{img.port}"
        self.comfy_url = dl.comfy_api_url
        self.env = dict(plan.environ, PYTHONUNBUFFERED="1")
        if plan.demo:
            # The stand-in shares no disk with the services: inputs go over HTTP, and a real
            # install configured for normal runs must not be written to.
            self.env.pop("COMFYUI_DIR", None)
            self.env.pop("COMFYUI_INPUT_DIR", None)
            self.env.pop("COMFYUI_OUTPUT_DIR", None)
            self.env["DREAMLAYER_DEMO"] = "1"
        self.dream_layer = Child("dream_layer", [py, str(ROOT / "dream_layer.py")],
                                 plan.log_dir / "dream_layer.log", f"{self.dl_url}/health", env=self.env)
        self.img2img = Child("img2img", [py, str(ROOT / "img2img_server.py")],
                             plan.log_dir / "img2img.log", f"{self.img_url}/health", env=self.env)
        self.comfyui: Optional[Child] = None

    # -- steps --------------------------------------------------------------------------------
    def preflight(self) -> None:
        for name, cfg, var in (("dream_layer", self.plan.dl, "DREAMLAYER_PORT"),
                               ("img2img", self.plan.img2img, "IMG2IMG_PORT")):
            if port_answers(cfg.host, cfg.port):
                raise StartError(f"Port {cfg.port} ({name}) is already in use on {cfg.host} — another "
                                 f"DreamLayer still running? Stop it, or set {var} to a free port. "
                                 "(This script never stops processes it did not start.)")

    def start_comfyui(self) -> Optional[str]:
        """Start ComfyUI (or the demo stand-in) if needed. Returns a status line for the banner,
        "starting" while a real ComfyUI boots, or None when no ComfyUI will answer."""
        up = comfyui_answers(self.comfy_url)
        if self.plan.demo:
            if up is not None:
                raise StartError(f"Something already answers at {self.comfy_url}, so the demo stand-in "
                                 "cannot take that address. Set COMFY_API_URL to a free port for the "
                                 "demo (e.g. http://127.0.0.1:8189), or drop --demo to use that ComfyUI.")
            parts = urlsplit(self.comfy_url)
            env = dict(self.env)
            env["PYTHONPATH"] = os.pathsep.join(
                [str(ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
            self.comfyui = Child("fake ComfyUI (demo)",
                                 [sys.executable, "-m", "dreamlayer.comfyui.fake", "--host", parts.hostname or "127.0.0.1",
                                  "--port", str(parts.port or 8188), "--root", str(self.plan.demo_dir)],
                                 self.plan.log_dir / "fake_comfyui.log", f"{self.comfy_url}/system_stats",
                                 env=env)
            say("DEMO MODE: starting the project's fake ComfyUI (dreamlayer/comfyui/fake) at "
                f"{self.comfy_url}.\n  It is a stand-in that runs NO diffusion model: the images it "
                "returns are synthetic.")
            self._start(self.comfyui)
            self._wait_healthy(self.comfyui, self.plan.health_timeout_s)
            return f"{self.comfy_url}  DEMO stand-in, no diffusion model (log: {self.comfyui.log_file})"
        if up:
            return f"{self.comfy_url}  answers"
        if up is False:
            return (f"{self.comfy_url}  something answers there, but not ComfyUI (its /system_stats is not "
                    "ComfyUI's): generation fails until COMFY_API_URL names a ComfyUI")
        if self.plan.dl.comfyui_dir is None:
            return None
        self.comfyui = Child("ComfyUI", [sys.executable, str(ROOT / "dream_layer.py"), "--comfyui-only"],
                             self.plan.dl.comfyui_log, f"{self.comfy_url}/system_stats",
                             essential=False, env=self.env)
        say(f"Starting ComfyUI from {self.plan.dl.comfyui_dir} (log: {self.comfyui.log_file})")
        self._start(self.comfyui)
        return "starting"

    def start_services(self) -> None:
        for child in (self.dream_layer, self.img2img):
            self._start(child)
        for child in (self.dream_layer, self.img2img):
            self._wait_healthy(child, self.plan.health_timeout_s)

    def wait_for_comfyui(self) -> str:
        say(f"Waiting up to {self.plan.dl.comfyui_start_timeout_s:g}s for ComfyUI to answer at "
            f"{self.comfy_url} ...")
        try:
            self._wait_healthy(self.comfyui, self.plan.dl.comfyui_start_timeout_s)
            return f"{self.comfy_url}  started by this script (log: {self.comfyui.log_file})"
        except StartError as exc:
            say(f"WARNING: {exc}\n  The services keep running without it.")
            if not self.comfyui.alive():
                self.children.remove(self.comfyui)
            return None

    # -- helpers ------------------------------------------------------------------------------
    def _start(self, child: Child) -> None:
        child.start()
        self.children.append(child)
        say(f"  started {child.name} (pid {child.proc.pid}, log: {child.log_file})")

    def _wait_healthy(self, child: Child, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not child.alive():
                raise StartError(f"{child.name} exited with code {child.proc.returncode} before it "
                                 f"answered {child.health_url}. Last lines of {child.log_file}:\n"
                                 f"{log_tail(child.log_file)}")
            if http_ok(child.health_url):
                return
            time.sleep(0.25)
        raise StartError(f"{child.name} did not answer {child.health_url} within {timeout:g}s. "
                         f"See {child.log_file}:\n{log_tail(child.log_file)}")

    def stop_all(self) -> None:
        """Stop every child this supervisor started, newest first; kill what outlives the timeout."""
        running = [c for c in reversed(self.children) if c.alive()]
        if running:
            say("Stopping: " + ", ".join(f"{c.name} (pid {c.proc.pid})" for c in running))
        for child in running:
            child.signal_stop()
        deadline = time.monotonic() + STOP_TIMEOUT_S
        for child in running:
            try:
                child.proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                say(f"  {child.name} (pid {child.proc.pid}) did not stop in {STOP_TIMEOUT_S:g}s; killing it")
                child.force_stop()

    def watch(self) -> int:
        """Until a signal: an essential child that exits takes everything down (exit 1)."""
        while True:
            for child in list(self.children):
                if child.alive():
                    continue
                self.children.remove(child)
                say(f"{child.name} exited with code {child.proc.returncode}. Last lines of "
                    f"{child.log_file}:\n{log_tail(child.log_file)}")
                if child.essential:
                    return 1
                say("  The services keep running without it.")
            time.sleep(0.5)

    def banner(self, comfy_status: Optional[str]) -> None:
        say("")
        say("DreamLayer backend is up:")
        say(f"  dream_layer  {self.dl_url}   (models, settings; log: {self.dream_layer.log_file})")
        say(f"  img2img      {self.img_url}   (POST /api/img2img; log: {self.img2img.log_file})")
        others = {url: comfyui_answers(url) for url in self.plan.img2img.comfy_api_urls[1:]}
        if comfy_status:
            say(f"  ComfyUI      {comfy_status}")
        elif any(others.values()):  # the img2img service runs on the others meanwhile
            say(f"  ComfyUI      NOT answering at {self.comfy_url} (the first backend: the model lists of "
                "dream_layer.py fail with 503 until it answers; img2img runs on the others)")
        else:
            say(f"  ComfyUI      NOT answering at {self.comfy_url}")
            say("    The services run, but generation and model lists fail with 503 until a ComfyUI "
                "answers. Start ComfyUI yourself, or set COMFYUI_DIR=/path/to/ComfyUI so this script "
                "starts it, or set COMFY_API_URL to where it runs; ./start_dream_layer.sh --demo runs "
                "a stand-in without a GPU.")
        for url, up in others.items():
            say(f"  ComfyUI      {url}  " + ("answers" if up else "NOT answering (out of img2img's rotation "
                                                                "until it does)"))
        if self.plan.demo:
            say(f"  NOTE: {DEMO_NOTE}")
        say("Press Ctrl-C to stop everything.")


def _install_signal_handlers() -> None:
    def handler(signum, frame):
        raise Stop(signum)
    for name in SIGNALS:
        signal.signal(getattr(signal, name), handler)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Start DreamLayer's backend (see docs/installation.md).")
    parser.add_argument("--demo", action="store_true",
                        help="run the project's fake ComfyUI (no GPU, no model) in ComfyUI's place")
    parser.add_argument("--no-install", action="store_true",
                        help="(handled by start_dream_layer.sh/.bat: skip pip install)")
    args = parser.parse_args(argv)
    try:
        plan = Plan.from_env(args.demo)
    except ConfigError as exc:
        return report("start_dream_layer", exc)
    for note in plan.warnings:
        say(f"WARNING: {note}")
    sup = Supervisor(plan)
    _install_signal_handlers()
    code = 0
    try:
        try:
            sup.preflight()
            comfy = sup.start_comfyui()
            sup.start_services()
            if comfy == "starting":
                comfy = sup.wait_for_comfyui()
            sup.banner(comfy)
            code = sup.watch()
        except StartError as exc:
            say(f"ERROR: {exc}")
            code = 1
    except Stop:
        pass
    finally:
        for name in SIGNALS:
            signal.signal(getattr(signal, name), signal.SIG_IGN)
        sup.stop_all()
    say("Stopped.")
    return code


if __name__ == "__main__":
    sys.exit(main())
