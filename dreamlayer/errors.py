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


#: Stable codes for the HTTP errors Flask/Werkzeug raise themselves.
HTTP_CODES = {400: "bad_request", 401: "unauthorized", 404: "not_found", 405: "method_not_allowed",
              413: "request_too_large", 415: "unsupported_content_type"}


def error_response(status: int, code: str, message: str, **details):
    """The one JSON error shape of both services."""
    from flask import jsonify

    return jsonify({"status": "error", "code": code, "message": message, **details}), status


def register_error_handlers(app) -> None:
    """Turn every exception into the JSON error shape: ApiError and ComfyUI errors with their own
    status and code, Werkzeug's HTTP errors with a stable code, anything else a logged 500."""
    import logging

    from flask import request
    from werkzeug.exceptions import HTTPException

    from dreamlayer.comfyui.errors import ComfyError

    log = logging.getLogger(app.import_name)

    @app.errorhandler(ApiError)
    def api_error(exc: ApiError):
        response, status = error_response(exc.status, exc.code, exc.message, **exc.details)
        if "retry_after" in exc.details:  # seconds (RFC 9110's Retry-After)
            response.headers["Retry-After"] = str(exc.details["retry_after"])
        return response, status

    @app.errorhandler(ComfyError)
    def comfy_error(exc: ComfyError):
        log.warning("ComfyUI error (%s): %s", exc.code, exc)
        return error_response(exc.status, exc.code, str(exc), **exc.details())

    @app.errorhandler(HTTPException)
    def http_error(exc: HTTPException):
        message = exc.description or exc.name
        if exc.code == 413:
            message = too_large_message(app, request)
        return error_response(exc.code or 500, HTTP_CODES.get(exc.code, "http_error"), message)

    @app.errorhandler(Exception)
    def unexpected(exc: Exception):
        log.exception("unexpected error while handling %s %s", request.method, request.path)
        return error_response(500, "internal_error", "The service failed unexpectedly; see its log")


def too_large_message(app, request) -> str:
    """Werkzeug answers 413 for a body over MAX_CONTENT_LENGTH and for a multipart body with too
    many parts or too large a text field: say which, as far as the request tells."""
    limit = app.config.get("MAX_CONTENT_LENGTH")
    length = request.content_length
    if limit is not None and length is not None and length > limit:
        return f"The request is {length} bytes; this service accepts at most {limit} bytes"
    parts = app.config.get("MAX_FORM_PARTS") or 1000
    size = f"larger than {limit} bytes, or " if limit is not None else ""
    return (f"The request is too large: {size}a multipart body with more than {parts} parts or a text "
            f"field over {app.config.get('MAX_FORM_MEMORY_SIZE') or 500_000} bytes")
