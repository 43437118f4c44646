"""The listener: accepts connections and serves HTTP and WebSocket on them.

Ownership: ``EdgeServer.serve`` owns the write batcher's tasks (its flusher, with the drain
and cutter tasks it starts, and the pinger) and, inside them, a nursery of connection tasks:
one task per connection, HTTP first, then the WebSocket it may be upgraded to.
``stop_accepting`` closes the listeners; ``serve`` then returns once every connection has
ended. Idle keep-alive HTTP connections are closed as soon as draining starts; WebSockets are
closed by the node.

Each listener's accept loop takes a slot of ``max_connections`` before it accepts, and the
connection's task gives it back when it ends (``edge/admission.py`` Rule 1): at the cap the
node stops accepting, so it never meets EMFILE, and a client waits in the kernel's backlog
rather than the node spinning on failed accepts (trio's ``serve_listeners`` sleeps 0.1 s and
logs a traceback per failure). If the process runs out of descriptors anyway (the backends
took more than ``fd_reserve``), the loop waits for a connection to end, or a second, and says
so once a minute.

A node listens on TCP and, when ``unix_socket`` is given, on that Unix socket too: nginx on the
same host proxies through it. Per proxied frame the kernel then does about half the work of TCP
loopback (no TCP/IP stack on either side: ~3.3 µs instead of ~7 µs per write and as much again
for nginx's read), which at a busy node's tens of thousands of frames a second is a large part
of its core (docs/benchmarks.md).
"""

from __future__ import annotations

import errno
import logging
import math
import os
import socket
import stat

import trio

from chatnode.core.errors import ChatError
from chatnode.edge import http
from chatnode.edge.admission import Admission, Caps
from chatnode.edge.connect import CONNECT_PATH, ConnectMember, accept_connect, serve_connect
from chatnode.edge.metrics import Metrics
from chatnode.edge.rest import Api
from chatnode.edge.websocket import WsMember, accept_websocket, serve_websocket
from chatnode.edge.ws_writer import WriteBatcher, WsSettings
from chatnode.node.service import ChatNode
from chatnode.wire.http import NO_PROXIES, Request, Response, TrustedProxies

log = logging.getLogger(__name__)


