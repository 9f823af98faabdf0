"""A graceful stop for waitress: on SIGTERM or Ctrl-C the service stops taking connections (and,
with REDIS_URL, jobs), the requests in progress get up to a grace period to answer (a synchronous
request waits for its run), then the server closes and the queue workers get what is left of it.

waitress's own stop (KeyboardInterrupt) ends its socket loop first and gives its threads 5 s: an
answer finished after that is never sent, so a synchronous request running then lost its answer.
"""
from __future__ import annotations

import logging
import signal
import socket
import threading
import time

from waitress import wasyncore
from waitress.server import BaseWSGIServer

log = logging.getLogger(__name__)

#: docs/scaling.md: a replica stopped with SIGTERM gives its running jobs up to this long.
GRACE_S = 10.0


#: After the grace period, the requests still running are cancelled (``on_overdue``) and get this
#: long to send their answer (409 interrupted) before their connections close.
LAST_WORDS_S = 3.0


class GracefulStop:
    """SIGTERM and Ctrl-C (SIGINT) caught from its creation on: create it before the queue workers
    start (with REDIS_URL they take jobs at once), while the server does not exist yet. A signal
    that comes before ``serve()`` is kept and starts the stop as soon as the server is given; a
    second one ends the process at once, as a second signal does later.

    The stop: ``on_stop()`` runs first (the queue workers stop taking jobs); ``on_overdue()``, if
    given, once the grace period is over with requests still running (it cancels their
    generations, so that they answer). ``deadline`` (time.monotonic()) is set once it began."""

    def __init__(self, grace_s: float = GRACE_S):
        self.grace_s = grace_s
        self.deadline = None
        self._pending = None  # a signal that came before serve()
        self._stop = None  # (server, on_stop, on_overdue) once serve() was called
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, self._on_signal)

    def serve(self, server, on_stop, on_overdue=None) -> None:
        """The server to stop (not run yet); a signal that came before starts its stop now."""
        self._stop = (server, on_stop, on_overdue)  # before the check: a handler may run in between
        if self._pending is not None:
            self._begin(self._pending)

    def _on_signal(self, signum, frame) -> None:
        if self._stop is not None:
            self._begin(signum)
        elif self._pending is None:
            self._pending = signum
            log.info("%s while starting: the service stops once it has started", signal.Signals(signum).name)
        else:  # the second, while starting (a start that hangs): as if we were not here
            _default_handlers()
            signal.raise_signal(signum)

    def _begin(self, signum) -> None:
        _default_handlers()  # a second signal ends the process at once
        self._pending = None
        self.deadline = time.monotonic() + self.grace_s
        log.info("%s: no new connections or jobs; requests in progress have %g s to answer",
                 signal.Signals(signum).name, self.grace_s)
        server, on_stop, on_overdue = self._stop
        threading.Thread(target=_drain, args=(server, on_stop, self.deadline, on_overdue),
                         name="graceful-stop", daemon=True).start()


def _default_handlers() -> None:
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)


class SignalWait:
    """SIGTERM and Ctrl-C (SIGINT) caught from its creation on; ``wait()`` blocks the main thread
    until one came and returns it. Create it before any thread that takes work starts (a signal
    before that ends the process at once). A second signal ends the process at once, whether it
    comes before ``wait()`` (a start that hangs) or after: the previous handlers take it.

    Not ``Event.wait()`` with a handler that sets the event: the kernel hands a process's signal
    to any of its threads, and when another than the main one takes it, a main thread asleep on a
    lock is not woken (a queue-worker replica ignored SIGTERM so); and a handler that takes the
    event's lock can deadlock against the wait it interrupts. Python's C-level handler writes the
    signal's number to the wakeup socket from whichever thread it runs in; a blocking read of it
    returns then, and a signal that came before the read is waiting there.

    A context manager: leaving the block (also by an exception while the process starts) puts the
    previous handlers back."""

    def __init__(self, signums=(signal.SIGTERM, signal.SIGINT)):
        self._read, self._write = socket.socketpair()  # a socket: Windows takes no pipe as the wakeup fd
        self._write.setblocking(False)
        self._previous_fd = signal.set_wakeup_fd(self._write.fileno(), warn_on_full_buffer=False)
        self._seen = False
        self._closed = False
        # only now: a signal that comes once its handler is set must find the socket
        self._previous = {signum: signal.signal(signum, self._caught) for signum in signums}

    def _caught(self, signum, frame) -> None:
        if self._seen:  # the second: handled as if we were not here
            self._restore_handlers()
            signal.raise_signal(signum)
        self._seen = True

    def _restore_handlers(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)

    def wait(self) -> signal.Signals:
        try:
            while True:
                for signum in self._read.recv(64):
                    if signum in self._previous:
                        return signal.Signals(signum)
        finally:
            self.close()

    def __enter__(self) -> "SignalWait":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def close(self) -> None:
        """The previous handlers and wakeup fd again (once; later calls do nothing)."""
        if self._closed:
            return
        self._closed = True
        self._restore_handlers()
        signal.set_wakeup_fd(self._previous_fd)
        self._read.close()
        self._write.close()


def _socket_map(server) -> dict:
    return server.map if hasattr(server, "map") else server._map  # MultiSocketServer / one socket


def _drain(server, on_stop, deadline: float, on_overdue=None) -> None:
    on_stop()
    socket_map = _socket_map(server)
    listeners = [d for d in list(socket_map.values()) if isinstance(d, BaseWSGIServer)]
    trigger = listeners[0].trigger

    def stop_accepting():
        for listener in listeners:
            listener.accepting = False
            wasyncore.dispatcher.close(listener)  # the listening socket only (not the trigger)

    trigger.pull_trigger(stop_accepting)
    _wait_idle(server, socket_map, deadline)
    if _busy(server, socket_map) and on_overdue is not None:
        log.warning("requests still in progress after the grace period: cancelling them")
        on_overdue()
        _wait_idle(server, socket_map, time.monotonic() + LAST_WORDS_S)
    if _busy(server, socket_map):
        log.warning("requests still in progress after the grace period: closing them")
    trigger.pull_trigger(lambda: wasyncore.close_all(socket_map))  # the loop ends with its map empty


def _wait_idle(server, socket_map, deadline: float) -> None:
    while _busy(server, socket_map) and time.monotonic() < deadline:
        time.sleep(0.05)


def _busy(server, socket_map) -> bool:
    """A request queued, running, or with answer bytes not sent yet."""
    dispatcher = server.task_dispatcher
    if dispatcher.queue:
        return True
    return any(getattr(channel, "requests", None) or getattr(channel, "total_outbufs_len", 0)
               for channel in list(socket_map.values()))
