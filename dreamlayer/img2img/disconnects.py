"""A synchronous request whose client has gone (a closed tab, curl stopped with Ctrl-C) has its
generation cancelled: its prompt would otherwise run to its end on the GPU, holding up the
requests behind it, and its images be served to nobody.

waitress notices a closed connection while the app runs only when it reads ahead on it
(``channel_request_lookahead``, set in app.server_options); it then answers True from
``environ["waitress.client_disconnected"]``. One thread looks at the waiting requests a few
times a second, and only while there are some.
"""
from __future__ import annotations

import logging
import threading
import time
from contextlib import contextmanager

log = logging.getLogger(__name__)


class DisconnectWatch:
    INTERVAL_S = 0.25

    def __init__(self):
        self._lock = threading.Lock()
        self._watched: dict = {}  # token -> (client_disconnected, on_gone)
        self._thread = None

    @contextmanager
    def watching(self, environ, on_gone):
        """Call ``on_gone()`` (once, in the watching thread) if the client of ``environ`` hangs up
        before the block ends. Without waitress's read-ahead there is nothing to watch."""
        check = environ.get("waitress.client_disconnected")
        if check is None:
            yield
            return
        token = object()
        with self._lock:
            self._watched[token] = (check, on_gone)
            if self._thread is None:
                self._thread = threading.Thread(target=self._watch, name="img2img-disconnects", daemon=True)
                self._thread.start()
        try:
            yield
        finally:
            with self._lock:
                self._watched.pop(token, None)

    def _watch(self) -> None:
        while True:
            time.sleep(self.INTERVAL_S)
            with self._lock:
                if not self._watched:
                    self._thread = None  # the next watching() starts another
                    return
                gone = [(token, entry) for token, entry in self._watched.items() if entry[0]()]
                for token, _ in gone:
                    del self._watched[token]
            for _, (_, on_gone) in gone:
                try:
                    on_gone()
                except Exception:  # noqa: BLE001 - the request ends by itself all the same
                    log.warning("could not cancel the generation of a client that went away", exc_info=True)
