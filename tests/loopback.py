"""Small pieces for tests that play a server by hand on a loopback socket."""
from __future__ import annotations


def read_request(conn) -> bool:
    """Read one HTTP request's head from ``conn``; False if the client closed before its end."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = conn.recv(65536)
        if not chunk:
            return False
        data += chunk
    return True
