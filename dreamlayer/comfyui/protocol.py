"""What ComfyUI's WebSocket messages and HTTP answers mean, without any I/O: the values a run
reports (Progress, Done, RunResult, OutputImage), PromptWatch for one prompt's messages, and the
readers of /history entries, /queue and /object_info. Being pure, all of it can be replayed from the
captured ComfyUI 0.3.40 traces in the tests (docs/comfyui.md describes the protocol)."""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Callable, Optional, Union

from dreamlayer.comfyui.errors import ComfyExecutionFailed, ComfyInterrupted

log = logging.getLogger(__name__)

__all__ = ["OutputImage", "Progress", "Done", "RunResult", "PromptWatch", "execution_failed_from",
           "raise_for_history", "output_images", "queue_ids", "input_choices"]


@dataclass(frozen=True)
class OutputImage:
    node_id: str
    filename: str
    subfolder: str
    type: str


@dataclass(frozen=True)
class Progress:
    prompt_id: str
    kind: str  # "queued" | "started" | "cached" | "executing" | "progress"
    value: Optional[int] = None
    max: Optional[int] = None
    node: Optional[str] = None
    queue_remaining: Optional[int] = None
    nodes: tuple = ()  # for "cached": the node ids served from cache


@dataclass(frozen=True)
class Done:
    """Our prompt finished successfully; `signal` says which message told us."""
    prompt_id: str
    signal: str  # "execution_success" | "executing_null"


class RunResult:
    """A finished run: its prompt id, output images, /history entry, and how the end was learned
    ("websocket" or "polling").

    A run that ended on the outputs announced over the socket has not read /history (ComfyUI
    files it a few ms after reporting success): ``history`` reads it on first use, waiting
    briefly for that write; until then it is not fetched at all."""

    def __init__(self, prompt_id: str, images: list, history: Optional[dict], source: str = "websocket",
                 load_history: Optional[Callable[[], dict]] = None):
        self.prompt_id = prompt_id
        self.images = images
        self.source = source
        self._history = history
        self._load_history = load_history

    @property
    def history(self) -> dict:
        if self._history is None and self._load_history is not None:
            self._history, self._load_history = self._load_history(), None
        return self._history

    def __repr__(self):
        return f"RunResult({self.prompt_id!r}, {len(self.images)} image(s), source={self.source!r})"


class PromptWatch:
    """Interprets ComfyUI WebSocket frames for one prompt_id.

    handle() returns None (ignore), a Progress, or Done, and raises ComfyExecutionFailed /
    ComfyInterrupted. It does no I/O so captured traces can be replayed through it in tests.
    Other prompts' messages matter because execution_interrupted is broadcast to every socket.
    """

    def __init__(self, prompt_id: str):
        self.prompt_id = prompt_id
        self.started = False
        self.outputs: dict = {}  # node_id -> output of `executed`: the outputs /history will list

    def history_entry(self) -> dict:
        """The /history entry of a prompt that succeeded, from the `executed` messages seen: ComfyUI
        sends one per output node (cached ones too) with the very `output` it files in /history,
        before execution_success. Its own frontend shows results from these messages alone."""
        return {"outputs": dict(self.outputs),
                "status": {"status_str": "success", "completed": True, "messages": []}}

    def handle(self, message) -> Union[None, Progress, Done]:
        if isinstance(message, (bytes, bytearray, memoryview)):
            return None  # binary preview frames
        if isinstance(message, str):
            try:
                message = json.loads(message)
            except ValueError:
                log.warning("ignoring a WebSocket text frame that is not JSON: %.80r", message)
                return None
        if not isinstance(message, dict) or not isinstance(message.get("data"), dict):
            return None
        mtype, data = message.get("type"), message["data"]
        pid = self.prompt_id

        if mtype == "status":
            # Broadcast queue size; the greeting (with "sid") predates our prompt, so skip it.
            if self.started or "sid" in data:
                return None
            remaining = ((data.get("status") or {}).get("exec_info") or {}).get("queue_remaining")
            return Progress(pid, "queued", queue_remaining=remaining)

        if data.get("prompt_id") != pid:
            return None

        if mtype == "execution_start":
            self.started = True
            return Progress(pid, "started")
        if mtype == "execution_cached":
            self.started = True
            return Progress(pid, "cached", nodes=tuple(data.get("nodes") or ()))
        if mtype == "executing":
            if data.get("node") is None:
                return Done(pid, "executing_null")  # the classic end-of-prompt signal
            self.started = True
            return Progress(pid, "executing", node=str(data["node"]))
        if mtype == "progress":
            node = data.get("node")
            return Progress(pid, "progress", value=data.get("value"), max=data.get("max"),
                            node=None if node is None else str(node))
        if mtype == "executed":
            if data.get("node") is not None and isinstance(data.get("output"), dict):
                self.outputs[str(data["node"])] = data["output"]
            return None
        if mtype == "execution_success":
            return Done(pid, "execution_success")
        if mtype == "execution_error":
            raise execution_failed_from(data)
        if mtype == "execution_interrupted":
            raise ComfyInterrupted(data.get("node_id"), data.get("node_type"), prompt_id=pid)
        return None  # e.g. progress_state on newer servers


