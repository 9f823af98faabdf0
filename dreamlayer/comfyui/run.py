"""Running one prompt on ComfyUI and waiting for its end, the way docs/comfyui.md ("One run")
describes: queue it on a socket that is already open, read that socket until our prompt finishes,
and fall back to polling /history when there is no socket or it drops. Meanwhile: liveness checks
(was the prompt deleted?), cancellation, and the run's deadline, after which the prompt is cancelled.
"""
from __future__ import annotations

import logging
import threading
import time
from typing import Callable, Optional

import requests
import websocket  # websocket-client

from dreamlayer.comfyui.errors import (ComfyBadResponse, ComfyError, ComfyInterrupted, ComfyTimeout,
                                       ComfyUnreachable)
from dreamlayer.comfyui.http import ComfyHttp
from dreamlayer.comfyui.protocol import (Done, Progress, PromptWatch, RunResult, output_images, queue_ids,
                                         raise_for_history)
from dreamlayer.comfyui.sockets import SocketPool

log = logging.getLogger(__name__)

_TRANSIENT = (ComfyUnreachable, ComfyBadResponse, ComfyTimeout)  # HTTP failures worth retrying in a run


class PromptRunner:
    """Runs prompts over a ComfyHttp and a SocketPool; thread-safe, one per client."""

    def __init__(self, http: ComfyHttp, sockets: SocketPool, *, poll_interval: float, history_grace: float,
                 unreachable_grace: float, liveness_interval: float, ws_tick: float, end_of_prompt_wait: float):
        """See ComfyClient for the meaning of each interval."""
        self.http = http
        self.sockets = sockets
        self.poll_interval = poll_interval
        self.history_grace = history_grace
        self.unreachable_grace = unreachable_grace
        self.liveness_interval = liveness_interval
        self.ws_tick = ws_tick
        self.end_of_prompt_wait = end_of_prompt_wait
        self._active: dict = {}  # prompt_id -> Event set when cancel() removed it from the queue
        self._interrupted: set = set()  # prompts cancel() sent /interrupt for (see _wait_ws)
        self._active_lock = threading.Lock()

    def run(self, prompt: dict, *, timeout: float, on_progress: Optional[Callable] = None,
            on_queued: Optional[Callable] = None, cancel_on_timeout: bool = True) -> RunResult:
        """Queue `prompt` and wait for its outputs.

        The WebSocket is opened before queueing so a fast prompt cannot finish unseen; if it
        cannot connect or drops, /history is polled instead. `timeout` counts from this call;
        on timeout the prompt is cancelled (unless cancel_on_timeout=False) and ComfyTimeout raised.
        """
        deadline = time.monotonic() + timeout
        client_id, ws = self.sockets.take(deadline)
        prompt_id = None
        cancelled = threading.Event()
        reusable = False  # the socket saw our prompt to its end: the next run may use it
        try:
            prompt_id = self.http.queue_prompt(prompt, client_id, timeout=self._call_timeout(deadline))
            with self._active_lock:
                self._active[prompt_id] = cancelled
            _safe_call(on_queued, prompt_id)
            watch = PromptWatch(prompt_id)
            run = _Run(prompt_id, deadline, timeout, cancelled, watch, on_progress)
            source = "websocket"
            entry = announced = None
            if ws is not None:
                finished = reusable = self._wait_ws(ws, run)
                if finished and run.succeeded_at is not None and run.watch.outputs:
                    announced = run.watch.history_entry()  # the outputs /history will list
                elif finished:
                    entry = self._history_after_success(run)
                else:
                    run.lost_contact = True  # a prompt that vanishes now most likely died with ComfyUI
            if announced is not None:
                images = output_images(announced)
                log.info("prompt %s finished (websocket) with %d image(s)", prompt_id, len(images))
                return RunResult(prompt_id, images, None, source, load_history=lambda: self._history_later(run))
            if entry is None:
                source = "polling"
                entry = self._poll_history(prompt_id, deadline, run.timeout_error, run=run)
            raise_for_history(prompt_id, entry)
            images = output_images(entry)
            log.info("prompt %s finished (%s) with %d image(s)", prompt_id, source, len(images))
            return RunResult(prompt_id, images, entry, source)
        except ComfyTimeout:
            if prompt_id is not None and cancel_on_timeout:
                self._cancel_in_background(prompt_id)
            raise
        finally:
            if prompt_id is not None:
                with self._active_lock:
                    self._active.pop(prompt_id, None)
                    self._interrupted.discard(prompt_id)
            if ws is not None:
                self.sockets.release(client_id, ws, reusable)

    def wait_for_history(self, prompt_id: str, timeout: float) -> dict:
        """Poll /history until the entry appears. 0.3.40 sends execution_success a few ms
        before it writes history, so absence right after success is normal."""
        deadline = time.monotonic() + timeout
        return self._poll_history(prompt_id, deadline, lambda: ComfyTimeout(
            timeout, f"ComfyUI wrote no /history entry for prompt {prompt_id} within {timeout:g}s"))

    def cancel(self, prompt_id: str) -> str:
        """Stop one prompt: "removed" (was pending), "interrupted" (was running), or "not_found".

        /interrupt is global on 0.3.x, so it is only sent after /queue shows that *our* prompt is
        the running one (and carries {"prompt_id"} so newer servers can check it themselves).
        Each call waits at most unreachable_grace: a ComfyUI that cannot answer a cancel in that
        time is unreachable (a hung server must not hold up the cancels of the others).
        """
        try:
            return self._cancel(prompt_id, self._cancel_timeout())
        except ComfyTimeout as e:
            raise ComfyUnreachable(self.http.base_url, message=(
                f"ComfyUI at {self.http.base_url} did not answer the cancel of prompt {prompt_id}: {e}")) from e

    def _cancel_timeout(self) -> tuple:
        """(connect, read) of each call of a cancel: at most unreachable_grace (0.5 s at least)."""
        limit = max(self.unreachable_grace, 0.5)
        return min(self.http.connect_timeout, limit), limit

    def pending(self) -> set:
        """The prompt ids pending in ComfyUI's queue, asked as a cancel asks (ComfyError)."""
        return queue_ids(self.http.get_queue(timeout=self._cancel_timeout()), "queue_pending")

    def _cancel(self, prompt_id: str, timeout) -> str:
        queue = self.http.get_queue(timeout=timeout)
        if prompt_id in queue_ids(queue, "queue_pending"):
            self.http.delete_from_queue([prompt_id], timeout=timeout)
            queue = self.http.get_queue(timeout=timeout)
            if prompt_id in queue_ids(queue, "queue_pending"):
                raise ComfyBadResponse(f"ComfyUI at {self.http.base_url} kept prompt {prompt_id} "
                                       f"queued after POST /queue delete")
            if prompt_id not in queue_ids(queue, "queue_running"):
                if self.http.get_history(prompt_id, timeout=timeout) is not None:
                    return "not_found"  # it ran and finished between our two reads
                log.info("removed pending prompt %s from the ComfyUI queue", prompt_id)
                with self._active_lock:
                    event = self._active.get(prompt_id)
                if event is not None:
                    event.set()
                return "removed"
            # it started running between our two reads: interrupt it below
        if prompt_id in queue_ids(queue, "queue_running"):
            with self._active_lock:
                self._interrupted.add(prompt_id)
            self.http.interrupt(prompt_id, timeout=timeout)
            return "interrupted"
        return "not_found"

    def _call_timeout(self, deadline: float):
        remaining = max(0.05, deadline - time.monotonic())
        return (min(self.http.connect_timeout, remaining), min(self.http.read_timeout, remaining))

    def _poll_timeout(self, deadline: float):
        """Timeouts of the small GETs of a wait: a server that cannot answer them within
        unreachable_grace is as good as gone, so none may block longer than that."""
        cap = max(self.unreachable_grace, 0.5)
        connect, read = self._call_timeout(deadline)
        return (min(connect, cap), min(read, cap))

    def _wait_ws(self, ws, run: "_Run") -> bool:
        """Read frames until our prompt finishes (True) or the socket fails (False)."""
        next_liveness = time.monotonic() + self.liveness_interval
        failing_since = None  # the first of the liveness checks that have failed in a row
        while True:
            now = time.monotonic()
            if now >= run.deadline:
                raise run.timeout_error()
            run.raise_if_cancelled()
            if now >= next_liveness:
                # Nothing about our prompt for a while: was it deleted by someone else?
                state = self._check_liveness(run)
                if state == "finished":
                    return True  # finished without our seeing the signal; history says how
                if state != "unknown":
                    failing_since = None
                elif failing_since is None:
                    failing_since = now
                    next_liveness = time.monotonic() + self.unreachable_grace  # ask again soon
                    continue
                else:  # a silent socket and two checks unanswered: a hung server (a GPU driver, SIGSTOP)
                    self._cancel_in_background(run.prompt_id)  # if it ever answers again
                    raise ComfyUnreachable(self.http.base_url, message=(
                        f"ComfyUI at {self.http.base_url} stopped answering while running prompt "
                        f"{run.prompt_id}: its WebSocket is silent and GET /queue went unanswered for "
                        f"{time.monotonic() - failing_since:.0f}s"))
                next_liveness = now + self.liveness_interval
            try:
                ws.settimeout(max(0.01, min(self.ws_tick, run.deadline - now)))
                opcode, frame = ws.recv_data()
            except websocket.WebSocketTimeoutException:
                continue
            except (websocket.WebSocketException, OSError) as e:
                log.warning("ComfyUI WebSocket dropped while waiting for prompt %s (%s); polling "
                            "/history instead", run.prompt_id, e or type(e).__name__)
                return False
            if opcode == websocket.ABNF.OPCODE_CLOSE:
                log.warning("ComfyUI closed the WebSocket while waiting for prompt %s; polling "
                            "/history instead", run.prompt_id)
                return False
            if opcode == websocket.ABNF.OPCODE_TEXT:
                frame = frame.decode("utf-8", "replace")
            event = run.watch.handle(frame)  # raises on execution_error / execution_interrupted
            if event is None:
                continue
            if isinstance(event, Progress) and event.kind == "started":
                self._interrupt_again_if_asked(run.prompt_id)
            next_liveness = time.monotonic() + self.liveness_interval
            if isinstance(event, Done):
                log.debug("prompt %s done (%s)", run.prompt_id, event.signal)
                if event.signal == "execution_success":
                    run.succeeded_at = time.monotonic()
                    if not run.watch.outputs:
                        self._await_end_of_prompt(ws, run)  # /history will have to tell
                return True
            _safe_call(run.on_progress, event)

    def _await_end_of_prompt(self, ws, run: "_Run") -> None:
        """ComfyUI sends execution_success, then writes /history, then sends `executing` with
        node null. Waiting (briefly) for that last frame lets a single GET /history find the entry,
        instead of a first GET that misses it and a poll_interval's wait for the next."""
        deadline = min(run.deadline, time.monotonic() + self.end_of_prompt_wait)
        while (remaining := deadline - time.monotonic()) > 0:
            try:
                ws.settimeout(max(0.005, remaining))
                opcode, frame = ws.recv_data()
            except (websocket.WebSocketException, OSError):
                return  # /history polling copes
            if opcode == websocket.ABNF.OPCODE_CLOSE:
                return
            if opcode == websocket.ABNF.OPCODE_TEXT:
                frame = frame.decode("utf-8", "replace")
            try:
                if isinstance(run.watch.handle(frame), Done):
                    return
            except ComfyError:
                return  # nothing can fail after success; let /history tell

    def _history_after_success(self, run: "_Run") -> dict:
        """Read /history after the success signal, allowing for 0.3.40's late write."""
        grace = self.history_grace
        if run.succeeded_at is not None:  # the grace counts from the success signal
            grace = max(self.poll_interval, grace - (time.monotonic() - run.succeeded_at))
        try:
            return self.wait_for_history(run.prompt_id, grace)
        except ComfyTimeout:
            if run.watch.outputs:
                log.warning("no /history entry for prompt %s %gs after it succeeded; using the "
                            "outputs announced over the WebSocket", run.prompt_id, self.history_grace)
                return run.watch.history_entry()
            raise ComfyBadResponse(f"ComfyUI at {self.http.base_url} reported prompt {run.prompt_id} "
                                   f"done but wrote no /history entry within "
                                   f"{self.history_grace:g}s") from None

    def _history_later(self, run: "_Run") -> dict:
        """RunResult.history of a run that ended on the announced outputs."""
        try:
            return self._history_after_success(run)
        except ComfyError as e:
            log.warning("could not read /history of prompt %s (%s); using the outputs announced over "
                        "the WebSocket", run.prompt_id, e)
            return run.watch.history_entry()

    def _poll_history(self, prompt_id: str, deadline: float, on_deadline: Callable,
                      run: Optional["_Run"] = None) -> dict:
        """Poll /history until the entry appears. HTTP may fail for unreachable_grace seconds
        before ComfyUnreachable; with a `run`, also notices cancellation and a vanished prompt."""
        failing_since = None
        next_liveness = time.monotonic() + self.liveness_interval
        while True:
            asked = time.monotonic()
            try:
                entry = self.http.get_history(prompt_id, timeout=self._poll_timeout(deadline))
                if entry is not None:
                    return entry
                failing_since = None
            except _TRANSIENT as e:
                now = time.monotonic()
                failing_since = failing_since or asked
                if run is not None:
                    run.lost_contact = True
                log.debug("polling /history for %s failed: %s", prompt_id, e)
                if now - failing_since >= self.unreachable_grace:
                    raise ComfyUnreachable(self.http.base_url, message=(
                        f"lost contact with ComfyUI at {self.http.base_url} while waiting for prompt "
                        f"{prompt_id}: {e}")) from e
            if run is not None and failing_since is None:
                run.raise_if_cancelled()
                if time.monotonic() >= next_liveness:
                    if self._check_liveness(run) == "finished":
                        continue  # the next read returns the entry
                    next_liveness = time.monotonic() + self.liveness_interval
            now = time.monotonic()
            if now >= deadline:
                raise on_deadline()
            pause = min(self.poll_interval, deadline - now)
            if run is not None:
                run.cancelled.wait(pause)
            else:
                time.sleep(pause)

    def _check_liveness(self, run: "_Run") -> str:
        """"queued", "finished", or "unknown" (HTTP failed); raises if the prompt vanished."""
        try:
            # queue first: ComfyUI moves a prompt from the queue to history atomically
            timeout = self._poll_timeout(run.deadline)
            queue = self.http.get_queue(timeout=timeout)
            if run.prompt_id in queue_ids(queue, "queue_running") | queue_ids(queue, "queue_pending"):
                return "queued"
            if self.http.get_history(run.prompt_id, timeout=timeout) is not None:
                return "finished"
        except _TRANSIENT as e:
            log.debug("liveness check of prompt %s failed: %s", run.prompt_id, e)
            return "unknown"
        raise run.vanished_error(self.http.base_url)

    def _cancel_in_background(self, prompt_id: str) -> None:
        """The caller gets its error on time even if ComfyUI is slow to take the cancel."""
        threading.Thread(target=self._cancel_quietly, args=(prompt_id,),
                         name=f"comfy-cancel-{prompt_id[:8]}", daemon=True).start()

    def _interrupt_again_if_asked(self, prompt_id: str) -> None:
        """ComfyUI 0.3.40 clears its interrupt flag as a prompt starts (then sends execution_start):
        an /interrupt sent while ours moved from the queue to the worker is lost, and the prompt
        would run to its end. Seen starting after a cancel interrupted it: interrupted again."""
        with self._active_lock:
            asked = prompt_id in self._interrupted
        if asked:
            timeout = self._cancel_timeout()
            try:
                # only if ours is the one running (/interrupt is global): a late frame must not
                # stop the prompt that came after it
                if prompt_id in queue_ids(self.http.get_queue(timeout=timeout), "queue_running"):
                    self.http.interrupt(prompt_id, timeout=timeout)
                    log.info("prompt %s started after its cancel: interrupted again", prompt_id)
            except ComfyError as e:
                log.warning("could not interrupt prompt %s again: %s", prompt_id, e)

    #: How long the cancel of an abandoned prompt keeps trying a ComfyUI that does not answer
    #: (hung, or restarting), and how often.
    ABANDONED_RETRY_S, ABANDONED_RETRY_EVERY_S = 600.0, 5.0

    def _cancel_quietly(self, prompt_id: str) -> None:
        until = time.monotonic() + self.ABANDONED_RETRY_S
        while True:
            try:
                outcome = self.cancel(prompt_id)
                log.info("abandoned prompt %s: cancel -> %s", prompt_id, outcome)
                return
            except ComfyUnreachable as e:  # a hung ComfyUI may answer again: its prompt would then run
                # (one that refuses connections is down: restarted, it has forgotten its queue)
                if not _no_answer(e) or time.monotonic() + self.ABANDONED_RETRY_EVERY_S > until:
                    log.warning("could not cancel abandoned prompt %s: %s", prompt_id, e)
                    return
                log.debug("abandoned prompt %s: cancel failed (%s); trying again", prompt_id, e)
                time.sleep(self.ABANDONED_RETRY_EVERY_S)
            except ComfyError as e:
                log.warning("could not cancel abandoned prompt %s: %s", prompt_id, e)
                return


