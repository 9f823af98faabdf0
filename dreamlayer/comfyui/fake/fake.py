"""FakeComfyUI: a ComfyUI 0.3.40 stand-in on loopback, with the knobs tests need to break it.

Two threads per instance, as in ComfyUI: the aiohttp event loop (HTTP + /ws) and the prompt
worker. start() binds a free port on 127.0.0.1; stop() tears both down (no threads or sockets
left). Fault controls: fail_next, hang_next, drop_ws_next, refuse_connections/accept_connections
and die (a crash: websockets cut, port closed, running prompt and all in-memory state lost).
"""
from __future__ import annotations

import asyncio
import logging
import socket
import threading
import time
from pathlib import Path

from aiohttp import web
from PIL import Image

from . import catalog
from .executor import Executor, PromptQueue, Settings
from .hub import Hub
from .paths import Folders
from .server import build_app
from .validation import Validator

log = logging.getLogger(__name__)


def _listening_socket(host: str, port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
        sock.listen(128)
    except OSError:
        sock.close()
        raise
    sock.setblocking(False)
    return sock


class FakeComfyUI:
    """See dreamlayer/comfyui/fake/README.md for the public API and where it differs from ComfyUI."""

    def __init__(self, root_dir, custom_nodes=()):
        self.folders = Folders(Path(root_dir))
        self.folders.create()
        self._object_info: dict = catalog.load_fixture()
        #: GET /models: ComfyUI's model folder names, plus those the loaded custom node packs add
        self.model_folders: list = list(catalog.MODEL_FOLDERS)
        #: folder -> names given to add_model (model files are names only)
        self.model_files: dict = {}
        self.custom_nodes: tuple = tuple(custom_nodes)
        for pack in self.custom_nodes:
            catalog.load_custom_nodes(self._object_info, self.model_folders, pack)
        catalog.refresh_input_lists(self._object_info, self.folders.input)
        self.settings = Settings()
        self.hub = Hub()
        self.queue = PromptQueue(self.hub)
        self.hub.get_queue_info = lambda: {"exec_info": {"queue_remaining": self.queue.get_tasks_remaining()}}
        self.validator = Validator(self._object_info, self.folders)
        self.executor = Executor(self.hub, self.queue, self.folders, self._object_info, self.settings)
        self.prompts: list = []
        self.rejected: list = []
        self.interrupt_count = 0
        self._thawed = threading.Event()  # freeze / thaw
        self._thawed.set()
        self._views_open = threading.Event()  # hold_views / release_views
        self._views_open.set()
        self._views_held = 0
        self._views_lock = threading.Lock()
        self.host = "127.0.0.1"
        self.port: int | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._runner: web.AppRunner | None = None
        self._site: web.SockSite | None = None
        self._publisher: asyncio.Task | None = None
        self._routes = None

    # settings (plain attributes for tests, read live by the worker) ---------------------------
    step_delay = property(lambda self: self.settings.step_delay,
                          lambda self, v: setattr(self.settings, "step_delay", float(v)))
    history_delay = property(lambda self: self.settings.history_delay,
                             lambda self, v: setattr(self.settings, "history_delay", float(v)))
    view_delay = property(lambda self: self.settings.view_delay,
                          lambda self, v: setattr(self.settings, "view_delay", float(v)))
    send_previews = property(lambda self: self.settings.send_previews,
                             lambda self, v: setattr(self.settings, "send_previews", bool(v)))
    announce_outputs = property(lambda self: self.settings.announce_outputs,
                                lambda self, v: setattr(self.settings, "announce_outputs", bool(v)))

    @property
    def object_info(self) -> dict:
        """The live catalog: edits (or a replacement dict) change validation and /object_info."""
        return self._object_info

    @object_info.setter
    def object_info(self, value: dict) -> None:
        self._object_info = value
        self.validator.object_info = value
        self.executor.object_info = value

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def input_dir(self) -> Path:
        return self.folders.input

    @property
    def output_dir(self) -> Path:
        return self.folders.output

    @property
    def temp_dir(self) -> Path:
        return self.folders.temp

    # lifecycle ---------------------------------------------------------------------------------
    def start(self) -> "FakeComfyUI":
        if self._thread is not None:
            raise RuntimeError("FakeComfyUI already started")
        self._loop = asyncio.new_event_loop()
        ready = threading.Event()
        failure: list = []

        def run_loop():
            asyncio.set_event_loop(self._loop)
            try:
                self._loop.run_until_complete(self._astart())
            except BaseException as e:  # report to start()
                failure.append(e)
                ready.set()
                return
            ready.set()
            self._loop.run_forever()

        self._thread = threading.Thread(target=run_loop, name="fake-comfyui-http", daemon=True)
        self._thread.start()
        ready.wait(10)
        if failure:
            self._thread.join()
            self._loop.close()
            self._thread = None
            raise failure[0]
        self.executor.start()
        log.info("fake ComfyUI listening on %s", self.url)
        return self

    async def _astart(self) -> None:
        self.hub.attach(asyncio.get_running_loop())
        self._runner = web.AppRunner(build_app(self), access_log=None, shutdown_timeout=0.5)
        await self._runner.setup()
        await self._listen(0)
        self._publisher = asyncio.get_running_loop().create_task(self.hub.publish_loop())

    async def _listen(self, port: int) -> None:
        sock = _listening_socket(self.host, port)
        self.port = sock.getsockname()[1]
        self._site = web.SockSite(self._runner, sock)
        await self._site.start()

    async def _unlisten(self, close_connections: bool) -> None:
        if self._site is not None:
            await self._site.stop()
            self._site = None
        if close_connections and self._runner is not None and self._runner.server is not None:
            for handler in list(self._runner.server.connections):
                if getattr(handler, "_waiter", None) is not None:
                    handler.force_close()  # idle keep-alive: gone now
                else:
                    handler.close()  # busy (a request or a websocket): closes when it ends

    def _call(self, coro, timeout: float = 10):
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    def stop(self) -> None:
        """Stop worker and server; interrupts a hung prompt; leaves no threads or sockets."""
        if self._thread is None:
            return
        self._views_open.set()  # a held /view ends
        self._thawed.set()
        self.executor.stop()
        try:
            self._call(self._astop(), timeout=15)
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
            self._loop.close()
            self._thread = None

    async def _astop(self) -> None:
        self.hub.drop_all()
        if self._publisher is not None:
            self._publisher.cancel()
            try:
                await self._publisher
            except asyncio.CancelledError:
                pass
        await self._unlisten(close_connections=True)
        if self._runner is not None:
            await self._runner.cleanup()
        await asyncio.get_running_loop().shutdown_default_executor()

    # faults --------------------------------------------------------------------------------------
    def fail_next(self, node: str = "KSampler", message: str = "boom", exception_type: str = "RuntimeError") -> None:
        """Next prompt: the first executed node of that class_type (or node id) raises -> execution_error."""
        with self.executor.faults_lock:
            self.executor.faults.fail = (node, message, exception_type)

    def hold_views(self) -> None:
        """GET /view answers nothing until release_views() (views_held() counts the waiting ones)."""
        self._views_open.clear()

    def release_views(self) -> None:
        self._views_open.set()

    def views_held(self) -> int:
        with self._views_lock:
            return self._views_held

    def _view_gate(self) -> None:
        """Called by the server (in an executor thread) before a /view answer."""
        if self._views_open.is_set():
            return
        with self._views_lock:
            self._views_held += 1
        try:
            self._views_open.wait()
        finally:
            with self._views_lock:
                self._views_held -= 1

    def hang_next(self) -> None:
        """Next prompt: its first sampler stalls after one progress message until /interrupt or stop()."""
        with self.executor.faults_lock:
            self.executor.faults.hang = True

    def drop_ws_next(self, after_progress: int = 1) -> None:
        """Next prompt: every websocket is cut after its Nth progress message; execution goes on."""
        with self.executor.faults_lock:
            self.executor.faults.drop_after_progress = int(after_progress)

    def freeze(self) -> None:
        """Hang, as a stopped process (SIGSTOP) or a stuck GPU driver does: connections are still
        accepted (by the kernel), but no HTTP request or WebSocket frame is answered or sent
        until thaw(); then everything held goes out."""
        self._thawed.clear()
        frozen = threading.Event()

        def hang():  # blocks the server's event loop
            frozen.set()
            self._thawed.wait()
        self._loop.call_soon_threadsafe(hang)
        frozen.wait(10)  # not before: a request arriving meanwhile would still be answered

    def thaw(self) -> None:
        self._thawed.set()

    def refuse_connections(self) -> None:
        """Stop listening (connection refused); idle keep-alive connections are closed too."""
        self._call(self._unlisten(close_connections=True))

    def accept_connections(self) -> None:
        """Listen again on the same port."""
        if self._site is None:
            self._call(self._listen(self.port))

    def die(self) -> None:
        """Crash: cut every websocket and connection, stop listening, lose queue/history/cache.

        accept_connections() afterwards behaves like a freshly restarted ComfyUI."""
        async def crash():
            await self._unlisten(close_connections=True)
            self.hub.drop_all()
        self._call(crash())
        self.executor.abandon()  # the running prompt sends nothing more and writes no history
        self.queue.reset()

        async def forget():
            self.hub.discard_pending()
        self._call(forget())
        self.hub.client_id = self.hub.last_node_id = self.hub.last_prompt_id = None
        if self._routes is not None:
            self._routes.number = 0
        self.executor.request_reset()

    # observation -------------------------------------------------------------------------------
    def wait_idle(self, timeout: float = 30) -> bool:
        """Block until nothing is queued or running, a POST /free has been applied and every
        message has been sent."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if (self.queue.get_tasks_remaining() == 0 and not self.queue.flags_pending()
                    and not self.executor.busy.is_set() and self.hub.pending_messages() == 0):
                return True
            time.sleep(0.002)
        raise TimeoutError(f"fake ComfyUI not idle after {timeout}s "
                           f"(queue_remaining={self.queue.get_tasks_remaining()})")

    def client_ids(self) -> list:
        """The clientIds with a registered /ws socket, sorted (messages to others are lost)."""
        async def registered():
            return sorted(self.hub.sockets)
        return self._call(registered())

    def running_prompt_id(self):
        """The prompt in /queue's queue_running (it leaves it when its history is written), or None."""
        running, _ = self.queue.get_current_queue_volatile()
        return running[0][1] if running else None

    def add_model(self, folder: str, filename: str) -> None:
        """A model file appears in ComfyUI's models/<folder>/: the enums that list it show it.

        As in ComfyUI, a name without a model extension (.safetensors, .pth, .ckpt, ...) is not
        listed. Adding both vae_approx/taesd_encoder.* and taesd_decoder.* offers "taesd" in
        VAELoader (likewise taesdxl, taesd3, taef1)."""
        if not catalog.add_model(self.object_info, folder, filename, self.model_files, self.model_folders):
            log.warning("fake ComfyUI: %r has no model extension; ComfyUI would not list it", filename)

    @property
    def node_runs(self) -> list:
        """Every node that executed (not served from cache), in order, with what it noted:
        {"prompt_id", "node", "class_type", ...}; e.g. a sampler notes its checkpoint and steps."""
        return self.executor.node_runs

    def output_image(self, filename: str, subfolder: str = "") -> Image.Image:
        with Image.open(self.folders.output / subfolder / filename) as img:
            img.load()
            return img.copy()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()
