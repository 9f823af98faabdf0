"""What both services do about browsers: a web page may change state only from CORS_ORIGINS,
and no answer is content-sniffed.

CORS keeps other sites from *reading* answers, not from sending: a page anywhere can make its
visitor's browser POST a form (multipart, text/plain) to 127.0.0.1 without a preflight — start
a generation, interrupt one, write into ComfyUI's folders. Browsers send ``Origin`` with every
such request (and with a DNS-rebound site's own requests), so refusing a foreign one stops
both; clients that are not web pages (curl, scripts) send none and are not affected.
"""
from __future__ import annotations

from flask import request

from dreamlayer.errors import ApiError

SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


class OriginNotAllowed(ApiError):
    status = 403
    code = "origin_not_allowed"


def only_from_allowed_origins(allowed):
    """A before_request function refusing state-changing requests from other origins.
    ``allowed``: canonical origins (config/env.py) or "*"."""
    allowed = frozenset(allowed)

    def check_origin():
        if request.method in SAFE_METHODS or "*" in allowed:
            return None
        origin = request.headers.get("Origin")
        if origin is not None and origin not in allowed:
            raise OriginNotAllowed(f"Requests from the page at {origin[:200]!r} are not allowed: add its origin "
                                   "to CORS_ORIGINS to let it use this service")
        return None
    return check_origin


def no_sniffing(response):
    """after_request: browsers take each answer for its Content-Type, never for what its bytes
    look like (an image or JSON read as HTML)."""
    response.headers.setdefault("X-Content-Type-Options", "nosniff")
    return response
