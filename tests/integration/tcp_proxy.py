"""A loopback TCP proxy in front of a real server, to break connections on purpose.

- ``cut()`` closes every connection going through (a server restart, a network reset);
- ``refusing = True`` makes new connections close at once (the server is down);
- ``freeze()`` stops forwarding on the current connections without closing them (a half-open
  connection: a peer that vanished without a FIN); new connections are not affected.

Start it with ``port = await nursery.start(proxy.serve)``.
"""

from __future__ import annotations

import attrs
import trio


@attrs.define(eq=False)
class _Pipe:
    scope: trio.CancelScope
    flowing: trio.Event = attrs.field(factory=trio.Event)


@attrs.define(eq=False)
class TcpProxy:
    upstream_host: str
    upstream_port: int
    refusing: bool = False
    accepted: int = 0
    _pipes: set[_Pipe] = attrs.field(factory=set)
    _accepting: trio.Event = attrs.field(factory=trio.Event)

    async def serve(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        port = listeners[0].socket.getsockname()[1]
        async with trio.open_nursery() as nursery:
            await nursery.start(trio.serve_listeners, self._handle, listeners)
            task_status.started(port)

    def cut(self) -> None:
        for pipe in list(self._pipes):
            pipe.scope.cancel()

    def freeze(self) -> None:
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
            if self.refusing:
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
