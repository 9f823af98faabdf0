"""The queue and the single worker thread that runs prompts one at a time (ComfyUI's
execution.PromptQueue, PromptExecutor and main.prompt_worker, re-implemented).

Message order, who receives what (client_id vs broadcast), the history record, the cache and the
interrupt points follow 0.3.40; the fault hooks (fail/hang/drop/die) are the fake's additions.
"""
from __future__ import annotations

import builtins
import copy
import heapq
import io
import logging
import struct
import sys
import threading
import time
import traceback
from dataclasses import dataclass
from typing import Optional

from PIL import Image, ImageOps

from . import catalog, paths
from .cache import ClassicCache, SignatureKeys, _Never
from .graph import DependencyCycleError, ExecutionList
from .nodes import NODE_CLASSES, SAMPLER_CLASSES, InterruptProcessingException
from .validation import full_type_name, is_link

log = logging.getLogger(__name__)

MAXIMUM_HISTORY_SIZE = 10000
PREVIEW_IMAGE = 1  # server.BinaryEventTypes.PREVIEW_IMAGE
JPEG = 1


class PromptQueue:
    """Pending heap (number, prompt_id, prompt, extra_data, outputs), running items and history."""

    def __init__(self, hub):
        self.hub = hub
        self.mutex = threading.RLock()
        self.not_empty = threading.Condition(self.mutex)
        self.reset()

    def reset(self) -> None:
        """Forget everything (a restarted ComfyUI starts empty)."""
        with self.mutex:
            self.task_counter = 0
            self.queue: list = []
            self.currently_running: dict = {}
            self.history: dict = {}
            self.flags: dict = {}

    def put(self, item) -> None:
        with self.mutex:
            heapq.heappush(self.queue, item)
            self.hub.queue_updated()
            self.not_empty.notify()

    def get(self, timeout: float):
        with self.not_empty:
            if not self.queue:
                self.not_empty.wait(timeout=timeout)
                if not self.queue:
                    return None
            item = heapq.heappop(self.queue)
            i = self.task_counter
            self.currently_running[i] = copy.deepcopy(item)
            self.task_counter += 1
            self.hub.queue_updated()
            return item, i

    def task_done(self, item_id, history_result: dict, status: Optional[dict]) -> None:
        with self.mutex:
            prompt = self.currently_running.pop(item_id, None)
            if prompt is None:  # wiped by die() meanwhile
                return
            if len(self.history) > MAXIMUM_HISTORY_SIZE:
                self.history.pop(next(iter(self.history)))
            self.history[prompt[1]] = {"prompt": prompt, "outputs": {}, "status": copy.deepcopy(status)}
            self.history[prompt[1]].update(history_result)
            self.hub.queue_updated()

    def get_current_queue_volatile(self):
        with self.mutex:
            return list(self.currently_running.values()), copy.copy(self.queue)

    def get_tasks_remaining(self) -> int:
        with self.mutex:
            return len(self.queue) + len(self.currently_running)

    def wipe_queue(self) -> None:
        with self.mutex:
            self.queue = []
            self.hub.queue_updated()

    def delete_queue_item(self, predicate) -> bool:
        with self.mutex:
            for x in range(len(self.queue)):
                if predicate(self.queue[x]):
                    if len(self.queue) == 1:
                        self.wipe_queue()
                    else:
                        self.queue.pop(x)
                        heapq.heapify(self.queue)
                    self.hub.queue_updated()
                    return True
        return False

    def get_history(self, prompt_id=None, max_items=None, offset=-1) -> dict:
        with self.mutex:
            if prompt_id is None:
                out = {}
                if offset < 0 and max_items is not None:
                    offset = len(self.history) - max_items
                for i, k in enumerate(self.history):
                    if i >= offset:
                        out[k] = self.history[k]
                        if max_items is not None and len(out) >= max_items:
                            break
                return copy.deepcopy(out)
            if prompt_id in self.history:
                return {prompt_id: copy.deepcopy(self.history[prompt_id])}
            return {}

    def wipe_history(self) -> None:
        with self.mutex:
            self.history = {}

    def delete_history_item(self, prompt_id) -> None:
        with self.mutex:
            self.history.pop(prompt_id, None)

    def set_flag(self, name, data) -> None:
        with self.mutex:
            self.flags[name] = data
            self.not_empty.notify()

    def get_flags(self) -> dict:
        with self.mutex:
            flags, self.flags = self.flags, {}
            return flags

    def flags_pending(self) -> bool:
        """A POST /free the worker has not applied yet."""
        with self.mutex:
            return bool(self.flags)


