"""The errors of the ComfyUI client. Each carries the HTTP status the service answers with and a
stable code (docs/troubleshooting.md lists them), so the service can hand any of them to its client
as they are."""
from __future__ import annotations

from typing import Optional

__all__ = ["ComfyError", "ComfyUnreachable", "ComfyRejected", "ComfyExecutionFailed", "ComfyInterrupted",
           "ComfyTimeout", "ComfyBadResponse"]


class ComfyError(Exception):
    """Base of every error this client raises."""
    status = 502
    code = "comfyui_error"

    def details(self) -> dict:
        """JSON-safe extra fields for an error response (subclasses add theirs)."""
        return {}

    def to_dict(self) -> dict:
        return {"code": self.code, "message": str(self), **self.details()}


class ComfyUnreachable(ComfyError):
    """ComfyUI cannot be reached (refused, DNS, connect timeout) or went away mid-run."""
    status = 503
    code = "comfyui_unreachable"

    def __init__(self, url: str, reason: str = "", message: Optional[str] = None):
        self.url = url
        self.reason = reason
        super().__init__(message or f"ComfyUI is unreachable at {url}" + (f" ({reason})" if reason else ""))

    def details(self):
        return {"url": self.url}


class ComfyRejected(ComfyError):
    """POST /prompt answered 400: the workflow failed ComfyUI's validation."""
    status = 502
    code = "comfyui_rejected_workflow"

    def __init__(self, error, node_errors):
        self.error = error              # ComfyUI's `error`, unchanged
        self.node_errors = node_errors  # ComfyUI's `node_errors`, unchanged
        super().__init__(_describe_rejection(error, node_errors))

    def details(self):
        return {"error": self.error, "node_errors": self.node_errors}


class ComfyExecutionFailed(ComfyError):
    """A node raised while ComfyUI ran the prompt (`execution_error`)."""
    status = 502
    code = "comfyui_execution_error"

    def __init__(self, node_id=None, node_type=None, exception_message="", exception_type="",
                 traceback=None, prompt_id=None):
        self.node_id = node_id
        self.node_type = node_type
        self.exception_message = exception_message
        self.exception_type = exception_type
        self.traceback = traceback or []
        self.prompt_id = prompt_id
        where = f"node {node_id} ({node_type})" if node_id is not None else "an unknown node"
        what = f"{exception_type}: {exception_message}" if exception_type else (exception_message or "no details")
        super().__init__(f"ComfyUI failed at {where}: {what}")

    def details(self):
        return {"node_id": self.node_id, "node_type": self.node_type,
                "exception_type": self.exception_type, "exception_message": self.exception_message}


class ComfyInterrupted(ComfyError):
    """The prompt was interrupted, or removed from the queue before it ran."""
    status = 409
    code = "interrupted"

    def __init__(self, node_id=None, node_type=None, prompt_id=None, message=None):
        self.node_id = node_id
        self.node_type = node_type
        self.prompt_id = prompt_id
        if message is None:
            where = f" at node {node_id} ({node_type})" if node_id is not None else ""
            message = f"ComfyUI prompt {prompt_id} was interrupted{where}"
        super().__init__(message)

    def details(self):
        return {"node_id": self.node_id, "node_type": self.node_type}


class ComfyTimeout(ComfyError):
    """The prompt (or one HTTP call) did not finish in time."""
    status = 504
    code = "comfyui_timeout"

    def __init__(self, timeout: float, message: Optional[str] = None):
        self.timeout = timeout
        super().__init__(message or f"ComfyUI did not finish within {timeout:g}s")

    def details(self):
        return {"timeout": self.timeout}


class ComfyBadResponse(ComfyError):
    """ComfyUI answered with a status or body this client does not understand."""
    status = 502
    code = "comfyui_bad_response"


def _describe_rejection(error, node_errors) -> str:
    if isinstance(error, dict):
        head = error.get("message") or error.get("type") or "invalid prompt"
        if error.get("details"):
            head += f" ({error['details']})"
    else:
        head = str(error)
    parts = []
    if isinstance(node_errors, dict):
        for node_id, info in node_errors.items():
            for err in (info or {}).get("errors", []):
                parts.append(f"node {node_id} ({info.get('class_type')}): "
                             f"{err.get('message')}: {err.get('details')}")
    return "ComfyUI rejected the workflow: " + head + ("; " + "; ".join(parts) if parts else "")
