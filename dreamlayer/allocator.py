"""glibc's malloc, set for a server whose requests each allocate a few large buffers.

Why: a 512×512 request with a mask allocates a dozen buffers of 0.1–1 MB (the JSON body, the
decoded upload, its inflated rows, the PNG files for ComfyUI). With glibc's defaults each waitress
thread gets an arena of its own, and when a request frees its buffers the arena's free top is
above the (dynamic, about 2× the largest buffer) trim threshold, so glibc hands the pages back to
the kernel — and the next request takes a page fault on every 4 KiB it touches again: about 3 ms
of a 512² request with a mask on the benchmark's machine, and a larger resident set (one arena
per thread). So the service's process keeps one arena (Python allocates under the GIL anyway),
serves buffers up to 4 MiB from it and keeps up to 32 MiB of freed memory for the next request
(docs/performance.md, item 27). Larger buffers (a 4096² upload) are still mapped and unmapped
one by one, as glibc does by default.

Linux with glibc only; elsewhere (macOS, Windows, musl) nothing is changed. A user who tunes
malloc with glibc's own variables (``GLIBC_TUNABLES`` with ``glibc.malloc.*``, ``MALLOC_ARENA_MAX``,
``MALLOC_MMAP_THRESHOLD_``…) keeps them: then nothing is changed either.
"""
from __future__ import annotations

import ctypes
import logging
import os
from typing import Mapping

log = logging.getLogger(__name__)

# mallopt(3) parameters (malloc.h)
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
M_ARENA_MAX = -8

MIB = 1024 * 1024
#: (parameter, name, value) applied in this order
SETTINGS = (
    (M_ARENA_MAX, "arena_max", 1),
    (M_MMAP_THRESHOLD, "mmap_threshold", 4 * MIB),
    (M_TRIM_THRESHOLD, "trim_threshold", 32 * MIB),
)

#: glibc's own environment variables for malloc; any of them set means the user decides
GLIBC_MALLOC_VARIABLES = ("MALLOC_ARENA_MAX", "MALLOC_ARENA_TEST", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_",
                          "MALLOC_TOP_PAD_", "MALLOC_MMAP_MAX_")


def user_tuned(environ: Mapping[str, str]) -> bool:
    """Whether the environment already tunes glibc's malloc."""
    return "glibc.malloc." in environ.get("GLIBC_TUNABLES", "") or any(v in environ for v in GLIBC_MALLOC_VARIABLES)


def glibc_mallopt():
    """glibc's ``mallopt``, or None where the C library is not glibc."""
    try:
        if not os.confstr("CS_GNU_LIBC_VERSION"):
            return None
        return ctypes.CDLL(None).mallopt
    except (AttributeError, ValueError, OSError):  # no confstr name (macOS, Windows), no such symbol
        return None


def tune_for_requests(environ: Mapping[str, str]) -> dict:
    """Apply SETTINGS (before the server's threads start) unless ``environ`` (the process's
    environment, as ``Environment.snapshot()`` gives it) tunes malloc; returns what was applied."""
    if user_tuned(environ):
        log.debug("malloc: left as the environment sets it")
        return {}
    mallopt = glibc_mallopt()
    if mallopt is None:
        return {}
    applied = {}
    for param, name, value in SETTINGS:
        if mallopt(ctypes.c_int(param), ctypes.c_int(value)) == 1:
            applied[name] = value
        else:
            log.warning("malloc: glibc refused %s=%d; left as it was", name, value)
    log.debug("malloc: %s", applied)
    return applied
