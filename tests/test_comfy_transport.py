"""How the client names a failed connection: real failures over real loopback sockets (a port nobody
listens on, servers that close, reset, answer garbage or never answer), classified by the exception
types requests and urllib3 raise, not by their messages."""
import socket
import struct
import threading
from contextlib import contextmanager

import pytest
import requests

from dreamlayer.comfyui.client import ComfyClient, ComfyTimeout, ComfyUnreachable, OutputImage
from dreamlayer.comfyui.http import _transport_reason
from loopback import read_request

WAIT = 10  # upper bound for awaiting the server thread; never a sleep


def _reset(conn) -> None:
    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # close() sends RST


@contextmanager
def server(answer):
    """A loopback server for one connection: it reads one request, then ``answer(conn, done)``;
    the connection is closed when answer returns. Yields the server's base URL."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(WAIT)
    done = threading.Event()

    def serve():
        try:
            conn, _ = listener.accept()
        except OSError:
            return
        with conn:
            read_request(conn)
            answer(conn, done)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}"
    finally:
        done.set()
        listener.close()
        thread.join(WAIT)


@contextmanager
def nobody_listening():
    """A port bound but not listening: connecting is refused, and no one else can take the port."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        yield f"http://127.0.0.1:{s.getsockname()[1]}"


def closes(conn, done):
    pass


def resets(conn, done):
    _reset(conn)


def answers_garbage(conn, done):
    conn.sendall(b"garbage\r\n\r\n")


def never_answers(conn, done):
    done.wait(WAIT)


def sends_half_a_body(conn, done):
    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: image/png\r\nContent-Length: 100\r\n\r\n" + b"x" * 10)


def sends_half_a_body_then_resets(conn, done):
    sends_half_a_body(conn, done)
    _reset(conn)


def failure(url):
    """The exception requests raises for a GET of ``url``."""
    with pytest.raises(requests.RequestException) as info:
        requests.get(url + "/system_stats", timeout=WAIT)
    return info.value


def test_refused():
    with nobody_listening() as url:
        assert _transport_reason(failure(url)) == "connection refused"


def test_dns_failure():
    assert _transport_reason(failure("http://comfyui.invalid:8188")) == "DNS lookup failed"


@pytest.mark.parametrize("answer,reason", [
    (closes, "connection closed by ComfyUI"),
    (resets, "connection reset"),
    (answers_garbage, "connection aborted"),
])
def test_server_that_breaks_the_request(answer, reason):
    with server(answer) as url:
        assert _transport_reason(failure(url)) == reason


def test_an_unknown_failure_is_named_by_its_type():
    with pytest.raises(requests.RequestException) as info:
        requests.get("http://[::1", timeout=WAIT)  # not a URL: requests refuses before connecting
    reason = _transport_reason(info.value)
    assert reason.startswith(type(info.value).__name__ + ": ") and len(reason) < 250


def test_a_server_that_never_answers_is_unreachable_not_slow():
    """Connected, and no answer in all the time a call gets: a hung server (503, a backend to
    leave out), not a generation that took too long (504)."""
    with server(never_answers) as url:
        c = ComfyClient(url, read_timeout=0.2)
        with pytest.raises(ComfyUnreachable) as info:
            c.system_stats()
        c.close()
    assert "GET /system_stats" in str(info.value) and "no answer within 0.2s" in str(info.value)


def test_a_call_cut_short_by_the_runs_deadline_is_a_timeout():
    with server(never_answers) as url:
        c = ComfyClient(url, read_timeout=5)
        with pytest.raises(ComfyTimeout) as info:
            c.http.get_queue(timeout=(1, 0.2))
        c.close()
    assert info.value.timeout == 0.2


@pytest.mark.parametrize("answer,reason", [
    (sends_half_a_body_then_resets, "connection reset"),
    (sends_half_a_body, "ChunkedEncodingError: "),  # no socket error: the body just ends early
])
def test_a_download_that_breaks_off(answer, reason):
    with server(answer) as url:
        c = ComfyClient(url)
        with pytest.raises(ComfyUnreachable) as info:
            c.view(OutputImage("9", "out.png", "", "output"))
        c.close()
    assert info.value.reason.startswith(reason), info.value.reason


def test_proxy_settings_come_from_the_environment_once(monkeypatch):
    """HTTP_PROXY / NO_PROXY are honoured as requests would, but read when the client is made,
    not scanned again on every call."""
    from dreamlayer.comfyui.http import ComfyHttp
    monkeypatch.setenv("HTTP_PROXY", "http://proxy.example:3128")
    monkeypatch.setenv("NO_PROXY", "")
    far = ComfyHttp("http://comfy.example:8188", connect_timeout=1, read_timeout=1, pool_size=1)
    assert far._session.proxies.get("http") == "http://proxy.example:3128" and far._session.trust_env is False
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    near = ComfyHttp("http://127.0.0.1:8188", connect_timeout=1, read_timeout=1, pool_size=1)
    assert "http" not in near._session.proxies
    monkeypatch.setenv("HTTP_PROXY", "http://other.example:1")  # read once: a later change is not seen
    assert far._session.proxies.get("http") == "http://proxy.example:3128"
