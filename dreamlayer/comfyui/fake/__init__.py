"""A faithful fake of a ComfyUI 0.3.40 server for the tests (real HTTP + WebSocket on loopback)."""
from .fake import FakeComfyUI

__all__ = ["FakeComfyUI"]
