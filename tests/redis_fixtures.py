"""A real Redis server for the tests of REDIS_URL (never a mock, never fakeredis).

Each test that asks for ``redis_server`` gets its own redis-server process listening only on a
Unix socket inside a temporary folder of its own (short: a socket path has at most 107
characters, a pytest tmp_path can be longer): the test owns that socket (no port can be taken
by anyone else), nothing is shared between tests, and the server can be stopped and started
again on the same address (the Redis-restart tests), keeping its data (append-only file).

redis-server comes from the system (Debian: ``apt install redis-server``; .ci/run installs it).
Without it these tests are skipped with that hint — except under CI (CI=true), where a missing
server is a failure: the Redis tests must run there.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest
import redis

from waiting import wait_until

REDIS_SERVER = shutil.which("redis-server")


class RedisServer:
    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.socket = self.folder / "redis.sock"
        self.url = f"unix://{self.socket}"
        self.proc = None

    def start(self) -> "RedisServer":
        self.proc = subprocess.Popen(
            [REDIS_SERVER, "--port", "0", "--unixsocket", str(self.socket), "--unixsocketperm", "700",
             "--dir", str(self.folder), "--appendonly", "yes", "--appendfsync", "always", "--save", "",
             "--logfile", str(self.folder / "redis.log")],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_until(self.answers, what=f"redis-server to answer on {self.socket}")
        return self

    def answers(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise AssertionError(f"redis-server exited with {self.proc.returncode}: "
                                 f"{(self.folder / 'redis.log').read_text(errors='replace')[-2000:]}")
        try:
            with redis.Redis(unix_socket_path=str(self.socket), socket_timeout=1) as client:
                return client.ping()
        except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError):
            return False

    def client(self) -> redis.Redis:
        return redis.Redis(unix_socket_path=str(self.socket), socket_timeout=5)

    def stop(self) -> None:
        """Shut down cleanly (the append-only file keeps every write)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(30)
        self.proc = None

    def restart(self) -> "RedisServer":
        self.stop()
        return self.start()


def need_redis_server() -> None:
    if REDIS_SERVER is None:
        message = "redis-server is not installed (Debian: apt install redis-server; .ci/run installs it)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)


@pytest.fixture
def redis_server():
    need_redis_server()
    folder = Path(tempfile.mkdtemp(prefix="dl-redis-"))
    server = RedisServer(folder).start()
    yield server
    server.stop()
    shutil.rmtree(folder, ignore_errors=True)
