"""A small client for one ComfyUI server (HTTP + WebSocket), modelled on ComfyUI's
script_examples/websockets_api_example.py: one small method per endpoint and one loop that waits
for our prompt. See docs/comfyui.md for the protocol details this code relies on.

One ComfyClient is meant to be shared by all request threads of the service.
"""
from __future__ import annotations

import json
import logging
import mimetypes
import select
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Callable, Optional, Union
from urllib.parse import quote, urlsplit

import requests
import websocket  # websocket-client

log = logging.getLogger(__name__)

__all__ = [
    "ComfyError", "ComfyUnreachable", "ComfyRejected", "ComfyExecutionFailed", "ComfyInterrupted",
    "ComfyTimeout", "ComfyBadResponse", "OutputImage", "Progress", "Done", "RunResult",
    "PromptWatch", "ComfyClient",
]


# --------------------------------------------------------------------------------------------
# Errors: each carries the HTTP status the service should answer and a stable code.
# --------------------------------------------------------------------------------------------

class ComfyError(Exception):
    """Base of every error this client raises."""
    status = 502
    code = "comfyui_error"

    def details(self) -> dict:
        """JSON-safe extra fields for an error response (subclasses add theirs)."""
        return {}

    def to_dict(self) -> dict:
        return {"code": self.code, "message": str(self), **self.details()}


class ComfyUnreachable(ComfyError):
    """ComfyUI cannot be reached (refused, DNS, connect timeout) or went away mid-run."""
    status = 503
    code = "comfyui_unreachable"

    def __init__(self, url: str, reason: str = "", message: Optional[str] = None):
        self.url = url
        self.reason = reason
        super().__init__(message or f"ComfyUI is unreachable at {url}" + (f" ({reason})" if reason else ""))

    def details(self):
        return {"url": self.url}


class ComfyRejected(ComfyError):
    """POST /prompt answered 400: the workflow failed ComfyUI's validation."""
    status = 502
    code = "comfyui_rejected_workflow"

    def __init__(self, error, node_errors):
        self.error = error              # ComfyUI's `error`, unchanged
        self.node_errors = node_errors  # ComfyUI's `node_errors`, unchanged
        super().__init__(_describe_rejection(error, node_errors))

    def details(self):
        return {"error": self.error, "node_errors": self.node_errors}


class ComfyExecutionFailed(ComfyError):
    """A node raised while ComfyUI ran the prompt (`execution_error`)."""
    status = 502
    code = "comfyui_execution_error"

    def __init__(self, node_id=None, node_type=None, exception_message="", exception_type="",
                 traceback=None, prompt_id=None):
        self.node_id = node_id
        self.node_type = node_type
        self.exception_message = exception_message
        self.exception_type = exception_type
        self.traceback = traceback or []
        self.prompt_id = prompt_id
        where = f"node {node_id} ({node_type})" if node_id is not None else "an unknown node"
        what = f"{exception_type}: {exception_message}" if exception_type else (exception_message or "no details")
        super().__init__(f"ComfyUI failed at {where}: {what}")

    def details(self):
        return {"node_id": self.node_id, "node_type": self.node_type,
                "exception_type": self.exception_type, "exception_message": self.exception_message}


class ComfyInterrupted(ComfyError):
    """The prompt was interrupted, or removed from the queue before it ran."""
    status = 409
    code = "interrupted"

    def __init__(self, node_id=None, node_type=None, prompt_id=None, message=None):
        self.node_id = node_id
        self.node_type = node_type
        self.prompt_id = prompt_id
        if message is None:
            where = f" at node {node_id} ({node_type})" if node_id is not None else ""
            message = f"ComfyUI prompt {prompt_id} was interrupted{where}"
        super().__init__(message)

    def details(self):
        return {"node_id": self.node_id, "node_type": self.node_type}


class ComfyTimeout(ComfyError):
    """The prompt (or one HTTP call) did not finish in time."""
    status = 504
    code = "comfyui_timeout"

    def __init__(self, timeout: float, message: Optional[str] = None):
        self.timeout = timeout
        super().__init__(message or f"ComfyUI did not finish within {timeout:g}s")

    def details(self):
        return {"timeout": self.timeout}


class ComfyBadResponse(ComfyError):
    """ComfyUI answered with a status or body this client does not understand."""
    status = 502
    code = "comfyui_bad_response"


