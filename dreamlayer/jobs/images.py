"""Served images kept in Redis (REDIS_URL), so that every replica serves what any worker made.

Each image is one key that expires with the job TTL (IMG2IMG_JOB_TTL_S): a result is readable for
as long as its job is. Same interface as img2img.staging.ServedImages.
"""
from __future__ import annotations

import threading
from contextlib import contextmanager
from pathlib import Path

from dreamlayer.img2img.staging import SAFE_NAME
from dreamlayer.jobs.records import PREFIX, patiently, queue_errors


class RedisImages:
    def __init__(self, client, url: str, ttl_s: float, prefix: str = PREFIX):
        self.redis = client
        self.url = url
        self.ttl_s = ttl_s
        self.prefix = prefix
        self._holding = threading.local()

    def _key(self, name: str) -> str:
        return f"{self.prefix}image:{name}"

    def save(self, name: str, data: bytes) -> str:
        """Written by a queue worker; waits out a short Redis outage rather than lose the image.
        Within holding(), kept until the job's end is written, in the same round trip."""
        held = getattr(self._holding, "images", None)
        if held is not None:
            held[name] = data
            return name
        patiently(lambda: self._set(self.redis, name, data), what=f"image {name}")
        return name

    def save_file(self, name: str, source) -> str:
        """ComfyUI's output file (a shared output folder), kept as save() keeps bytes."""
        return self.save(name, Path(source).read_bytes())

    def _set(self, client, name: str, data: bytes):
        return client.set(self._key(name), data, px=max(1, int(self.ttl_s * 1000)))

    def remove(self, name: str) -> None:
        held = getattr(self._holding, "images", None)
        if held is not None and held.pop(name, None) is not None:
            return
        self.redis.delete(self._key(name))

    @contextmanager
    def holding(self):
        """The images this thread saves meanwhile, as a dict the caller writes with a pipeline of
        its own (write_held: the job's end and its images in one round trip) and empties; what is
        left when the block ends normally is written then."""
        held: dict = {}
        self._holding.images = held
        try:
            yield held
        finally:
            self._holding.images = None
        for name, data in held.items():  # not when the run failed to record its end: it is run again
            patiently(lambda: self._set(self.redis, name, data), what=f"image {name}")

    def write_held(self, pipe, held: dict) -> None:
        """Queue the held images on ``pipe`` (run it, then empty ``held``)."""
        for name, data in held.items():
            self._set(pipe, name, data)

    def lookup(self, name: str) -> bytes | None:
        """The image's bytes, or None (the same names as on disk are valid)."""
        if not isinstance(name, str) or not SAFE_NAME.match(name) or name.startswith(".tmp-"):
            return None
        with queue_errors(self.url):
            return self.redis.get(self._key(name))
