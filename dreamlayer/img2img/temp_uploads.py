"""A finished run's HTTP uploads, made small.

ComfyUI has no route to delete an upload. Inputs sent to a backend that shares no disk with us
go to its temp folder (InputStager), which ComfyUI empties only when it starts and exits: on a
ComfyUI that runs for weeks, every request would leave its inputs there (a stored 1024² PNG is
3 MB). Once a run has ended, each of its uploads is overwritten — same name, ``overwrite=true``
— with a 1×1 PNG, so what is left until ComfyUI's next start is a few dozen bytes per request.
That is done by one background thread, after the answer: it costs the request nothing.
A run whose process died (SIGKILL) never gets there: ``shrink_lost_uploads`` does it for the
worker that finds the lost job, before the job runs again.
"""
from __future__ import annotations

import io
import logging
import queue
import threading

from PIL import Image

log = logging.getLogger(__name__)


def _placeholder() -> bytes:
    out = io.BytesIO()
    Image.new("L", (1, 1), 255).save(out, "PNG")
    return out.getvalue()


#: What an upload becomes once its run has ended (a valid PNG: ComfyUI may list it).
PLACEHOLDER = _placeholder()


class UploadShrinker:
    """Overwrites ended runs' uploads with PLACEHOLDER, in the background. Best effort: a backend
    that does not answer is skipped (it empties its temp folder when it starts again), and at
    most ``max_pending`` uploads wait (more are skipped, and that is logged once)."""

    def __init__(self, max_pending: int = 1024):
        self._queue: queue.Queue = queue.Queue(max_pending)
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._closed = False
        self._warned = False

    def shrink(self, client, uploads: list) -> None:
        """Overwrite ``uploads`` ((subfolder, name) in ``client``'s temp folder) soon."""
        for subfolder, name in uploads:
            with self._lock:
                if self._closed:
                    return
                if self._thread is None:
                    self._thread = threading.Thread(target=self._work, name="comfy-upload-shrinker", daemon=True)
                    self._thread.start()
            try:
                self._queue.put_nowait((client, subfolder, name))
            except queue.Full:
                if not self._warned:
                    self._warned = True
                    log.warning("more than %d uploads wait to be made small in ComfyUI's temp folder; "
                                "leaving the others as they are (ComfyUI empties that folder when it starts)",
                                self._queue.maxsize)

    def _work(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            client, subfolder, name = item
            try:
                client.upload_image(PLACEHOLDER, name, subfolder=subfolder, type="temp", overwrite=True, quiet=True)
            except Exception as exc:  # noqa: BLE001 - best effort: the backend may be gone
                log.debug("could not make the upload %s/%s small on %s: %s", subfolder, name,
                          getattr(client, "base_url", "?"), exc)
            finally:
                self._queue.task_done()

    def join(self) -> None:
        """Wait until every upload handed over so far was dealt with (tests, shutdown)."""
        self._queue.join()

    def close(self, timeout: float = 2.0) -> None:
        """Stop taking work; give what waits ``timeout`` seconds to be done."""
        with self._lock:
            self._closed = True
            thread = self._thread
        if thread is not None:
            try:
                self._queue.put(None, timeout=timeout)
            except queue.Full:
                return
            thread.join(timeout)


def shrink_lost_uploads(client, names: list, subfolder: str) -> int:
    """Overwrite a lost run's uploads (``names`` in the order they are staged, the image first)
    with PLACEHOLDER where they are on this backend; returns how many were. Synchronous: the
    caller does it before the job runs again under the same names (a late overwrite would hit
    the new run's inputs). A backend without the first name never had the run's inputs."""
    shrunk = 0
    for i, name in enumerate(names):
        if not client.has_file(name, subfolder=subfolder, type="temp"):
            if i == 0:
                break
            continue
        client.upload_image(PLACEHOLDER, name, subfolder=subfolder, type="temp", overwrite=True, quiet=True)
        shrunk += 1
    return shrunk
