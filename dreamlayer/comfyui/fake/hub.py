"""WebSocket registry and the outgoing message pump (the messaging half of ComfyUI's PromptServer).

The worker thread never touches sockets: like ComfyUI it calls send_sync(), which hands the
message to the event loop's queue; publish_loop() delivers them in order. sid=None broadcasts;
a sid that is not connected receives nothing (the message is lost, as in ComfyUI).
"""
from __future__ import annotations

import asyncio
import logging
import struct
import threading
import uuid

import aiohttp
from aiohttp import web

log = logging.getLogger(__name__)


class Hub:
    DROP_SOCKETS = "__fake_drop_sockets__"  # control event: drop every socket, in message order

    def __init__(self):
        self.sockets: dict[str, web.WebSocketResponse] = {}
        self.requests: dict[web.WebSocketResponse, web.Request] = {}
        self.dropped: set = set()
        self.loop: asyncio.AbstractEventLoop | None = None
        self.messages: asyncio.Queue | None = None
        # PromptServer state the worker keeps up to date (used for progress and ws reconnects).
        self.client_id = None
        self.last_node_id = None
        self.last_prompt_id = None
        self.get_queue_info = lambda: {"exec_info": {"queue_remaining": 0}}
        self._outstanding = 0  # handed to send_sync but not yet delivered (for wait_idle)
        self._outstanding_lock = threading.Lock()

    def attach(self, loop: asyncio.AbstractEventLoop) -> None:
        """Bind to the server's loop (must run in that loop)."""
        self.loop = loop
        self.messages = asyncio.Queue()
        with self._outstanding_lock:
            self._outstanding = 0

    # thread-safe entry points ----------------------------------------------------------------
    def send_sync(self, event, data, sid=None) -> None:
        loop = self.loop
        if loop is None or loop.is_closed():
            return
        with self._outstanding_lock:
            self._outstanding += 1
        try:
            loop.call_soon_threadsafe(self.messages.put_nowait, (event, data, sid))
        except RuntimeError:  # loop closed while we were here
            self._done_one()

    def _done_one(self) -> None:
        with self._outstanding_lock:
            self._outstanding = max(0, self._outstanding - 1)

    def queue_updated(self) -> None:
        self.send_sync("status", {"status": self.get_queue_info()})

    def pending_messages(self) -> int:
        with self._outstanding_lock:
            return self._outstanding

    def discard_pending(self) -> None:
        """Forget queued messages (die(): a crashed server never sends them). Loop side."""
        while self.messages is not None and not self.messages.empty():
            self.messages.get_nowait()
            self._done_one()

    # loop side -------------------------------------------------------------------------------
    async def publish_loop(self) -> None:
        while True:
            event, data, sid = await self.messages.get()
            try:
                await self.send(event, data, sid)
            except Exception:  # a broken socket must not stop the pump
                log.exception("fake ComfyUI: sending %s failed", event)
            finally:
                self._done_one()

    async def send(self, event, data, sid=None) -> None:
        if event == self.DROP_SOCKETS:
            self.drop_all()
            return
        if isinstance(data, (bytes, bytearray)):
            message = struct.pack(">I", event) + bytes(data)
            await self._deliver("send_bytes", message, sid)
        else:
            await self._deliver("send_json", {"type": event, "data": data}, sid)

    async def _deliver(self, method: str, message, sid) -> None:
        if sid is None:
            targets = list(self.sockets.values())
        elif sid in self.sockets:
            targets = [self.sockets[sid]]
        else:
            targets = []
        for ws in targets:
            try:
                await getattr(ws, method)(message)
            except (aiohttp.ClientError, ConnectionError, RuntimeError) as err:
                log.warning("send error: %s", err)

    def drop_all(self) -> None:
        """Cut every websocket without a close frame (a network drop / crash, not a goodbye)."""
        for sid, ws in list(self.sockets.items()):
            self.sockets.pop(sid, None)
            self.dropped.add(ws)
            request = self.requests.get(ws)
            transport = request.transport if request is not None else None
            if transport is not None:
                transport.abort()

    async def websocket_handler(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        sid = request.rel_url.query.get("clientId", "")
        if sid:
            self.sockets.pop(sid, None)  # a new socket with the same clientId replaces the old one
        else:
            sid = uuid.uuid4().hex
        self.sockets[sid] = ws
        self.requests[ws] = request
        try:
            await self.send("status", {"status": self.get_queue_info(), "sid": sid}, sid)
            if self.client_id == sid and self.last_node_id is not None:
                await self.send("executing", {"node": self.last_node_id}, sid)
            async for msg in ws:
                if msg.type == aiohttp.WSMsgType.ERROR:
                    log.warning("ws connection closed with exception %s", ws.exception())
        finally:
            # ComfyUI pops by sid, so closing an *older* socket of the same clientId unregisters
            # the newer one too; kept. Sockets the fake itself dropped were already removed.
            if ws not in self.dropped:
                self.sockets.pop(sid, None)
            self.dropped.discard(ws)
            self.requests.pop(ws, None)
        return ws