@dataclass
class Faults:
    """Faults armed for the next prompt that starts executing (consumed by it)."""

    fail: Optional[tuple] = None        # (node class or id, message, exception type name)
    hang: bool = False
    drop_after_progress: Optional[int] = None


def make_exception(type_name: str, message: str) -> Exception:
    """An exception whose ComfyUI-style full type name is `type_name` (builtins stay bare)."""
    builtin = getattr(builtins, type_name, None)
    if isinstance(builtin, type) and issubclass(builtin, Exception):
        return builtin(message)
    module, _, name = type_name.rpartition(".")
    cls = type(name, (Exception,), {"__module__": module or "builtins", "__qualname__": name})
    return cls(message)


def format_value(x):
    if x is None:
        return None
    if isinstance(x, (int, float, bool, str)):
        return x
    return str(x)


class NodeContext:
    """What a running node may touch: folders, progress/preview, step delay, interrupts."""

    def __init__(self, run: "PromptRun"):
        self._run = run
        self.folders = run.executor.folders
        self.send_previews = bool(run.executor.settings.send_previews)
        self.notes: dict = {}

    def note(self, **details) -> None:
        """What a node wants tests to see it did (FakeComfyUI.node_runs)."""
        self.notes.update(details)

    @staticmethod
    def save_image_path(prefix, out_dir, width, height):
        return paths.save_image_path(prefix, out_dir, width, height)

    def sleep_step(self) -> None:
        delay = self._run.executor.settings.step_delay
        if delay > 0:
            self._run.executor.interrupt.wait(delay)

    def progress(self, value: int, total: int, preview=None) -> None:
        self._run.progress(value, total, preview)

    def maybe_hang(self) -> None:
        self._run.maybe_hang(sampler=True)