def _describe_rejection(error, node_errors) -> str:
    if isinstance(error, dict):
        head = error.get("message") or error.get("type") or "invalid prompt"
        if error.get("details"):
            head += f" ({error['details']})"
    else:
        head = str(error)
    parts = []
    if isinstance(node_errors, dict):
        for node_id, info in node_errors.items():
            for err in (info or {}).get("errors", []):
                parts.append(f"node {node_id} ({info.get('class_type')}): "
                             f"{err.get('message')}: {err.get('details')}")
    return "ComfyUI rejected the workflow: " + head + ("; " + "; ".join(parts) if parts else "")


# --------------------------------------------------------------------------------------------
# Values
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class OutputImage:
    node_id: str
    filename: str
    subfolder: str
    type: str


@dataclass(frozen=True)
class Progress:
    prompt_id: str
    kind: str  # "queued" | "started" | "cached" | "executing" | "progress"
    value: Optional[int] = None
    max: Optional[int] = None
    node: Optional[str] = None
    queue_remaining: Optional[int] = None
    nodes: tuple = ()  # for "cached": the node ids served from cache


@dataclass(frozen=True)
class Done:
    """Our prompt finished successfully; `signal` says which message told us."""
    prompt_id: str
    signal: str  # "execution_success" | "executing_null"


class RunResult:
    """A finished run: its prompt id, output images, /history entry, and how the end was learned
    ("websocket" or "polling").

    A run that ended on the outputs announced over the socket has not read /history (ComfyUI
    files it a few ms after reporting success): ``history`` reads it on first use, waiting
    briefly for that write; until then it is not fetched at all."""

    def __init__(self, prompt_id: str, images: list, history: Optional[dict], source: str = "websocket",
                 load_history: Optional[Callable[[], dict]] = None):
        self.prompt_id = prompt_id
        self.images = images
        self.source = source
        self._history = history
        self._load_history = load_history

    @property
    def history(self) -> dict:
        if self._history is None and self._load_history is not None:
            self._history, self._load_history = self._load_history(), None
        return self._history

    def __repr__(self):
        return f"RunResult({self.prompt_id!r}, {len(self.images)} image(s), source={self.source!r})"


# --------------------------------------------------------------------------------------------
# Pure message handling (replayable from captured traces, no sockets)
# --------------------------------------------------------------------------------------------

class PromptWatch:
    """Interprets ComfyUI WebSocket frames for one prompt_id.

    handle() returns None (ignore), a Progress, or Done, and raises ComfyExecutionFailed /
    ComfyInterrupted. It does no I/O so captured traces can be replayed through it in tests.
    Other prompts' messages matter because execution_interrupted is broadcast to every socket.
    """

    def __init__(self, prompt_id: str):
        self.prompt_id = prompt_id
        self.started = False
        self.outputs: dict = {}  # node_id -> output of `executed`: the outputs /history will list

    def history_entry(self) -> dict:
        """The /history entry of a prompt that succeeded, from the `executed` messages seen: ComfyUI
        sends one per output node (cached ones too) with the very `output` it files in /history,
        before execution_success. Its own frontend shows results from these messages alone."""
        return {"outputs": dict(self.outputs),
                "status": {"status_str": "success", "completed": True, "messages": []}}

    def handle(self, message) -> Union[None, Progress, Done]:
        if isinstance(message, (bytes, bytearray, memoryview)):
            return None  # binary preview frames
        if isinstance(message, str):
            try:
                message = json.loads(message)
            except ValueError:
                log.warning("ignoring a WebSocket text frame that is not JSON: %.80r", message)
                return None
        if not isinstance(message, dict) or not isinstance(message.get("data"), dict):
            return None
        mtype, data = message.get("type"), message["data"]
        pid = self.prompt_id

        if mtype == "status":
            # Broadcast queue size; the greeting (with "sid") predates our prompt, so skip it.
            if self.started or "sid" in data:
                return None
            remaining = ((data.get("status") or {}).get("exec_info") or {}).get("queue_remaining")
            return Progress(pid, "queued", queue_remaining=remaining)

        if data.get("prompt_id") != pid:
            return None

        if mtype == "execution_start":
            self.started = True
            return Progress(pid, "started")
        if mtype == "execution_cached":
            self.started = True
            return Progress(pid, "cached", nodes=tuple(data.get("nodes") or ()))
        if mtype == "executing":
            if data.get("node") is None:
                return Done(pid, "executing_null")  # the classic end-of-prompt signal
            self.started = True
            return Progress(pid, "executing", node=str(data["node"]))
        if mtype == "progress":
            node = data.get("node")
            return Progress(pid, "progress", value=data.get("value"), max=data.get("max"),
                            node=None if node is None else str(node))
        if mtype == "executed":
            if data.get("node") is not None and isinstance(data.get("output"), dict):
                self.outputs[str(data["node"])] = data["output"]
            return None
        if mtype == "execution_success":
            return Done(pid, "execution_success")
        if mtype == "execution_error":
            raise execution_failed_from(data)
        if mtype == "execution_interrupted":
            raise ComfyInterrupted(data.get("node_id"), data.get("node_type"), prompt_id=pid)
        return None  # e.g. progress_state on newer servers