def execution_failed_from(data: dict) -> ComfyExecutionFailed:
    """Build the exception from an execution_error payload (WebSocket or history)."""
    return ComfyExecutionFailed(
        node_id=data.get("node_id"), node_type=data.get("node_type"),
        exception_message=data.get("exception_message", ""),
        exception_type=data.get("exception_type", ""),
        traceback=data.get("traceback"), prompt_id=data.get("prompt_id"))


def raise_for_history(prompt_id: str, entry: dict) -> None:
    """Map a finished /history entry with status "error" to the same exceptions as the WebSocket."""
    status = entry.get("status") or {}
    if status.get("status_str") != "error":
        return
    for name, data in status.get("messages") or []:
        if name == "execution_error":
            raise execution_failed_from({**data, "prompt_id": prompt_id})
        if name == "execution_interrupted":
            raise ComfyInterrupted(data.get("node_id"), data.get("node_type"), prompt_id=prompt_id)
    raise ComfyExecutionFailed(exception_message="history says status 'error' without details",
                               prompt_id=prompt_id)


def _node_order(node_id: str):
    return (0, int(node_id), "") if str(node_id).isdigit() else (1, 0, str(node_id))


def output_images(history_entry: dict) -> list:
    """Every output node's images of a /history entry, in node order, each file once: two
    identical SaveImage nodes share one cache entry in ComfyUI, so both announce one file."""
    outputs = (history_entry or {}).get("outputs") or {}
    images, seen = [], set()
    for node_id in sorted(outputs, key=_node_order):
        for img in (outputs[node_id] or {}).get("images") or []:
            image = OutputImage(str(node_id), img["filename"], img.get("subfolder", ""), img.get("type", "output"))
            if (image.filename, image.subfolder, image.type) not in seen:
                seen.add((image.filename, image.subfolder, image.type))
                images.append(image)
    return images


def queue_ids(queue: dict, key: str) -> set:
    """Prompt ids in /queue's queue_running or queue_pending ([number, prompt_id, ...] items)."""
    return {item[1] for item in (queue or {}).get(key) or [] if isinstance(item, list) and len(item) > 1}


def input_choices(object_info: dict, class_type: str, input_name: str) -> list:
    """Enum values of one input in /object_info (e.g. CheckpointLoaderSimple.ckpt_name). KeyError if unknown."""
    info = object_info.get(class_type)
    if info is None:
        raise KeyError(f"ComfyUI has no node class {class_type!r}")
    inputs = info.get("input") or {}
    for section in ("required", "optional"):
        group = inputs.get(section) or {} if isinstance(inputs, dict) else None
        if not isinstance(group, dict):
            raise KeyError(f"ComfyUI's description of {class_type} is malformed ({section} inputs: {group!r:.80})")
        spec = group.get(input_name)
        if spec is None:
            continue
        kind = spec[0] if isinstance(spec, (list, tuple)) and spec else None
        if isinstance(kind, list):
            return list(kind)
        if kind == "COMBO" and len(spec) > 1 and isinstance(spec[1] or {}, dict):  # newer servers' combo format
            return list((spec[1] or {}).get("options") or [])
        raise KeyError(f"{class_type}.{input_name} is not a list input (type {kind!r})")
    raise KeyError(f"ComfyUI node {class_type!r} has no input {input_name!r}")