class PromptRun:
    """State of one execution (PromptExecutor.execute for one queue item)."""

    def __init__(self, executor: "Executor", prompt: dict, prompt_id: str, extra_data: dict, epoch: int,
                 faults: Faults):
        self.executor = executor
        self.hub = executor.hub
        self.prompt = prompt
        self.prompt_id = prompt_id
        self.extra_data = extra_data
        self.epoch = epoch
        self.faults = faults
        self.client_id = extra_data.get("client_id")
        self.progress_count = 0
        self.elist: Optional[ExecutionList] = None

    # messaging ---------------------------------------------------------------------------------
    def alive(self) -> bool:
        return self.epoch == self.executor.epoch and not self.executor.stopping.is_set()

    def send(self, event, data, sid) -> None:
        if self.alive():
            self.hub.send_sync(event, data, sid)

    def add_message(self, event: str, data: dict, broadcast: bool) -> None:
        data = {**data, "timestamp": int(time.time() * 1000)}
        self.executor.status_messages.append((event, data))
        if self.client_id is not None or broadcast:
            self.send(event, data, self.client_id)

    def check_interrupt(self) -> None:
        if self.executor.interrupt.is_set() or not self.alive():
            raise InterruptProcessingException()

    def progress(self, value, total, preview) -> None:
        self.check_interrupt()
        self.send("progress", {"value": value, "max": total, "prompt_id": self.hub.last_prompt_id,
                               "node": self.hub.last_node_id}, self.client_id)
        if preview is not None:
            self.send(PREVIEW_IMAGE, encode_preview(preview), self.client_id)
        self.progress_count += 1
        if self.faults.drop_after_progress is not None and self.progress_count == self.faults.drop_after_progress:
            log.info("fake ComfyUI: dropping every websocket after progress %d", self.progress_count)
            self.send(self.hub.DROP_SOCKETS, None, None)

    def maybe_hang(self, sampler: bool) -> None:
        """hang_next: stall (first sampler step, or first node if no sampler runs) until interrupted."""
        if not self.faults.hang:
            return
        if not sampler:
            pending = self.elist.pending_ids() if self.elist else []
            if any(self.prompt[n]["class_type"] in SAMPLER_CLASSES for n in pending):
                return
        self.faults.hang = False
        log.info("fake ComfyUI: prompt %s hangs until /interrupt", self.prompt_id)
        ex = self.executor
        while not ex.interrupt.is_set() and self.alive():
            ex.interrupt.wait(0.02)
        raise InterruptProcessingException()

    # execution ---------------------------------------------------------------------------------
    def run(self, execute_outputs: list) -> None:
        ex = self.executor
        ex.interrupt.clear()
        self.hub.client_id = self.client_id
        ex.status_messages = []
        self.add_message("execution_start", {"prompt_id": self.prompt_id}, broadcast=False)
        if self.faults.drop_after_progress == 0:
            self.send(self.hub.DROP_SOCKETS, None, None)

        keys = SignatureKeys(self.prompt, self._is_changed_memo())
        ex.cache.set_prompt(keys)
        for key in [k for k in ex.objects if k[0] not in self.prompt or self.prompt[k[0]]["class_type"] != k[1]]:
            del ex.objects[key]
        cached_nodes = [n for n in self.prompt if ex.cache.get_output(n) is not None]
        self.add_message("execution_cached", {"nodes": cached_nodes, "prompt_id": self.prompt_id}, broadcast=False)

        executed: set = set()
        current_outputs = list(self.prompt)
        self.elist = ExecutionList(self.prompt, self._is_output, lambda n: ex.cache.get_output(n) is not None)
        for node_id in execute_outputs:
            self.elist.add_node(node_id)

        while not self.elist.is_empty():
            try:
                node_id = self.elist.stage()
            except DependencyCycleError as cyc:
                blamed = self.elist.pending_ids()[0]
                self._handle_error(current_outputs, executed, {
                    "node_id": blamed, "exception_message": str(cyc), "exception_type": "graph.DependencyCycleError",
                    "traceback": [], "current_inputs": []}, cyc)
                break
            ok, error, exc = self._execute_node(node_id, executed)
            ex.success = ok
            if not ok:
                self._handle_error(current_outputs, executed, error, exc)
                break
            self.elist.complete()
        else:
            self.add_message("execution_success", {"prompt_id": self.prompt_id}, broadcast=False)

        outputs, meta = {}, {}
        for node_id in self.prompt:
            ui = ex.cache.get_ui(node_id)
            if ui is not None:
                outputs[node_id] = ui["output"]
                meta[node_id] = ui["meta"]
        ex.history_result = {"outputs": outputs, "meta": meta}
        self.hub.last_node_id = None

    def _is_output(self, node_id) -> bool:
        info = self.executor.object_info.get(self.prompt[node_id]["class_type"], {})
        return catalog.is_output_node(info)

    def _is_changed_memo(self):
        memo: dict = {}
        ex = self.executor

        def is_changed(node_id):
            if node_id not in memo:
                node = self.prompt[node_id]
                cls = NODE_CLASSES.get(node["class_type"])
                fn = getattr(cls, "IS_CHANGED", None)
                if fn is None:
                    memo[node_id] = False
                else:
                    # like get_input_data(outputs=None): declared constants, links as None
                    class_info = ex.object_info.get(node["class_type"], {})
                    consts = {k: (None if is_link(v) else v) for k, v in node["inputs"].items()
                              if is_link(v) or catalog.input_info(class_info, k)[1] is not None}
                    try:
                        memo[node_id] = [fn(ex.folders, **consts)]
                    except Exception as e:  # ComfyUI logs and uses NaN: never equal, so never cached
                        log.warning("WARNING: %s", e)
                        memo[node_id] = _Never()
            return memo[node_id]
        return is_changed

    def _input_data(self, node_id, class_info) -> dict:
        """get_input_data: linked values from the cache, constants, then hidden inputs."""
        inputs = self.prompt[node_id]["inputs"]
        data = {}
        for name, value in inputs.items():
            _, category, _ = catalog.input_info(class_info, name)
            if is_link(value):
                cached = self.executor.cache.get_output(value[0])
                if cached is None or value[1] >= len(cached):
                    data[name] = None
                else:
                    data[name] = cached[int(value[1])]
            elif category is not None:
                data[name] = value
        for name, kind in (class_info.get("input", {}).get("hidden") or {}).items():
            if kind == "PROMPT":
                data[name] = self.prompt
            elif kind == "EXTRA_PNGINFO":
                data[name] = self.extra_data.get("extra_pnginfo", None)
            elif kind == "UNIQUE_ID":
                data[name] = node_id
        return data

    def _execute_node(self, node_id, executed: set):
        ex = self.executor
        node = self.prompt[node_id]
        class_type = node["class_type"]
        if ex.cache.get_output(node_id) is not None:
            if self.client_id is not None and ex.settings.announce_outputs:
                cached_ui = ex.cache.get_ui(node_id) or {}
                self.send("executed", {"node": node_id, "display_node": node_id, "output": cached_ui.get("output", None),
                                       "prompt_id": self.prompt_id}, self.client_id)
            return True, None, None

        input_data = None
        try:
            class_info = ex.object_info.get(class_type, {})
            input_data = self._input_data(node_id, class_info)
            if self.client_id is not None:
                self.hub.last_node_id = node_id
                self.send("executing", {"node": node_id, "display_node": node_id, "prompt_id": self.prompt_id},
                          self.client_id)
            obj = ex.objects.get((node_id, class_type))
            if obj is None:
                cls = NODE_CLASSES.get(class_type)
                if cls is None:
                    raise NotImplementedError(f"the fake ComfyUI has no model of node class {class_type}")
                obj = cls()
                ex.objects[(node_id, class_type)] = obj
            self.check_interrupt()  # nodes.before_node_execution()
            self._maybe_fail(node_id, class_type)
            if class_type not in SAMPLER_CLASSES:
                self.maybe_hang(sampler=False)
            ctx = NodeContext(self)
            result = obj.run(ctx, **input_data)
            if isinstance(result, dict):
                output_ui = result.get("ui", {}) or {}
                output_data = tuple(result.get("result", ()) or ())
            else:
                output_ui, output_data = {}, tuple(result)
            if output_ui:
                ex.cache.set_ui(node_id, {"meta": {"node_id": node_id, "display_node": node_id, "parent_node": None,
                                                   "real_node_id": node_id}, "output": output_ui})
                if self.client_id is not None and ex.settings.announce_outputs:
                    self.send("executed", {"node": node_id, "display_node": node_id, "output": output_ui,
                                           "prompt_id": self.prompt_id}, self.client_id)
            ex.cache.set_output(node_id, output_data)
            ex.node_runs.append({"prompt_id": self.prompt_id, "node": node_id, "class_type": class_type,
                                 **ctx.notes})
        except InterruptProcessingException as iex:
            log.info("Processing interrupted")
            return False, {"node_id": node_id}, iex
        except Exception as exc:
            typ, _, tb = sys.exc_info()
            formatted = {}
            if input_data is not None:
                formatted = {name: [format_value(v)] for name, v in input_data.items()}
            log.info("fake ComfyUI: node %s (%s) raised %s: %s", node_id, class_type, full_type_name(typ), exc)
            return False, {"node_id": node_id, "exception_message": str(exc), "exception_type": full_type_name(typ),
                           "traceback": traceback.format_tb(tb), "current_inputs": formatted}, exc
        executed.add(node_id)
        return True, None, None

    def _maybe_fail(self, node_id, class_type) -> None:
        fail = self.faults.fail
        if fail is None:
            return
        target, message, type_name = fail
        if target in (class_type, node_id):
            self.faults.fail = None
            raise make_exception(type_name, message)

    def _handle_error(self, current_outputs, executed, error, exc) -> None:
        node_id = error["node_id"]
        class_type = self.prompt[node_id]["class_type"]
        if isinstance(exc, InterruptProcessingException):
            self.add_message("execution_interrupted", {"prompt_id": self.prompt_id, "node_id": node_id,
                                                       "node_type": class_type, "executed": list(executed)},
                             broadcast=True)
        else:
            self.add_message("execution_error", {
                "prompt_id": self.prompt_id, "node_id": node_id, "node_type": class_type, "executed": list(executed),
                "exception_message": error["exception_message"], "exception_type": error["exception_type"],
                "traceback": error["traceback"], "current_inputs": error["current_inputs"],
                "current_outputs": list(current_outputs)}, broadcast=False)