def execution_failed_from(data: dict) -> ComfyExecutionFailed:
    """Build the exception from an execution_error payload (WebSocket or history)."""
    return ComfyExecutionFailed(
        node_id=data.get("node_id"), node_type=data.get("node_type"),
        exception_message=data.get("exception_message", ""),
        exception_type=data.get("exception_type", ""),
        traceback=data.get("traceback"), prompt_id=data.get("prompt_id"))


def raise_for_history(prompt_id: str, entry: dict) -> None:
    """Map a finished /history entry with status "error" to the same exceptions as the WebSocket."""
    status = entry.get("status") or {}
    if status.get("status_str") != "error":
        return
    for name, data in status.get("messages") or []:
        if name == "execution_error":
            raise execution_failed_from({**data, "prompt_id": prompt_id})
        if name == "execution_interrupted":
            raise ComfyInterrupted(data.get("node_id"), data.get("node_type"), prompt_id=prompt_id)
    raise ComfyExecutionFailed(exception_message="history says status 'error' without details",
                               prompt_id=prompt_id)


def _node_order(node_id: str):
    return (0, int(node_id), "") if str(node_id).isdigit() else (1, 0, str(node_id))


def _outputs_to_images(outputs: dict) -> list:
    images = []
    for node_id in sorted(outputs or {}, key=_node_order):
        for img in (outputs[node_id] or {}).get("images") or []:
            images.append(OutputImage(str(node_id), img["filename"], img.get("subfolder", ""),
                                      img.get("type", "output")))
    return images


