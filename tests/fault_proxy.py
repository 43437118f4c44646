"""The fault-injecting TCP proxy (Trio) between chatnode and a backend server.

``FaultProxy(upstream_port)`` listens on a loopback port of its own and forwards every
connection to ``upstream_host:upstream_port`` (default host 127.0.0.1). Start it with
``port = await nursery.start(proxy.serve)``. Then:

- ``cut()``: the backend "goes down": every forwarded connection is closed and the listening
  socket is closed too, so a new connection is *refused* (ECONNREFUSED, as for a stopped
  server), not accepted and dropped; ``restore()``: the backend "comes back": the proxy
  listens again on the same port;
- ``drop()``: every forwarded connection is closed (a server restart, a network reset); new
  connections are forwarded as before;
- ``refusing = True``: new connections are accepted and closed at once (a server that drops
  them); ``wait_accepted(count)`` waits until ``count`` connections were accepted in all;
- ``freeze()``: the current connections stop forwarding without being closed (a half-open
  connection: a peer that vanished without a FIN); new connections are not affected.

``cut()``, ``drop()``, ``restore()`` and ``freeze()`` are synchronous and take effect at once
for new connections; the proxy's own task does the closing. Guarantees: bytes are forwarded
in order in each direction; a connection half closed by one side is closed on both; nothing of
a closed connection is forwarded after ``cut()`` or ``drop()`` returned (each pipe's cancel
scope is cancelled before it returns).
"""

from __future__ import annotations

import attrs
import trio


@attrs.define(eq=False)
class _Pipe:
    scope: trio.CancelScope
    flowing: trio.Event = attrs.Factory(trio.Event)


@attrs.define(eq=False)
class FaultProxy:
    upstream_port: int
    upstream_host: str = "127.0.0.1"
    port: int = 0
    accepted: int = 0
    cuts: int = 0
    refusing: bool = False
    _down: bool = False
    _up: trio.Event = attrs.Factory(trio.Event)
    _accept_scope: trio.CancelScope | None = None
    _pipes: set[_Pipe] = attrs.Factory(set)
    _accepting: trio.Event = attrs.Factory(trio.Event)

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
        self.drop()

    def restore(self) -> None:
        """Accept and forward again, on the same port."""
        self._down = False
        self._up.set()

    def drop(self) -> None:
        """Close every connection going through; new ones are forwarded."""
        for pipe in list(self._pipes):
            pipe.scope.cancel()

    def freeze(self) -> None:
        """Stop forwarding on the current connections, without closing them."""
        for pipe in self._pipes:
            pipe.flowing = trio.Event()

    async def wait_accepted(self, count: int) -> None:
        """Return once ``count`` connections were accepted in all."""
        while self.accepted < count:
            await self._accepting.wait()

    async def _handle(self, client: trio.SocketStream) -> None:
        self.accepted += 1
        self._accepting.set()
        self._accepting = trio.Event()
        async with client:
            if self._down or self.refusing:
                return
            try:
                server = await trio.open_tcp_stream(self.upstream_host, self.upstream_port)
            except OSError:
                return
            pipe = _Pipe(trio.CancelScope())
            pipe.flowing.set()
            self._pipes.add(pipe)
            try:
                async with server:
                    with pipe.scope:
                        if self._down:
                            return
                        async with trio.open_nursery() as nursery:
                            nursery.start_soon(self._pump, pipe, client, server, nursery)
                            nursery.start_soon(self._pump, pipe, server, client, nursery)
            finally:
                self._pipes.discard(pipe)

    @staticmethod
    async def _pump(
        pipe: _Pipe, source: trio.SocketStream, sink: trio.SocketStream, nursery: trio.Nursery
    ) -> None:
        try:
            while data := await source.receive_some(65536):
                await pipe.flowing.wait()
                await sink.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        nursery.cancel_scope.cancel()  # one side closed: close both