def encode_preview(image) -> bytes:
    """A PREVIEW_IMAGE frame body: big-endian image type (1 = JPEG) + JPEG, at most 512px."""
    image = ImageOps.contain(image, (512, 512), Image.Resampling.BILINEAR)
    buf = io.BytesIO()
    buf.write(struct.pack(">I", JPEG))
    image.save(buf, format="JPEG", quality=95, compress_level=1)
    return buf.getvalue()


class Settings:
    """Knobs tests turn on a live fake (read by the worker at each use)."""

    def __init__(self):
        self.step_delay = 0.0
        self.history_delay = 0.005
        self.view_delay = 0.0
        self.send_previews = False
        #: False: no `executed` messages (a fault: clients must then read outputs from /history)
        self.announce_outputs = True


class Executor:
    """The worker thread plus the caches that outlive single prompts."""

    def __init__(self, hub, queue: PromptQueue, folders, object_info: dict, settings: Settings):
        self.hub = hub
        self.queue = queue
        self.folders = folders
        self.object_info = object_info
        self.settings = settings
        self.interrupt = threading.Event()
        self.stopping = threading.Event()
        self.epoch = 0
        self.faults = Faults()
        self.faults_lock = threading.Lock()
        self.running_prompt_id: Optional[str] = None
        #: the running prompt once its execution has ended (execution_success sent): ComfyUI still
        #: holds it, filing its history, until task_done
        self.executed_prompt_id: Optional[str] = None
        self.busy = threading.Event()
        self.thread: Optional[threading.Thread] = None
        self.reset_requested = False
        self.node_runs: list = []  # an observation log for tests: survives reset() and die()
        self.reset()

    def reset(self) -> None:
        """PromptExecutor.reset (POST /free {"free_memory": true}): caches gone."""
        self.cache = ClassicCache()
        self.objects: dict = {}
        self.status_messages: list = []
        self.success = True
        self.history_result = {"outputs": {}, "meta": {}}

    def start(self) -> None:
        self.stopping.clear()
        self.interrupt.clear()
        self.thread = threading.Thread(target=self._loop, name="fake-comfyui-worker", daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.stopping.set()
        self.interrupt.set()
        with self.queue.mutex:
            self.queue.not_empty.notify_all()
        if self.thread is not None:
            self.thread.join(timeout=10)
            if self.thread.is_alive():  # pragma: no cover - would be a bug in a node model
                log.error("fake ComfyUI worker did not stop")

    def abandon(self) -> None:
        """die(): the running prompt is dropped without history; caches and queue are lost."""
        with self.faults_lock:
            self.epoch += 1
            self.faults = Faults()
        self.interrupt.set()

    def request_reset(self) -> None:
        """Reset caches from the worker thread before its next prompt (never under its feet)."""
        self.reset_requested = True

    def take_faults(self) -> Faults:
        with self.faults_lock:
            faults, self.faults = self.faults, Faults()
            return faults

    def _loop(self) -> None:
        while not self.stopping.is_set():
            if self.reset_requested:
                self.reset_requested = False
                self.reset()
            got = self.queue.get(timeout=0.05)
            if got is not None and self.reset_requested:
                self.reset_requested = False
                self.reset()
            if got is not None:
                self.busy.set()
                try:
                    self._run_item(*got)
                except Exception:  # never let one prompt kill the worker
                    log.exception("fake ComfyUI worker: unexpected error")
                finally:
                    self.running_prompt_id = None
                    self.busy.clear()
            if self.queue.flags_pending():
                self.busy.set()  # wait_idle() waits for the flags to be applied
                try:
                    if self.queue.get_flags().get("free_memory", False):
                        self.reset()
                finally:
                    self.busy.clear()

    def _history_gap(self, run: PromptRun) -> None:
        """0.3.40's gap between execution_success and the /history write: history_delay seconds,
        read live (lowering it ends a gap in progress), cut short by stop() and die()."""
        started = time.monotonic()
        while run.alive():
            left = self.settings.history_delay - (time.monotonic() - started)
            if left <= 0:
                return
            self.stopping.wait(min(left, 0.01))

    def _run_item(self, item, item_id) -> None:
        number, prompt_id, prompt, extra_data, outputs = item
        epoch = self.epoch
        self.running_prompt_id = prompt_id
        self.hub.last_prompt_id = prompt_id
        run = PromptRun(self, prompt, prompt_id, extra_data, epoch, self.take_faults())
        try:
            run.run(outputs)
        except Exception:
            log.exception("fake ComfyUI: prompt %s crashed the fake's executor", prompt_id)
            self.success = False
            self.history_result = {"outputs": {}, "meta": {}}
        if run.faults.fail is not None:
            log.warning("fake ComfyUI: fail_next(%r) did not fire in prompt %s (cached or absent)",
                        run.faults.fail[0], prompt_id)
        if run.faults.hang:
            log.warning("fake ComfyUI: hang_next did not fire in prompt %s (nothing executed)", prompt_id)
        if not run.alive():
            return
        self.executed_prompt_id = prompt_id
        self._history_gap(run)
        if not run.alive():
            return
        self.queue.task_done(item_id, self.history_result, {
            "status_str": "success" if self.success else "error", "completed": self.success,
            "messages": [list(m) for m in self.status_messages]})
        if self.hub.client_id is not None:
            run.send("executing", {"node": None, "prompt_id": prompt_id}, self.hub.client_id)