# --------------------------------------------------------------------------------------------
# The client
# --------------------------------------------------------------------------------------------

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
        wait for the `executing` null that follows ComfyUI's /history write; spare_socket: keep one
        WebSocket open ahead of the next run (opening one costs a round trip and a handshake)."""
        self.base_url = base_url.rstrip("/")
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self.poll_interval = poll_interval
        self.history_grace = history_grace
        self.unreachable_grace = unreachable_grace
        self.liveness_interval = liveness_interval
        self.ws_tick = ws_tick
        self.end_of_prompt_wait = end_of_prompt_wait
        self._session = requests.Session()
        adapter = requests.adapters.HTTPAdapter(pool_connections=4, pool_maxsize=pool_size)
        self._session.mount("http://", adapter)
        self._session.mount("https://", adapter)
        self._object_info: Optional[dict] = None
        self._object_info_lock = threading.Lock()
        self._active: dict = {}  # prompt_id -> Event set when cancel() removed it from the queue
        self._active_lock = threading.Lock()
        self.spare_socket = spare_socket
        self._spare = None  # (client_id, WebSocket) opened ahead of the next run
        self._spare_lock = threading.Lock()
        self._spare_opening = False
        self._closed = False

    def __repr__(self):
        return f"ComfyClient({self.base_url!r})"

    def close(self):
        with self._spare_lock:
            self._closed = True
            spare, self._spare = self._spare, None
        if spare is not None:
            _close_ws(spare[1])
        self._session.close()

    def ws_url(self, client_id: str) -> str:
        parts = urlsplit(self.base_url)
        scheme = "wss" if parts.scheme == "https" else "ws"
        return f"{scheme}://{parts.netloc}{parts.path}/ws?clientId={quote(client_id)}"

    # ---------------------------------------------------------------- HTTP plumbing

    def _request(self, method: str, path: str, *, timeout=None, **kwargs) -> requests.Response:
        """One HTTP call; transport failures become ComfyUnreachable / ComfyTimeout."""
        url = self.base_url + path
        if timeout is None:
            timeout = (self.connect_timeout, self.read_timeout)
        try:
            return self._session.request(method, url, timeout=timeout, **kwargs)
        except requests.exceptions.ConnectTimeout as e:
            raise ComfyUnreachable(self.base_url, f"{method} {path}: no connection within "
                                                  f"{timeout[0]:g}s") from e
        except requests.exceptions.ReadTimeout as e:
            raise ComfyTimeout(timeout[1], f"ComfyUI at {self.base_url} did not answer {method} "
                                           f"{path} within {timeout[1]:g}s") from e
        except requests.exceptions.RequestException as e:
            raise ComfyUnreachable(self.base_url, f"{method} {path}: {_transport_reason(e)}") from e

    def _bad(self, resp: requests.Response, what: str) -> ComfyBadResponse:
        body = resp.text[:300] if resp.content else "<empty body>"
        return ComfyBadResponse(f"ComfyUI at {self.base_url} answered {what} with HTTP "
                                f"{resp.status_code}: {body}")

    def _json(self, resp: requests.Response, what: str):
        if resp.status_code != 200:
            raise self._bad(resp, what)
        try:
            return resp.json()
        except ValueError:
            raise ComfyBadResponse(f"ComfyUI at {self.base_url} answered {what} with a body that "
                                   f"is not JSON: {resp.text[:200]!r}") from None

    def _ok(self, resp: requests.Response, what: str) -> None:
        if resp.status_code != 200:
            raise self._bad(resp, what)

    # ---------------------------------------------------------------- one method per endpoint

    def upload_image(self, data: bytes, filename: str, *, subfolder: str = "", type: str = "input",
                     overwrite: bool = True) -> dict:
        """POST /upload/image, for servers that share no disk with us. Returns {"name","subfolder","type"}."""
        mime = mimetypes.guess_type(filename)[0] or "application/octet-stream"
        form = {"type": type, "subfolder": subfolder, "overwrite": "true" if overwrite else "false"}
        resp = self._request("POST", "/upload/image", files={"image": (filename, data, mime)}, data=form)
        result = self._json(resp, "POST /upload/image")
        log.info("uploaded %s (%d bytes) to ComfyUI as %s", filename, len(data), result.get("name"))
        return result

    def queue_prompt(self, prompt: dict, client_id: str, *, timeout=None) -> str:
        """POST /prompt; returns the prompt_id. A 400 becomes ComfyRejected with ComfyUI's dicts unchanged."""
        resp = self._request("POST", "/prompt", json={"prompt": prompt, "client_id": client_id},
                             timeout=timeout)
        if resp.status_code == 400:
            try:
                body = resp.json()
            except ValueError:
                body = None
            if isinstance(body, dict) and "error" in body:
                err = ComfyRejected(body["error"], body.get("node_errors", {}))
                log.warning("%s", err)
                raise err
        body = self._json(resp, "POST /prompt")
        if not isinstance(body, dict) or not body.get("prompt_id"):
            raise ComfyBadResponse(f"ComfyUI at {self.base_url} answered POST /prompt without a "
                                   f"prompt_id: {str(body)[:200]}")
        if body.get("node_errors"):
            # 200 with node_errors: ComfyUI runs only the outputs that validated.
            log.warning("ComfyUI queued prompt %s but some outputs failed validation: %s",
                        body["prompt_id"], body["node_errors"])
        log.info("queued prompt %s (client_id %s)", body["prompt_id"], client_id)
        return body["prompt_id"]

    def get_history(self, prompt_id: str, *, timeout=None) -> Optional[dict]:
        """GET /history/{id}: the entry, or None while ComfyUI has not written it."""
        body = self._json(self._request("GET", f"/history/{quote(prompt_id)}", timeout=timeout),
                          "GET /history")
        if not isinstance(body, dict):
            raise ComfyBadResponse(f"ComfyUI answered GET /history with {str(body)[:200]}")
        return body.get(prompt_id)

    def wait_for_history(self, prompt_id: str, timeout: float) -> dict:
        """Poll /history until the entry appears. 0.3.40 sends execution_success a few ms
        before it writes history, so absence right after success is normal."""
        deadline = time.monotonic() + timeout
        return self._poll_history(prompt_id, deadline, lambda: ComfyTimeout(
            timeout, f"ComfyUI wrote no /history entry for prompt {prompt_id} within {timeout:g}s"))

    @staticmethod
    def output_images(history_entry: dict) -> list:
        """Every output node's images, in node order."""
        return _outputs_to_images((history_entry or {}).get("outputs") or {})

    def view(self, image: OutputImage) -> bytes:
        """GET /view: the file's bytes."""
        params = {"filename": image.filename, "subfolder": image.subfolder, "type": image.type}
        resp = self._request("GET", "/view", params=params, stream=True)
        try:
            if resp.status_code == 404:
                raise ComfyBadResponse(f"ComfyUI at {self.base_url} has no {image.type} image "
                                       f"{image.subfolder + '/' if image.subfolder else ''}{image.filename}")
            self._ok(resp, "GET /view")
            # 1 MiB reads: requests' .content reads 10 KiB at a time, twice as slow for images
            return b"".join(resp.iter_content(1 << 20))
        except requests.RequestException as exc:
            raise ComfyUnreachable(self.base_url, _transport_reason(exc)) from None
        finally:
            resp.close()

    def get_queue(self, *, timeout=None) -> dict:
        return self._json(self._request("GET", "/queue", timeout=timeout), "GET /queue")

    def delete_from_queue(self, prompt_ids: list) -> None:
        self._ok(self._request("POST", "/queue", json={"delete": list(prompt_ids)}), "POST /queue")

    def interrupt(self, prompt_id: Optional[str] = None) -> None:
        """POST /interrupt. Global on 0.3.x; newer servers honour {"prompt_id"} and only stop that one."""
        kwargs = {"json": {"prompt_id": prompt_id}} if prompt_id else {}
        self._ok(self._request("POST", "/interrupt", **kwargs), "POST /interrupt")
        log.info("sent interrupt to ComfyUI%s", f" for prompt {prompt_id}" if prompt_id else "")

    def system_stats(self) -> dict:
        return self._json(self._request("GET", "/system_stats"), "GET /system_stats")

    def is_up(self) -> bool:
        """Quick health check; never raises."""
        try:
            resp = self._request("GET", "/system_stats",
                                 timeout=(self.connect_timeout, min(self.read_timeout, 5.0)))
            return resp.status_code == 200
        except Exception:  # noqa: BLE001 - a health check must not raise
            return False

    def object_info(self, refresh: bool = False) -> dict:
        """GET /object_info, cached (it is large and changes only when models are added)."""
        with self._object_info_lock:
            if self._object_info is None or refresh:
                self._object_info = self._json(self._request("GET", "/object_info"), "GET /object_info")
            return self._object_info

    def input_choices(self, class_type: str, input_name: str) -> list:
        """Enum values of one input (e.g. CheckpointLoaderSimple.ckpt_name). KeyError if unknown."""
        info = self.object_info().get(class_type)
        if info is None:
            raise KeyError(f"ComfyUI has no node class {class_type!r}")
        inputs = info.get("input") or {}
        for section in ("required", "optional"):
            spec = (inputs.get(section) or {}).get(input_name)
            if spec is None:
                continue
            kind = spec[0] if isinstance(spec, (list, tuple)) and spec else None
            if isinstance(kind, list):
                return list(kind)
            if kind == "COMBO" and len(spec) > 1:  # newer servers' combo format
                return list((spec[1] or {}).get("options") or [])
            raise KeyError(f"{class_type}.{input_name} is not a list input (type {kind!r})")
        raise KeyError(f"ComfyUI node {class_type!r} has no input {input_name!r}")

    # ---------------------------------------------------------------- cancel

    def cancel(self, prompt_id: str) -> str:
        """Stop one prompt: "removed" (was pending), "interrupted" (was running), or "not_found".

        /interrupt is global on 0.3.x, so it is only sent after /queue shows that *our* prompt is
        the running one (and carries {"prompt_id"} so newer servers can check it themselves).
        """
        queue = self.get_queue()
        if prompt_id in _queue_ids(queue, "queue_pending"):
            self.delete_from_queue([prompt_id])
            queue = self.get_queue()
            if prompt_id in _queue_ids(queue, "queue_pending"):
                raise ComfyBadResponse(f"ComfyUI at {self.base_url} kept prompt {prompt_id} "
                                       f"queued after POST /queue delete")
            if prompt_id not in _queue_ids(queue, "queue_running"):
                if self.get_history(prompt_id) is not None:
                    return "not_found"  # it ran and finished between our two reads
                log.info("removed pending prompt %s from the ComfyUI queue", prompt_id)
                with self._active_lock:
                    event = self._active.get(prompt_id)
                if event is not None:
                    event.set()
                return "removed"
            # it started running between our two reads: interrupt it below
        if prompt_id in _queue_ids(queue, "queue_running"):
            self.interrupt(prompt_id)
            return "interrupted"
        return "not_found"

    # ---------------------------------------------------------------- run

    def run(self, prompt: dict, *, timeout: float, on_progress: Optional[Callable] = None,
            on_queued: Optional[Callable] = None, cancel_on_timeout: bool = True) -> RunResult:
        """Queue `prompt` and wait for its outputs.

        The WebSocket is opened before queueing so a fast prompt cannot finish unseen; if it
        cannot connect or drops, /history is polled instead. `timeout` counts from this call;
        on timeout the prompt is cancelled (unless cancel_on_timeout=False) and ComfyTimeout raised.
        """
        deadline = time.monotonic() + timeout
        client_id, ws = self._take_spare()
        if ws is None:
            client_id = str(uuid.uuid4())
            ws = self._open_ws(client_id, deadline)
        prompt_id = None
        cancelled = threading.Event()
        try:
            prompt_id = self.queue_prompt(prompt, client_id, timeout=self._call_timeout(deadline))
            with self._active_lock:
                self._active[prompt_id] = cancelled
            _safe_call(on_queued, prompt_id)
            watch = PromptWatch(prompt_id)
            run = _Run(prompt_id, deadline, timeout, cancelled, watch, on_progress)
            source = "websocket"
            entry = announced = None
            if ws is not None:
                finished = self._wait_ws(ws, run)
                if finished and run.succeeded_at is not None and run.watch.outputs:
                    announced = run.watch.history_entry()  # the outputs /history will list
                elif finished:
                    entry = self._history_after_success(run)
                else:
                    run.lost_contact = True  # a prompt that vanishes now most likely died with ComfyUI
            if announced is not None:
                images = self.output_images(announced)
                log.info("prompt %s finished (websocket) with %d image(s)", prompt_id, len(images))
                return RunResult(prompt_id, images, None, source, load_history=lambda: self._history_later(run))
            if entry is None:
                source = "polling"
                entry = self._poll_history(prompt_id, deadline, run.timeout_error, run=run)
            raise_for_history(prompt_id, entry)
            images = self.output_images(entry)
            log.info("prompt %s finished (%s) with %d image(s)", prompt_id, source, len(images))
            return RunResult(prompt_id, images, entry, source)
        except ComfyTimeout:
            if prompt_id is not None and cancel_on_timeout:
                # in the background: the caller gets its ComfyTimeout on time even if ComfyUI is slow
                threading.Thread(target=self._cancel_quietly, args=(prompt_id,),
                                 name=f"comfy-cancel-{prompt_id[:8]}", daemon=True).start()
            raise
        finally:
            if prompt_id is not None:
                with self._active_lock:
                    self._active.pop(prompt_id, None)
            if ws is not None:
                self._after_run(ws)

    # ---------------------------------------------------------------- the spare WebSocket

    def _take_spare(self):
        """(client_id, ws) of the spare socket, emptied of what it collected while idle (queue
        broadcasts, the greeting), or (None, None) when there is none or it has died."""
        with self._spare_lock:
            spare, self._spare = self._spare, None
        if spare is None:
            return None, None
        if not _drain(spare[1]):
            _close_ws(spare[1])
            return None, None
        return spare

    def _after_run(self, ws) -> None:
        """Close a run's socket and open the next run's spare, in the background: the close
        handshake waits for ComfyUI's answer, and neither concerns the caller any more."""
        with self._spare_lock:
            open_spare = (self.spare_socket and not self._closed and self._spare is None
                          and not self._spare_opening)
            self._spare_opening = self._spare_opening or open_spare
        threading.Thread(target=self._close_and_replace, args=(ws, open_spare), name="comfy-spare-ws",
                         daemon=True).start()

    def _close_and_replace(self, ws, open_spare: bool) -> None:
        _close_ws(ws)
        if not open_spare:
            return
        client_id, ws = str(uuid.uuid4()), None
        try:
            ws = _connect_ws(self.ws_url(client_id), self.connect_timeout)
        except Exception as e:  # noqa: BLE001 - the next run opens its own socket and reports
            log.debug("could not open a spare ComfyUI WebSocket: %s", e)
        finally:
            with self._spare_lock:
                self._spare_opening = False
                if ws is not None and not self._closed and self._spare is None:
                    self._spare, ws = (client_id, ws), None
        if ws is not None:
            _close_ws(ws)

    def _call_timeout(self, deadline: float):
        remaining = max(0.05, deadline - time.monotonic())
        return (min(self.connect_timeout, remaining), min(self.read_timeout, remaining))

    def _poll_timeout(self, deadline: float):
        """Timeouts of the small GETs of a wait: a server that cannot answer them within
        unreachable_grace is as good as gone, so none may block longer than that."""
        cap = max(self.unreachable_grace, 0.5)
        connect, read = self._call_timeout(deadline)
        return (min(connect, cap), min(read, cap))

    def _open_ws(self, client_id: str, deadline: float):
        url = self.ws_url(client_id)
        try:
            return _connect_ws(url, max(0.05, min(self.connect_timeout, deadline - time.monotonic())))
        except (websocket.WebSocketException, OSError) as e:
            log.warning("cannot open ComfyUI WebSocket %s (%s); will poll /history instead", url, e)
            return None

    def _wait_ws(self, ws, run: "_Run") -> bool:
        """Read frames until our prompt finishes (True) or the socket fails (False)."""
        next_liveness = time.monotonic() + self.liveness_interval
        while True:
            now = time.monotonic()
            if now >= run.deadline:
                raise run.timeout_error()
            run.raise_if_cancelled()
            if now >= next_liveness:
                # Nothing about our prompt for a while: was it deleted by someone else?
                if self._check_liveness(run) == "finished":
                    return True  # finished without our seeing the signal; history says how
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
            raise ComfyBadResponse(f"ComfyUI at {self.base_url} reported prompt {run.prompt_id} "
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
                entry = self.get_history(prompt_id, timeout=self._poll_timeout(deadline))
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
                    raise ComfyUnreachable(self.base_url, message=(
                        f"lost contact with ComfyUI at {self.base_url} while waiting for prompt "
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
            queue = self.get_queue(timeout=timeout)
            if run.prompt_id in _queue_ids(queue, "queue_running") | _queue_ids(queue, "queue_pending"):
                return "queued"
            if self.get_history(run.prompt_id, timeout=timeout) is not None:
                return "finished"
        except _TRANSIENT as e:
            log.debug("liveness check of prompt %s failed: %s", run.prompt_id, e)
            return "unknown"
        raise run.vanished_error(self.base_url)

    def _cancel_quietly(self, prompt_id: str) -> None:
        try:
            outcome = self.cancel(prompt_id)
            log.info("timed-out prompt %s: cancel -> %s", prompt_id, outcome)
        except ComfyError as e:
            log.warning("could not cancel timed-out prompt %s: %s", prompt_id, e)


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


_TRANSIENT = (ComfyUnreachable, ComfyBadResponse, ComfyTimeout)  # HTTP failures worth retrying in a run


def _queue_ids(queue: dict, key: str) -> set:
    """Prompt ids in /queue's queue_running or queue_pending ([number, prompt_id, ...] items)."""
    return {item[1] for item in (queue or {}).get(key) or [] if isinstance(item, list) and len(item) > 1}


def _transport_reason(exc: Exception) -> str:
    text = str(exc)
    for needle, reason in (("Connection refused", "connection refused"),
                           ("NameResolutionError", "DNS lookup failed"),
                           ("Name or service not known", "DNS lookup failed"),
                           ("nodename nor servname", "DNS lookup failed"),
                           ("Temporary failure in name resolution", "DNS lookup failed"),
                           ("Connection reset", "connection reset"),
                           ("RemoteDisconnected", "connection closed by ComfyUI"),
                           ("Connection aborted", "connection aborted")):
        if needle in text:
            return reason
    return f"{type(exc).__name__}: {text[:200]}"


def _safe_call(callback, arg) -> None:
    """Callbacks report to the caller; a bug in one must not abort the generation."""
    if callback is None:
        return
    try:
        callback(arg)
    except Exception:  # noqa: BLE001
        log.exception("ComfyClient callback %r raised", callback)


def _connect_ws(url: str, timeout: float):
    # Text frames are decoded with errors="replace" (see _wait_ws): websocket-client's own UTF-8
    # check, in pure Python, would cost ~70 us per frame for nothing.
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


def _close_ws(ws) -> None:
    try:
        ws.close(timeout=0.5)
    except Exception:  # noqa: BLE001 - closing a broken socket may fail; nothing to do about it
        pass
