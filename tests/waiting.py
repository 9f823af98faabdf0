"""The one way tests wait for something another thread or process does: poll a condition until it
holds, with a deadline, and fail with a message that names what never happened.

Never sleep a fixed time to "let something happen": under load it is too short, when idle too long.
The timeout is only an upper bound (a passing test never waits for it), so it is generous.
"""
from __future__ import annotations

import time
from typing import Callable, TypeVar

T = TypeVar("T")

#: Upper bound for awaiting a condition; generous because a passing test never reaches it.
TIMEOUT = 30.0


def wait_until(predicate: Callable[[], T], timeout: float = TIMEOUT, what: str = "the condition",
               interval: float = 0.01) -> T:
    """Call ``predicate`` until it returns something truthy, and return that. After ``timeout``
    seconds, fail with ``what`` (and the last value seen)."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what} (last value: {value!r})")
        time.sleep(interval)
