"""A fault-injecting TCP proxy (Trio) between chatnode nodes and a backend server.

``FaultProxy(upstream_port)`` listens on a loopback port of its own and forwards every
connection to ``127.0.0.1:upstream_port``. Start it with ``await nursery.start(proxy.serve)``
(returns the port it listens on). Then:

- ``cut()``: the backend "goes down": every forwarded connection is closed and the listening
  socket is closed too, so a new connection is *refused* (ECONNREFUSED, as for a stopped
  server), not accepted and dropped;
- ``restore()``: the backend "comes back": the proxy listens again on the same port.

``cut()`` and ``restore()`` are synchronous and take effect at once for new connections; the
proxy's own task does the closing. Guarantees: bytes are forwarded in order in each direction;
a connection half closed by one side is closed on both; nothing of a cut connection is
forwarded after ``cut()`` returned (each pipe's cancel scope is cancelled before it returns).
"""

from __future__ import annotations

import attrs
import trio


@attrs.define(eq=False)
class FaultProxy:
    upstream_port: int
    upstream_host: str = "127.0.0.1"
    port: int = 0
    accepted: int = 0
    cuts: int = 0
    _down: bool = False
    _up: trio.Event = attrs.Factory(trio.Event)
    _accept_scope: trio.CancelScope | None = None
    _pipes: set[trio.CancelScope] = attrs.Factory(set)

    async def serve(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        """Forward until cancelled; ``started(port)`` once listening."""
        self._up.set()
        async with trio.open_nursery() as handlers:
            first = True
            while True:
                await self._up.wait()
                listeners = await trio.open_tcp_listeners(self.port, host="127.0.0.1")
                self.port = listeners[0].socket.getsockname()[1]
                with trio.CancelScope() as scope:
                    self._accept_scope = scope
                    if self._down:  # cut() came while we were opening: close again
                        scope.cancel()
                    if first:
                        first = False
                        task_status.started(self.port)
                    await trio.serve_listeners(self._handle, listeners, handler_nursery=handlers)
                self._accept_scope = None
                for listener in listeners:
                    await listener.aclose()

    def cut(self) -> None:
        """Close every connection and refuse new ones until ``restore()``."""
        self._down = True
        self.cuts += 1
        self._up = trio.Event()
        if self._accept_scope is not None:
            self._accept_scope.cancel()
        for scope in list(self._pipes):
            scope.cancel()

    def restore(self) -> None:
        """Accept and forward again, on the same port."""
        self._down = False
        self._up.set()

    async def _handle(self, client: trio.SocketStream) -> None:
        self.accepted += 1
        async with client:
            if self._down:
                return
            try:
                server = await trio.open_tcp_stream(self.upstream_host, self.upstream_port)
            except OSError:
                return
            scope = trio.CancelScope()
            self._pipes.add(scope)
            try:
                async with server:
                    with scope:
                        if self._down:
                            return
                        async with trio.open_nursery() as nursery:
                            nursery.start_soon(self._pump, client, server, nursery.cancel_scope)
                            nursery.start_soon(self._pump, server, client, nursery.cancel_scope)
            finally:
                self._pipes.discard(scope)

    @staticmethod
    async def _pump(
        source: trio.SocketStream, sink: trio.SocketStream, both: trio.CancelScope
    ) -> None:
        try:
            while data := await source.receive_some(65536):
                await sink.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        both.cancel()  # one side closed: close both