def _no_answer(error: ComfyUnreachable) -> bool:
    """Connected, but ComfyUI did not answer in time (it hangs), as opposed to refusing."""
    return isinstance(error.__cause__, (ComfyTimeout, requests.exceptions.ReadTimeout))


class _Run:
    """State of one run() shared by the WebSocket wait and the polling fallback."""

    def __init__(self, prompt_id, deadline, timeout, cancelled, watch, on_progress):
        self.prompt_id = prompt_id
        self.deadline = deadline
        self.timeout = timeout
        self.cancelled = cancelled
        self.watch = watch
        self.on_progress = on_progress
        self.lost_contact = False
        self.succeeded_at = None  # monotonic time of execution_success, when seen

    def timeout_error(self) -> ComfyTimeout:
        return ComfyTimeout(self.timeout, f"ComfyUI prompt {self.prompt_id} did not finish "
                                          f"within {self.timeout:g}s")

    def vanished_error(self, base_url: str) -> ComfyError:
        if self.lost_contact:
            return ComfyUnreachable(base_url, message=(
                f"ComfyUI at {base_url} lost prompt {self.prompt_id}: it is neither queued nor in "
                f"history after the connection failed (did ComfyUI restart?)"))
        return ComfyInterrupted(prompt_id=self.prompt_id, message=(
            f"ComfyUI prompt {self.prompt_id} was removed from the queue before it finished"))

    def raise_if_cancelled(self):
        if self.cancelled.is_set():
            raise ComfyInterrupted(prompt_id=self.prompt_id, message=(
                f"ComfyUI prompt {self.prompt_id} was cancelled before it ran"))


def _safe_call(callback, arg) -> None:
    """Callbacks report to the caller; a bug in one must not abort the generation."""
    if callback is None:
        return
    try:
        callback(arg)
    except Exception:  # noqa: BLE001
        log.exception("ComfyClient callback %r raised", callback)
