"""The WebSockets of a ComfyUI client: one per run at a time, each with its own client_id, kept
open between runs.

Opening a socket costs a round trip, a handshake and ComfyUI's greeting, in this process and in
ComfyUI's, so a socket whose run ended normally is kept for the next run (at most ``keep`` idle at
once): ComfyUI tags every message of a prompt with its prompt_id, and a run listens only to its own
(protocol.PromptWatch), so what follows the previous prompt's end is ignored like any other
prompt's messages. A run takes the most recently used idle socket, emptied of what it heard while
idle (queue broadcasts, the previous prompt's last frames), or opens one of its own. A socket
whose run did not end normally (timeout, cancel, dropped) is closed, and if no idle socket is left
the next run's is opened, both in the background: the close handshake waits for ComfyUI's answer,
which concerns no caller. While sockets are idle, the same worker reads away what ComfyUI
broadcasts to them (every DRAIN_S): ComfyUI sends queue status to every socket for every prompt of
every client, and a socket nobody reads fills up until ComfyUI's sends stall, for all its clients.
One long-lived worker thread does that background work: starting a thread per run cost the run
about 2 ms (Thread.start() waits until the new thread is scheduled).
"""
from __future__ import annotations

import logging
import queue
import select
import threading
import time
import uuid
from urllib.parse import quote, urlsplit

import websocket  # websocket-client

log = logging.getLogger(__name__)


