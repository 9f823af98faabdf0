"""ComfyUI's default ("classic") output cache, keyed by input signatures.

A node's key is its class, IS_CHANGED value and constant inputs, plus the same for every
ancestor (links become ancestor positions, not node ids). Before each prompt, entries whose keys
the new prompt does not use are dropped; so an identical re-run is served entirely from cache
(no new files), while a changed seed re-runs the sampler and everything downstream.
"""
from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

from .validation import is_link

log = logging.getLogger(__name__)


class _Never:
    """Stands in for ComfyUI's NaN signature parts: equal to nothing, not even another _Never."""

    __slots__ = ()


def to_hashable(obj):
    if isinstance(obj, (int, float, str, bool, type(None))):
        return obj
    if isinstance(obj, Mapping):
        return frozenset((to_hashable(k), to_hashable(v)) for k, v in sorted(obj.items()))
    if isinstance(obj, Sequence):
        return tuple(to_hashable(i) for i in obj)
    return _Never()


class SignatureKeys:
    """Cache keys of every node of one prompt."""

    def __init__(self, prompt: dict, is_changed):
        self.prompt = prompt
        self.is_changed = is_changed  # node_id -> hashable, or a _Never() when it failed
        self.keys = {node_id: self._signature(node_id) for node_id in prompt}

    def _ancestry(self, node_id, ancestors: list, order: dict) -> None:
        if node_id not in self.prompt:
            return
        inputs = self.prompt[node_id]["inputs"]
        for key in sorted(inputs):
            if is_link(inputs[key]):
                ancestor = inputs[key][0]
                if ancestor not in order:
                    ancestors.append(ancestor)
                    order[ancestor] = len(ancestors) - 1
                    self._ancestry(ancestor, ancestors, order)

    def _immediate(self, node_id, order: dict):
        if node_id not in self.prompt:
            return [_Never()]
        node = self.prompt[node_id]
        sig = [node["class_type"], self.is_changed(node_id)]
        inputs = node["inputs"]
        for key in sorted(inputs):
            if is_link(inputs[key]):
                ancestor, socket = inputs[key]
                sig.append((key, ("ANCESTOR", order[ancestor], socket)))
            else:
                sig.append((key, inputs[key]))
        return sig

    def _signature(self, node_id):
        ancestors, order = [], {}
        self._ancestry(node_id, ancestors, order)
        sig = [self._immediate(node_id, order)] + [self._immediate(a, order) for a in ancestors]
        return to_hashable(sig)


class ClassicCache:
    """outputs and ui caches sharing one key set per prompt (CacheSet.init_classic_cache)."""

    def __init__(self):
        self.outputs: dict = {}
        self.ui: dict = {}
        self.keys: SignatureKeys | None = None

    def set_prompt(self, keys: SignatureKeys) -> None:
        self.keys = keys
        used = set()
        for k in keys.keys.values():
            try:
                used.add(k)
            except TypeError:  # pragma: no cover - keys are hashable by construction
                pass
        for store in (self.outputs, self.ui):
            for k in [k for k in store if k not in used]:
                del store[k]

    def _key(self, node_id):
        return self.keys.keys.get(node_id) if self.keys else None

    def get_output(self, node_id):
        k = self._key(node_id)
        return self.outputs.get(k) if k is not None else None

    def set_output(self, node_id, value) -> None:
        self.outputs[self._key(node_id)] = value

    def get_ui(self, node_id):
        k = self._key(node_id)
        return self.ui.get(k) if k is not None else None

    def set_ui(self, node_id, value) -> None:
        self.ui[self._key(node_id)] = value

    def clear(self) -> None:
        self.outputs.clear()
        self.ui.clear()
        self.keys = None
