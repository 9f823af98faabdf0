"""Errors that carry their HTTP status and a stable code; turned into JSON in one place."""
from __future__ import annotations


class ApiError(Exception):
    """A failure the client should see as ``{"status":"error","code":...,"message":...}``."""

    status = 400
    code = "bad_request"

    def __init__(self, message: str, *, code: str | None = None, status: int | None = None, **details):
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        if status is not None:
            self.status = status
        self.details = details

    def to_dict(self) -> dict:
        body = {"status": "error", "code": self.code, "message": self.message}
        body.update(self.details)
        return body


class BadRequest(ApiError):
    status = 400


class InvalidParameter(ApiError):
    """A generation parameter has the wrong type or is out of range."""

    status = 400
    code = "invalid_parameter"

    def __init__(self, field: str, message: str, *, code: str | None = None, **details):
        super().__init__(message, code=code, field=field, **details)


class PayloadTooLarge(ApiError):
    status = 413
    code = "request_too_large"


class UnsupportedMediaType(ApiError):
    status = 415
    code = "unsupported_media_type"
