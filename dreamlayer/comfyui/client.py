"""A small client for one ComfyUI server (HTTP + WebSocket), modelled on ComfyUI's
script_examples/websockets_api_example.py. See docs/comfyui.md for the protocol details this code
relies on.

ComfyClient is the one object the service holds; it composes the three parts that do the work:
the HTTP endpoints (http.py), the WebSockets with their spare (sockets.py) and the waiting for one
prompt (run.py). The errors it raises and the values it returns are re-exported here, so that
callers import everything the client speaks from this one module.

One ComfyClient is meant to be shared by all request threads of the service.
"""
from __future__ import annotations

from typing import Callable, Optional

from dreamlayer.comfyui.errors import (ComfyBadResponse, ComfyError, ComfyExecutionFailed, ComfyInterrupted,
                                       ComfyRejected, ComfyTimeout, ComfyUnreachable)
from dreamlayer.comfyui.http import ComfyHttp
from dreamlayer.comfyui.protocol import (Done, OutputImage, Progress, PromptWatch, RunResult, input_choices,
                                         output_images, raise_for_history)
from dreamlayer.comfyui.run import PromptRunner
from dreamlayer.comfyui.sockets import SocketPool

__all__ = [
    "ComfyError", "ComfyUnreachable", "ComfyRejected", "ComfyExecutionFailed", "ComfyInterrupted",
    "ComfyTimeout", "ComfyBadResponse", "OutputImage", "Progress", "Done", "RunResult",
    "PromptWatch", "raise_for_history", "ComfyClient",
]


class ComfyClient:
    """Client for one ComfyUI server; thread-safe, share one instance."""

    def __init__(self, base_url: str = "http://127.0.0.1:8188", *, connect_timeout: float = 3.0,
                 read_timeout: float = 30.0, poll_interval: float = 0.05, history_grace: float = 2.0,
                 unreachable_grace: float = 3.0, liveness_interval: float = 5.0,
                 ws_tick: float = 0.1, pool_size: int = 32, end_of_prompt_wait: float = 0.5,
                 spare_socket: bool = True):
        """unreachable_grace: how long HTTP may fail persistently during a run before
        ComfyUnreachable; liveness_interval: how often a run checks /queue that its prompt still
        exists when nothing arrives for it; ws_tick: how often the WebSocket wait looks at
        cancellation and the deadline; end_of_prompt_wait: how long, after execution_success, to
        wait for the `executing` null that follows ComfyUI's /history write; spare_socket: keep the
        WebSocket of a run that ended normally open for the next run (opening one costs a round
        trip and a handshake; at most SocketPool.KEEP stay idle)."""
        self.base_url = base_url.rstrip("/")
        self.http = ComfyHttp(self.base_url, connect_timeout=connect_timeout, read_timeout=read_timeout,
                              pool_size=pool_size)
        self.sockets = SocketPool(self.base_url, connect_timeout=connect_timeout, spare=spare_socket)
        self.runner = PromptRunner(self.http, self.sockets, poll_interval=poll_interval,
                                   history_grace=history_grace, unreachable_grace=unreachable_grace,
                                   liveness_interval=liveness_interval, ws_tick=ws_tick,
                                   end_of_prompt_wait=end_of_prompt_wait)

    def __repr__(self):
        return f"ComfyClient({self.base_url!r})"

    def close(self):
        self.sockets.close()
        self.http.close()

    def ws_url(self, client_id: str) -> str:
        return self.sockets.url(client_id)

    # ---------------------------------------------------------------- runs

    def run(self, prompt: dict, *, timeout: float, on_progress: Optional[Callable] = None,
            on_queued: Optional[Callable] = None, cancel_on_timeout: bool = True) -> RunResult:
        """Queue `prompt` and wait for its outputs (see PromptRunner.run)."""
        return self.runner.run(prompt, timeout=timeout, on_progress=on_progress, on_queued=on_queued,
                               cancel_on_timeout=cancel_on_timeout)

    def cancel(self, prompt_id: str) -> str:
        """Stop one prompt: "removed" (was pending), "interrupted" (was running), or "not_found"."""
        return self.runner.cancel(prompt_id)

    def pending(self) -> set:
        """The prompt ids pending in ComfyUI's queue, within a cancel's time limit."""
        return self.runner.pending()

    def wait_for_history(self, prompt_id: str, timeout: float) -> dict:
        """Poll /history until the entry appears (ComfyTimeout after `timeout` seconds)."""
        return self.runner.wait_for_history(prompt_id, timeout)

    @staticmethod
    def output_images(history_entry: dict) -> list:
        """Every output node's images, in node order."""
        return output_images(history_entry)

    # ---------------------------------------------------------------- endpoints (see ComfyHttp)

    def upload_image(self, data: bytes, filename: str, *, subfolder: str = "", type: str = "input",
                     overwrite: bool = True, quiet: bool = False) -> dict:
        return self.http.upload_image(data, filename, subfolder=subfolder, type=type, overwrite=overwrite,
                                      quiet=quiet)

    def queue_prompt(self, prompt: dict, client_id: str, *, timeout=None) -> str:
        return self.http.queue_prompt(prompt, client_id, timeout=timeout)

    def get_history(self, prompt_id: str, *, timeout=None) -> Optional[dict]:
        return self.http.get_history(prompt_id, timeout=timeout)

    def view(self, image: OutputImage) -> bytes:
        return self.http.view(image)

    def has_file(self, filename: str, *, subfolder: str = "", type: str = "output") -> bool:
        return self.http.has_file(filename, subfolder=subfolder, type=type)

    def get_queue(self, *, timeout=None) -> dict:
        return self.http.get_queue(timeout=timeout)

    def delete_from_queue(self, prompt_ids: list) -> None:
        self.http.delete_from_queue(prompt_ids)

    def interrupt(self, prompt_id: Optional[str] = None) -> None:
        self.http.interrupt(prompt_id)

    def system_stats(self) -> dict:
        return self.http.system_stats()

    def is_up(self) -> bool:
        return self.http.is_up()

    def object_info(self, refresh: bool = False) -> dict:
        return self.http.object_info(refresh)

    def input_choices(self, class_type: str, input_name: str) -> list:
        """Enum values of one input (e.g. CheckpointLoaderSimple.ckpt_name). KeyError if unknown."""
        return input_choices(self.object_info(), class_type, input_name)
