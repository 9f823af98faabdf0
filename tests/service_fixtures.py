"""Fixtures for tests of the img2img service: the real Flask app, on a real port where it matters,
talking to the fake ComfyUI over real sockets."""
from __future__ import annotations

import random
import socket
import threading

import pytest
from waitress.server import create_server

from dreamlayer.config.img2img import Config
from dreamlayer.img2img.app import create_app


def free_port() -> int:
    """A port that is free now, chosen below Linux's ephemeral range (32768+) so that the
    outgoing connections of concurrent tests cannot take it before the server binds it."""
    for _ in range(200):
        port = random.randint(20000, 32000)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port found")


@pytest.fixture
def service_config(fake_comfy, tmp_path):
    """Shares ComfyUI's input folder (as with COMFYUI_DIR); tests may .replace() it."""
    port = free_port()
    return Config(comfy_api_url=fake_comfy.url, comfyui_input_dir=fake_comfy.input_dir,
                  served_images_dir=tmp_path / "served", public_base_url=f"http://127.0.0.1:{port}",
                  port=port, comfy_timeout_s=20, cors_origins=("http://localhost:8080",))


@pytest.fixture
def app(service_config):
    return create_app(service_config)


@pytest.fixture
def client(app):
    return app.test_client()


class LiveServer:
    """The app served by waitress (the production server) on the config's port, in a thread."""

    def __init__(self, app, port: int):
        self.app = app
        self.server = create_server(app, host="127.0.0.1", port=port, threads=24)
        self.url = f"http://127.0.0.1:{port}"
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def start(self):
        self.thread.start()
        return self

    def stop(self):
        """Close every connection and the listener from waitress's own loop thread (closing them
        from here races its select()), then end its worker threads."""
        def close_all():
            for channel in list(self.server._map.values()):
                if channel is not self.server.trigger:
                    channel.close()
            self.server.trigger.close()

        self.server.trigger.pull_trigger(close_all)
        self.thread.join(timeout=5)
        self.server.task_dispatcher.shutdown(timeout=5)


@pytest.fixture
def live_server(app, service_config):
    server = LiveServer(app, service_config.port).start()
    yield server
    server.stop()
