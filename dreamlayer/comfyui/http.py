"""ComfyUI's HTTP API: one small method per endpoint, as in ComfyUI's
script_examples/websockets_api_example.py, over one pooled requests.Session. Transport failures and
answers this client does not understand become ComfyErrors naming the server and the call."""
from __future__ import annotations

import http.client
import logging
import mimetypes
import socket
import threading
from concurrent.futures import Future
from typing import Optional
from urllib.parse import quote

import requests
import urllib3

from dreamlayer.comfyui.errors import ComfyBadResponse, ComfyRejected, ComfyTimeout, ComfyUnreachable
from dreamlayer.comfyui.protocol import OutputImage

log = logging.getLogger(__name__)


class ComfyHttp:
    """The endpoints of one ComfyUI server; thread-safe (the session's pool has pool_size
    connections, the /object_info cache is behind a lock)."""

    def __init__(self, base_url: str, *, connect_timeout: float, read_timeout: float, pool_size: int):
        self.base_url = base_url
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self._session = requests.Session()
        adapter = requests.adapters.HTTPAdapter(pool_connections=4, pool_maxsize=pool_size)
        self._session.mount("http://", adapter)
        self._session.mount("https://", adapter)
        # The proxy and CA settings requests takes from the environment (HTTP_PROXY, NO_PROXY,
        # REQUESTS_CA_BUNDLE, ...), worked out once for this server instead of on every call:
        # scanning the environment cost each call 0.3 ms.
        settings = self._session.merge_environment_settings(base_url, {}, None, None, None)
        self._session.trust_env = False
        self._session.proxies = settings["proxies"]
        self._session.verify = settings["verify"]
        self._session.cert = settings["cert"]
        self._object_info: Optional[dict] = None
        self._object_info_lock = threading.Lock()
        self._object_info_flight: Optional[Future] = None  # the fetch in progress, shared

    def close(self) -> None:
        self._session.close()

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
            if timeout[1] >= self.read_timeout:  # no answer in all the time a call gets: hung
                raise ComfyUnreachable(self.base_url, f"{method} {path}: connected, but no answer within "
                                                      f"{timeout[1]:g}s (the server hangs)") from e
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

    def upload_image(self, data: bytes, filename: str, *, subfolder: str = "", type: str = "input",
                     overwrite: bool = True, quiet: bool = False) -> dict:
        """POST /upload/image, for servers that share no disk with us. Returns {"name","subfolder","type"}.
        ``quiet``: logged at DEBUG (an ended run's upload made small)."""
        mime = mimetypes.guess_type(filename)[0] or "application/octet-stream"
        form = {"type": type, "subfolder": subfolder, "overwrite": "true" if overwrite else "false"}
        resp = self._request("POST", "/upload/image", files={"image": (filename, data, mime)}, data=form)
        result = self._json(resp, "POST /upload/image")
        log.log(logging.DEBUG if quiet else logging.INFO, "uploaded %s (%d bytes) to ComfyUI as %s", filename,
                len(data), result.get("name"))
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

    def has_file(self, filename: str, *, subfolder: str = "", type: str = "output") -> bool:
        """HEAD /view (ComfyUI's GET routes answer HEAD too): whether the file is there."""
        params = {"filename": filename, "subfolder": subfolder, "type": type}
        resp = self._request("HEAD", "/view", params=params)
        if resp.status_code == 404:
            return False
        self._ok(resp, "HEAD /view")
        return True

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

    def delete_from_queue(self, prompt_ids: list, *, timeout=None) -> None:
        self._ok(self._request("POST", "/queue", json={"delete": list(prompt_ids)}, timeout=timeout),
                 "POST /queue")

    def interrupt(self, prompt_id: Optional[str] = None, *, timeout=None) -> None:
        """POST /interrupt. Global on 0.3.x; newer servers honour {"prompt_id"} and only stop that one."""
        kwargs = {"json": {"prompt_id": prompt_id}} if prompt_id else {}
        self._ok(self._request("POST", "/interrupt", timeout=timeout, **kwargs), "POST /interrupt")
        log.info("sent interrupt to ComfyUI%s", f" for prompt {prompt_id}" if prompt_id else "")

    def system_stats(self) -> dict:
        return self._json(self._request("GET", "/system_stats"), "GET /system_stats")

    def is_up(self) -> bool:
        """Quick health check; never raises."""
        try:
            resp = self._request("GET", "/system_stats",
                                 timeout=(self.connect_timeout, min(self.read_timeout, 3.0)))
            # ComfyUI's own answer, not any web server's 200 (a page at that address)
            return resp.status_code == 200 and isinstance(body := resp.json(), dict) and "system" in body
        except Exception:  # noqa: BLE001 - a health check must not raise
            return False

    def object_info(self, refresh: bool = False) -> dict:
        """GET /object_info, cached (it is large and changes only when models are added). One
        fetch at a time, shared: callers that come while it runs get its answer (or its error),
        instead of each waiting for a ComfyUI that does not answer in turn."""
        with self._object_info_lock:
            if self._object_info is not None and not refresh:
                return self._object_info
            flight, leader = self._object_info_flight, self._object_info_flight is None
            if leader:
                flight = self._object_info_flight = Future()
        if not leader:
            return flight.result()
        try:
            info = self._json(self._request("GET", "/object_info"), "GET /object_info")
            if not isinstance(info, dict) or not all(isinstance(node, dict) for node in info.values()):
                raise ComfyBadResponse(f"ComfyUI at {self.base_url} answered GET /object_info with JSON that is not "
                                       "an object of node classes")
        except BaseException as exc:
            with self._object_info_lock:
                self._object_info_flight = None
            flight.set_exception(exc)
            raise
        with self._object_info_lock:
            self._object_info, self._object_info_flight = info, None
        flight.set_result(info)
        return info


def _causes(exc: BaseException):
    """``exc`` and every exception it was raised from or wraps: requests and urllib3 keep the
    socket's own error as __cause__ / __context__, or in args (ProtocolError, MaxRetryError)."""
    seen, todo = set(), [exc]
    while todo:
        e = todo.pop(0)
        if id(e) not in seen:
            seen.add(id(e))
            yield e
            todo += [x for x in (e.__cause__, e.__context__, *e.args) if isinstance(x, BaseException)]


#: Why a connection failed, by the socket's own error somewhere in the chain; the first match wins.
#: RemoteDisconnected (the server closed without answering) is a ConnectionResetError: it comes first.
_REASONS = (
    (ConnectionRefusedError, "connection refused"),
    (socket.gaierror, "DNS lookup failed"),
    (http.client.RemoteDisconnected, "connection closed by ComfyUI"),
    (ConnectionResetError, "connection reset"),
)


def _transport_reason(exc: Exception) -> str:
    """A short reason for a failed HTTP call, for ComfyUnreachable's message."""
    causes = list(_causes(exc))
    for types, reason in _REASONS:
        if any(isinstance(e, types) for e in causes):
            return reason
    if isinstance(exc, requests.exceptions.ConnectionError) and any(
            isinstance(e, urllib3.exceptions.ProtocolError) for e in causes):
        return "connection aborted"  # urllib3's "Connection aborted.": the request broke after it was sent
    return f"{type(exc).__name__}: {str(exc)[:200]}"
