"""Served images kept in Redis (REDIS_URL), so that every replica serves what any worker made.

Each image is one key that expires with the job TTL (IMG2IMG_JOB_TTL_S): a result is readable for
as long as its job is. Same interface as img2img.staging.ServedImages.
"""
from __future__ import annotations

from dreamlayer.img2img.staging import SAFE_NAME
from dreamlayer.jobs.records import PREFIX, patiently, queue_errors


class RedisImages:
    def __init__(self, client, url: str, ttl_s: float, prefix: str = PREFIX):
        self.redis = client
        self.url = url
        self.ttl_s = ttl_s
        self.prefix = prefix

    def _key(self, name: str) -> str:
        return f"{self.prefix}image:{name}"

    def save(self, name: str, data: bytes) -> str:
        """Written by a queue worker; waits out a short Redis outage rather than lose the image."""
        patiently(lambda: self.redis.set(self._key(name), data, px=max(1, int(self.ttl_s * 1000))),
                  what=f"image {name}")
        return name

    def remove(self, name: str) -> None:
        self.redis.delete(self._key(name))

    def lookup(self, name: str) -> bytes | None:
        """The image's bytes, or None (the same names as on disk are valid)."""
        if not isinstance(name, str) or not SAFE_NAME.match(name) or name.startswith(".tmp-"):
            return None
        with queue_errors(self.url):
            return self.redis.get(self._key(name))
