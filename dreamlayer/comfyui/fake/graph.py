"""Execution order of a prompt, as ComfyUI's ExecutionList (comfy_execution/graph.py) picks it.

Clients see this order in the `executing` messages (ws_success.jsonl: 1,5,4,6,3,2,7,8,9), so the
fake dissolves the graph the same way: depth-first discovery from each output, cached upstream
nodes skipped, then repeatedly pick a ready node, preferring output nodes and nodes one or two
links away from an output.
"""
from __future__ import annotations

from .validation import is_link


class DependencyCycleError(Exception):
    pass


class ExecutionList:
    def __init__(self, prompt: dict, is_output, is_cached):
        self.prompt = prompt
        self.is_output = is_output      # node_id -> bool
        self.is_cached = is_cached      # node_id -> bool
        self.pending: dict = {}         # insertion-ordered, like ComfyUI's pendingNodes
        self.block_count: dict = {}
        self.blocking: dict = {}
        self.staged = None

    def add_node(self, root) -> None:
        stack = [root]
        links = []
        while stack:
            node_id = stack.pop()
            if node_id in self.pending:
                continue
            self.pending[node_id] = True
            self.block_count[node_id] = 0
            self.blocking[node_id] = {}
            for value in self.prompt[node_id]["inputs"].values():
                if is_link(value):
                    from_id, socket = value
                    if not self.is_cached(from_id):
                        stack.append(from_id)
                        links.append((from_id, socket, node_id))
        for from_id, socket, to_id in links:
            self._add_strong_link(from_id, socket, to_id)

    def _add_strong_link(self, from_id, socket, to_id) -> None:
        if self.is_cached(from_id):
            return
        self.add_node(from_id)
        if to_id not in self.blocking[from_id]:
            self.blocking[from_id][to_id] = {}
            self.block_count[to_id] += 1
        self.blocking[from_id][to_id][socket] = True

    def is_empty(self) -> bool:
        return not self.pending

    def pending_ids(self) -> list:
        return list(self.pending)

    def stage(self):
        """Next node to run, or raise DependencyCycleError if nothing is ready."""
        ready = [n for n in self.pending if self.block_count[n] == 0]
        if not ready:
            raise DependencyCycleError("Dependency cycle detected")
        self.staged = self._pick(ready)
        return self.staged

    def _pick(self, ready: list):
        for node_id in ready:
            if self.is_output(node_id):
                return node_id
        for node_id in ready:
            if any(self.is_output(b) for b in self.blocking[node_id]):
                return node_id
        for node_id in ready:
            for b in self.blocking[node_id]:
                if any(self.is_output(b1) for b1 in self.blocking[b]):
                    return node_id
        return ready[0]

    def complete(self) -> None:
        node_id = self.staged
        del self.pending[node_id]
        for blocked in self.blocking[node_id]:
            self.block_count[blocked] -= 1
        del self.blocking[node_id]
        self.staged = None
