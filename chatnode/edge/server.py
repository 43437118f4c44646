"""The listener: accepts connections and serves HTTP and WebSocket on them.

Ownership: ``EdgeServer.serve`` owns the write batcher's tasks (its flusher, with the drain
and cutter tasks it starts, and the pinger) and, inside them, a nursery of connection tasks:
one task per connection, HTTP first, then the WebSocket it may be upgraded to.
``stop_accepting`` closes the listeners; ``serve`` then returns once every connection has
ended. Idle keep-alive HTTP connections are closed as soon as draining starts; WebSockets are
closed by the node.
"""

from __future__ import annotations

import logging

import trio

from chatnode.core.errors import ChatError
from chatnode.edge import http
from chatnode.edge.metrics import Metrics
from chatnode.edge.rest import Api
from chatnode.edge.websocket import (
    WriteBatcher,
    WsMember,
    WsSettings,
    accept_websocket,
    serve_websocket,
)
from chatnode.node.service import ChatNode

log = logging.getLogger(__name__)


class EdgeServer:
    def __init__(
        self, node: ChatNode, *, http_limits: http.Limits, ws_settings: WsSettings, metrics: Metrics
    ) -> None:
        self.node = node
        self.metrics = metrics
        self.api = Api(node, metrics)
        self._http_limits = http_limits
        self._ws_settings = ws_settings
        self._accept_scope = trio.CancelScope()
        self._idle = http.IdleConnections()
        self.batcher = WriteBatcher(ping_interval_s=ws_settings.ping_interval_s)

    async def serve(
        self,
        host: str,
        port: int,
        *,
        task_status: trio.TaskStatus[list[int]] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Listen on ``host:port`` (0 picks a port); ``started(ports)`` once listening."""
        listeners = await trio.open_tcp_listeners(port, host=host, backlog=4096)
        ports = [listener.socket.getsockname()[1] for listener in listeners]
        async with trio.open_nursery() as batching:
            await batching.start(self.batcher.run)
            batching.start_soon(self.batcher.ping_forever)
            async with trio.open_nursery() as connections:
                with self._accept_scope:
                    task_status.started(ports)
                    await trio.serve_listeners(
                        self._connection, listeners, handler_nursery=connections
                    )
                for listener in listeners:
                    await listener.aclose()
            batching.cancel_scope.cancel()  # every connection ended: nothing left to flush

    def stop_accepting(self) -> None:
        self.metrics.draining = True
        self._accept_scope.cancel()
        self._idle.drain()

    async def _connection(self, stream: trio.SocketStream) -> None:
        try:
            member = await http.serve_http_connection(
                stream, self._http_limits, self.api.handle, self._upgrade, self._idle
            )
            if member is not None:
                await serve_websocket(self.node, self.batcher, member, stream)
        except Exception:
            log.exception("connection failed")

    async def _upgrade(
        self, request: http.Request, stream: trio.SocketStream, trailing: bytes
    ) -> http.Response | WsMember:
        try:
            self.api.route(request)
        except ChatError as exc:
            return http.error_response(exc)
        if not request.path.endswith("/join"):
            return await self.api.handle(request)
        self.metrics.ws_accepted += 1
        return await accept_websocket(
            self.node, self._ws_settings, self.batcher, request, stream, trailing
        )
