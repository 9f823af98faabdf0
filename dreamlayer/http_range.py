"""Range requests for the images both services serve."""
from __future__ import annotations


def ignore_unusable_range(request) -> None:
    """Drop a Range header Werkzeug could only answer with 416 although nothing is wrong with
    the image: another unit, a malformed set, or several ranges (Werkzeug serves one). RFC 9110
    (14.2) has a server ignore those and send the whole image; a well-formed single range past
    the end stays a 416."""
    if "HTTP_RANGE" in request.environ:
        asked = request.range
        if asked is None or asked.units != "bytes" or len(asked.ranges) != 1:
            del request.environ["HTTP_RANGE"]