class SocketPool:
    """Hands out run sockets and keeps the idle ones; thread-safe."""

    #: While sockets are idle, the worker reads away what ComfyUI broadcasts to them (queue status
    #: for every prompt of every client) this often: a socket nobody reads fills up, and then
    #: ComfyUI's sends stall, to every client. Without idle sockets or chores the worker ends
    #: after this long.
    DRAIN_S = 2.0
    #: How long a run waits for the idle sockets while the worker reads them (well under a
    #: millisecond normally) before it opens its own.
    DRAIN_WAIT_S = 0.5
    #: Idle sockets kept open at most (the rest of a burst's are closed when their runs end).
    KEEP = 4

    def __init__(self, base_url: str, *, connect_timeout: float, spare: bool = True, keep: int = KEEP):
        self.base_url = base_url
        self.connect_timeout = connect_timeout
        self.keep = keep if spare else 0  # spare=False: a socket per run, closed after it
        self._idle: list = []  # (client_id, WebSocket), most recently used last
        self._lock = threading.Lock()
        self._drained = threading.Condition(self._lock)  # the worker has put the idle sockets back
        self._draining = False
        self._opening = False
        self._closed = False
        self._chores: queue.SimpleQueue = queue.SimpleQueue()  # (ws to close, open a spare?)
        self._worker = None

    def url(self, client_id: str) -> str:
        parts = urlsplit(self.base_url)
        scheme = "wss" if parts.scheme == "https" else "ws"
        return f"{scheme}://{parts.netloc}{parts.path}/ws?clientId={quote(client_id)}"

    def idle(self) -> list:
        """The client_ids of the idle sockets, most recently used last."""
        with self._lock:
            return [client_id for client_id, _ in self._idle]

    def take(self, deadline: float):
        """(client_id, ws) for one run: an idle socket, or a new one. ws is None when none can be
        opened before ``deadline`` (time.monotonic()); the run then polls /history."""
        client_id, ws = self._take_idle()
        if ws is not None:
            return client_id, ws
        client_id = str(uuid.uuid4())
        url = self.url(client_id)
        try:
            return client_id, _connect(url, max(0.05, min(self.connect_timeout, deadline - time.monotonic())))
        except (websocket.WebSocketException, OSError) as e:
            log.warning("cannot open ComfyUI WebSocket %s (%s); will poll /history instead", url, e)
            return client_id, None

    def _take_idle(self):
        """(client_id, ws) of the most recently used idle socket, emptied of what it heard while
        idle, or (None, None) when there is none alive."""
        while True:
            with self._lock:
                if self._draining:  # the worker has them for a moment
                    self._drained.wait_for(lambda: not self._draining, timeout=self.DRAIN_WAIT_S)
                if not self._idle:
                    return None, None
                client_id, ws = self._idle.pop()
            if _drain(ws):
                return client_id, ws
            _close_quietly(ws)  # closed by ComfyUI (restarted): try the next

    def release(self, client_id: str, ws, reusable: bool) -> None:
        """A run is over with ``ws``: keep it for the next run when ``reusable`` (its run ended
        normally) and fewer than ``keep`` are idle; else close it in the background, and open the
        next run's socket there too if no idle one is left."""
        with self._lock:
            if reusable and not self._closed and len(self._idle) < self.keep:
                self._idle.append((client_id, ws))
                self._ensure_worker()  # it keeps the idle sockets read
                return
            open_spare = self.keep > 0 and not self._closed and not self._idle and not self._opening
            self._opening = self._opening or open_spare
            # under the lock: the worker decides to end under it too, so no chore is left behind
            self._chores.put((ws, open_spare))
            self._ensure_worker()

    def _ensure_worker(self) -> None:
        """Start the worker if none runs (call under the lock: the worker decides to end under
        it too, so no chore or idle socket is left without one)."""
        if self._worker is None:
            self._worker = threading.Thread(target=self._work, name="comfy-spare-ws", daemon=True)
            self._worker.start()

    def _work(self) -> None:
        """Close sockets and open spares, in order, and keep the idle sockets read; ends after
        DRAIN_S with neither (or at close()), and release() starts a new one when needed."""
        while True:
            try:
                chore = self._chores.get(timeout=self.DRAIN_S)
            except queue.Empty:
                if self._drain_idle():
                    continue
                with self._lock:
                    if self._chores.empty() and not self._idle:
                        self._worker = None
                        return
                continue
            if chore is None:  # close()
                return
            try:
                self._close_and_replace(*chore)
            except Exception:  # pragma: no cover - the worker must outlive any one socket
                log.exception("spare WebSocket chore failed")

    def _drain_idle(self) -> bool:
        """Read away what the idle sockets heard and drop those ComfyUI closed; True while any
        is idle. A run that wants a socket meanwhile waits for them (reading takes well under a
        millisecond)."""
        with self._lock:
            if not self._idle:
                return False
            idle, self._idle, self._draining = self._idle, [], True
        alive, dead = [], []
        for entry in idle:
            (alive if _drain(entry[1]) else dead).append(entry)
        with self._lock:
            if self._closed:
                surplus, alive = alive, []
            else:
                self._idle = alive + self._idle  # those released meanwhile are the most recent
                surplus = self._idle[:max(0, len(self._idle) - self.keep)]
                del self._idle[:len(surplus)]
            has_idle = bool(self._idle)
            self._draining = False
            self._drained.notify_all()
        for _, ws in dead + surplus:  # a close waits for ComfyUI's answer: not while runs wait
            _close_quietly(ws)
        return has_idle

    def _close_and_replace(self, ws, open_spare: bool) -> None:
        _close_quietly(ws)
        if not open_spare:
            return
        client_id, ws = str(uuid.uuid4()), None
        try:
            ws = _connect(self.url(client_id), self.connect_timeout)
        except Exception as e:  # noqa: BLE001 - the next run opens its own socket and reports
            log.debug("could not open a spare ComfyUI WebSocket: %s", e)
        finally:
            with self._lock:
                self._opening = False
                if ws is not None and not self._closed and len(self._idle) < self.keep:
                    self._idle.insert(0, (client_id, ws))
                    ws = None
        if ws is not None:
            _close_quietly(ws)

    def close(self) -> None:
        """Close the idle sockets; none is kept after this."""
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
            if self._worker is not None:
                self._chores.put(None)  # the worker ends once the chores before it are done
                self._worker = None
        for _, ws in idle:
            _close_quietly(ws)


def _connect(url: str, timeout: float):
    # Text frames are decoded with errors="replace" by the run (run.py): websocket-client's own
    # UTF-8 check, in pure Python, would cost ~70 us per frame for nothing.
    return websocket.create_connection(url, timeout=timeout, skip_utf8_validation=True)


def _drain(ws) -> bool:
    """Read every frame an idle socket has waiting; False when the socket is closed or broken."""
    try:
        while ws.sock is not None and select.select([ws.sock], [], [], 0)[0]:
            ws.settimeout(1.0)  # a frame that has started arriving is complete in a moment
            opcode, _ = ws.recv_data()
            if opcode == websocket.ABNF.OPCODE_CLOSE:
                return False
        return ws.sock is not None and ws.connected
    except (websocket.WebSocketException, OSError, ValueError):
        return False


def _close_quietly(ws) -> None:
    try:
        ws.close(timeout=0.5)
    except Exception:  # noqa: BLE001 - closing a broken socket may fail; nothing to do about it
        pass
