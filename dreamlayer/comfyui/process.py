"""Starting and stopping a local ComfyUI install (COMFYUI_DIR) as a child process.

DreamLayer imported ComfyUI's main.py into its own process; a separate process instead keeps
ComfyUI's heavy imports, its argv parsing and its crashes out of the backend, gives it its own
log file, and lets it use its own Python (its venv or the Windows portable build).
"""
from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence
from urllib.parse import urlsplit

log = logging.getLogger(__name__)


class LaunchError(RuntimeError):
    """ComfyUI cannot be started as configured; the message says what to change."""


@dataclass(frozen=True)
class LaunchSpec:
    """Everything that decides ComfyUI's command line."""
    comfyui_dir: Path
    host: str
    port: int
    output_dir: Path
    input_dir: Path
    models_dir: Optional[Path] = None
    python: str = sys.executable
    cors_origin: str = ""
    extra_args: tuple = field(default_factory=tuple)

    def command(self) -> list:
        """``python main.py --listen H --port P --output-directory D ...``.

        --input-directory is always given so ComfyUI reads uploads from the folder the img2img
        service writes them to, even when --base-directory (the saved modelsDirectory) would
        move ComfyUI's input folder elsewhere.
        """
        cmd = [self.python, str(self.comfyui_dir / "main.py"), "--listen", self.host,
               "--port", str(self.port), "--output-directory", str(self.output_dir),
               "--input-directory", str(self.input_dir)]
        if self.models_dir is not None:
            cmd += ["--base-directory", str(self.models_dir)]
        if self.cors_origin:
            cmd += ["--enable-cors-header", self.cors_origin]
        return cmd + list(self.extra_args)


def listen_address(comfy_api_url: str) -> tuple[str, int]:
    """Host and port ComfyUI must listen on so that COMFY_API_URL reaches it. Refuses an address
    of another machine: ComfyUI can only be started here."""
    parts = urlsplit(comfy_api_url)
    host = parts.hostname or "127.0.0.1"
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError as exc:
        raise LaunchError(f"COMFY_API_URL {comfy_api_url!r} has an invalid port") from exc
    if host == "localhost":
        host = "127.0.0.1"
    if not _is_local_address(host):
        raise LaunchError(f"COMFY_API_URL {comfy_api_url} is not an address of this machine, so "
                          "a local ComfyUI started from COMFYUI_DIR could not answer there; set "
                          "COMFY_API_URL to http://127.0.0.1:<port>, or start ComfyUI on that host")
    return host, port


def _is_local_address(host: str) -> bool:
    """True if this machine can listen on ``host`` (binding to port 0 is the honest test)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_STREAM) as s:
            s.bind((host, 0))
        return True
    except OSError:
        return False


def choose_python(comfyui_dir: Path, configured: str = "") -> str:
    """COMFYUI_PYTHON if set; else the install's own venv (.venv or venv), or the Windows
    portable build's python_embeded; else this interpreter."""
    if configured:
        return configured
    exe = ("Scripts", "python.exe") if os.name == "nt" else ("bin", "python")
    candidates = [comfyui_dir / ".venv" / exe[0] / exe[1], comfyui_dir / "venv" / exe[0] / exe[1],
                  comfyui_dir.parent / "python_embeded" / "python.exe"]
    for candidate in candidates:
        if candidate.is_file():
            return str(candidate)
    return sys.executable


def check_install(comfyui_dir: Path) -> None:
    if not (comfyui_dir / "main.py").is_file():
        raise LaunchError(f"COMFYUI_DIR {comfyui_dir} has no main.py; point it at the folder of a "
                          "ComfyUI checkout (the one containing main.py)")


class ComfyUIProcess:
    """One ComfyUI child process, its output appended to ``log_file``."""

    def __init__(self, spec: LaunchSpec, log_file: Path):
        self.spec = spec
        self.log_file = Path(log_file)
        self.proc: Optional[subprocess.Popen] = None

    @property
    def pid(self) -> Optional[int]:
        return self.proc.pid if self.proc else None

    def start(self) -> "ComfyUIProcess":
        check_install(self.spec.comfyui_dir)
        self.spec.output_dir.mkdir(parents=True, exist_ok=True)
        self.spec.input_dir.mkdir(parents=True, exist_ok=True)
        self.log_file.parent.mkdir(parents=True, exist_ok=True)
        cmd = self.spec.command()
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        with open(self.log_file, "ab") as out:
            out.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} starting: {cmd}\n".encode())
            out.flush()
            try:
                self.proc = subprocess.Popen(cmd, cwd=self.spec.comfyui_dir, stdout=out,
                                             stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)
            except OSError as exc:
                raise LaunchError(f"could not run {cmd[0]}: {exc}") from exc
        log.info("started ComfyUI (pid %d) on %s:%d, output in %s, log %s", self.proc.pid,
                 self.spec.host, self.spec.port, self.spec.output_dir, self.log_file)
        return self

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def exit_code(self) -> Optional[int]:
        return None if self.proc is None else self.proc.poll()

    def wait_until_up(self, is_up: Callable[[], bool], timeout: float, interval: float = 0.5) -> bool:
        """True once ``is_up()``; False if ComfyUI exited or ``timeout`` passed first."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.running():
                log.error("ComfyUI exited with code %s before answering; see %s", self.exit_code(),
                          self.log_file)
                return False
            if is_up():
                return True
            time.sleep(interval)
        log.error("ComfyUI did not answer within %gs; see %s", timeout, self.log_file)
        return False

    def stop(self, timeout: float = 15.0) -> Optional[int]:
        """Terminate (then kill after ``timeout``) the process we started; its exit code."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            log.info("stopping ComfyUI (pid %d)", self.proc.pid)
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                log.warning("ComfyUI (pid %d) did not stop within %gs; killing it", self.proc.pid, timeout)
                self.proc.kill()
                self.proc.wait(5)
        return self.proc.returncode


def launch_spec(*, comfyui_dir: Path, comfy_api_url: str, input_dir: Path, directories,
                python: str = "", cors_origin: str = "", extra_args: Sequence[str] = ()) -> LaunchSpec:
    """The LaunchSpec for the configured install: listen where COMFY_API_URL points, write
    where the saved settings (get_directories) say."""
    host, port = listen_address(comfy_api_url)
    comfyui_dir = Path(os.path.abspath(comfyui_dir))
    return LaunchSpec(comfyui_dir=comfyui_dir, host=host, port=port,
                      output_dir=directories.output_dir or comfyui_dir / "output",
                      input_dir=Path(os.path.abspath(input_dir)), models_dir=directories.models_dir,
                      python=choose_python(comfyui_dir, python), cors_origin=cors_origin,
                      extra_args=tuple(extra_args))