class EdgeServer:
    def __init__(
        self,
        node: ChatNode,
        *,
        http_limits: http.Limits,
        ws_settings: WsSettings,
        metrics: Metrics,
        proxies: TrustedProxies = NO_PROXIES,
        caps: Caps | None = None,
    ) -> None:
        self.node = node
        self.admission = Admission(
            caps
            or Caps.derive(
                max_connections=0, fd_reserve=64, max_websockets=0, per_user=100, per_address=500
            )
        )
        self._slots = trio.Semaphore(self.admission.caps.max_connections)
        self._slot_freed = trio.Event()
        self._fd_warned_at = -math.inf
        self._proxies = proxies
        self.metrics = metrics
        self.api = Api(node, metrics)
        self._http_limits = http_limits
        self._ws_settings = ws_settings
        self._accept_scope = trio.CancelScope()
        self._idle = http.IdleConnections()
        self.batcher = WriteBatcher(
            ping_interval_s=ws_settings.ping_interval_s, idle_timeout_s=ws_settings.idle_timeout_s
        )
        metrics.ws_closes = self.batcher.closes
        metrics.ws_refused = lambda: self.admission.refused

    async def serve(
        self,
        host: str,
        port: int,
        *,
        unix_socket: str = "",
        unix_socket_mode: int = 0o660,
        task_status: trio.TaskStatus[list[int]] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Listen on ``host:port`` (0 picks a port) and on ``unix_socket`` if given;
        ``started(ports)`` once listening."""
        listeners = await trio.open_tcp_listeners(port, host=host, backlog=4096)
        ports = [listener.socket.getsockname()[1] for listener in listeners]
        unix: UnixListener | None = None
        if unix_socket:
            try:
                unix = UnixListener.open(unix_socket, unix_socket_mode)
            except BaseException:
                for listener in listeners:
                    await listener.aclose()
                raise
            listeners.append(unix.listener)
        try:
            await self._serve(listeners, ports, task_status)
        finally:
            if unix is not None:
                unix.unlink()

    async def _serve(
        self,
        listeners: list[trio.SocketListener],
        ports: list[int],
        task_status: trio.TaskStatus[list[int]],
    ) -> None:
        async with trio.open_nursery() as batching:
            await batching.start(self.batcher.run)
            batching.start_soon(self.batcher.ping_forever)
            batching.start_soon(self.batcher.expire_forever)
            async with trio.open_nursery() as connections:
                with self._accept_scope:
                    async with trio.open_nursery() as accepting:
                        for listener in listeners:
                            accepting.start_soon(self._accept, listener, connections)
                        task_status.started(ports)
                for listener in listeners:
                    await listener.aclose()
            batching.cancel_scope.cancel()  # every connection ended: nothing left to flush

    def stop_accepting(self) -> None:
        self.metrics.draining = True
        self._accept_scope.cancel()
        self._idle.drain()

    async def _accept(self, listener: trio.SocketListener, connections: trio.Nursery) -> None:
        """Accept connections while a slot is free (module docstring)."""
        while True:
            await self._slots.acquire()
            try:
                stream = await listener.accept()
            except OSError as exc:
                self._slots.release()
                if exc.errno not in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    raise
                now = trio.current_time()
                if now - self._fd_warned_at >= 60:
                    self._fd_warned_at = now
                    log.warning(
                        "accept failed (%s) with %d connections open: waiting for one to end;"
                        " raise RLIMIT_NOFILE or CHATNODE_FD_RESERVE",
                        os.strerror(exc.errno or 0),
                        self.admission.caps.max_connections - self._slots.value,
                    )
                with trio.move_on_after(1):
                    await self._slot_freed.wait()
                continue
            except BaseException:
                self._slots.release()
                raise
            connections.start_soon(self._connection, stream)

    async def _connection(self, stream: trio.SocketStream) -> None:
        try:
            member = await http.serve_http_connection(
                stream, self._http_limits, self.api.handle, self._upgrade, self._idle, self._proxies
            )
            if isinstance(member, ConnectMember):
                await serve_connect(self.node, self.batcher, self.admission, member, stream)
            elif isinstance(member, WsMember):
                await serve_websocket(self.node, self.batcher, self.admission, member, stream)
        except Exception:
            log.exception("connection failed")
        finally:
            self._slots.release()
            self._slot_freed.set()
            self._slot_freed = trio.Event()

    async def _upgrade(
        self, request: Request, stream: trio.SocketStream, trailing: bytes
    ) -> Response | WsMember | ConnectMember:
        if request.path == CONNECT_PATH:
            self.metrics.ws_accepted += 1
            return await accept_connect(
                self.node,
                self._ws_settings,
                self.batcher,
                self.admission,
                request,
                stream,
                trailing,
            )
        try:
            self.api.route(request)
        except ChatError as exc:
            return http.error_response(exc)
        if not request.path.endswith("/join"):
            return await self.api.handle(request)
        self.metrics.ws_accepted += 1
        return await accept_websocket(
            self.node, self._ws_settings, self.batcher, self.admission, request, stream, trailing
        )


class UnixListener:
    """A listening Unix socket at ``path``, created with ``mode``."""

    def __init__(self, listener: trio.SocketListener, path: str) -> None:
        self.listener = listener
        self.path = path

    @classmethod
    def open(cls, path: str, mode: int, backlog: int = 4096) -> UnixListener:
        """Bind ``path``: a socket file left by a node that is gone is replaced; a path some
        process still accepts on, or a file that is not a socket, is an ``OSError``."""
        if _remove_if_stale(path) is False:
            raise OSError(errno.EADDRINUSE, f"{path}: another process listens on it")
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(path)
            os.chmod(path, mode)
            sock.listen(backlog)
        except BaseException:
            sock.close()
            raise
        return cls(trio.SocketListener(trio.socket.from_stdlib_socket(sock)), path)

    def unlink(self) -> None:
        """Once the listener is closed: remove the file unless another node listens on it
        now (one started on the same path meanwhile)."""
        try:
            _remove_if_stale(self.path)
        except OSError as exc:
            log.warning("leaving %s: %s", self.path, exc)


def _remove_if_stale(path: str) -> bool | None:
    """Remove the socket file at ``path`` if nobody accepts on it (True); False if some
    process does; None if there is no file. Not a socket: ``OSError``."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return None
    if not stat.S_ISSOCK(mode):
        raise OSError(errno.EEXIST, f"{path} exists and is not a socket")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except ConnectionRefusedError:
        os.unlink(path)
        return True
    finally:
        probe.close()
    return False
