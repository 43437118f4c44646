"""HTTP/1.1 connections: keep-alive, limits, timeouts, and the hand-off to WebSocket.

One task per connection (owned by the listener's nursery). A connection serves requests one
after another; each request head must arrive within ``handshake_timeout_s`` and an idle
keep-alive connection is closed after ``idle_timeout_s`` (a request's body, within
``handshake_timeout_s`` of its head). Malformed input gets a 4xx with a JSON error body and the
connection is closed; nothing a client sends can crash the node.

The bytes are ``wire/http.py``'s: a request is taken off the connection's buffer by its fast
path when the head is simple, else read by h11 fed the same buffer (its rules 1-2: one reading
of every byte stream, proven by a differential fuzz against h11); every response is written
by ``response_bytes`` (the bytes h11 would send) in one send. This module only receives,
sends and keeps the time.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Awaitable, Callable
from typing import TypeVar

import attrs
import h11
import trio

from chatnode.core import errors, validation
from chatnode.edge.errors import error_body, error_response_parts
from chatnode.wire.http import (
    NO_CONNECTION_INFO,
    NO_PROXIES,
    ConnectionInfo,
    Request,
    Response,
    TrustedProxies,
    check_framing,
    h11_head_bytes,
    h11_request,
    is_websocket_upgrade,
    read_simple,
    response_bytes,
)

log = logging.getLogger(__name__)

MAX_RECEIVE_BYTES = 64 * 1024


def peer_address(stream: trio.SocketStream) -> str:
    """The peer's IP address, ``""`` for a Unix socket (or a peer already gone)."""
    try:
        name = stream.socket.getpeername()
    except (OSError, AttributeError):  # AttributeError: a stream that is not a socket (tests)
        return ""
    return str(name[0]) if isinstance(name, tuple) else ""


@attrs.frozen
class Limits:
    max_header_bytes: int
    max_body_bytes: int
    handshake_timeout_s: float
    idle_timeout_s: float
    max_json_depth: int = validation.DEFAULT_MAX_JSON_DEPTH


class IdleConnections:
    """Keep-alive connections waiting for their next request; draining closes them at once."""

    def __init__(self) -> None:
        self._scopes: set[trio.CancelScope] = set()
        self.draining = False

    def drain(self) -> None:
        self.draining = True
        for scope in self._scopes:
            scope.cancel()

    def add(self, scope: trio.CancelScope) -> None:
        if self.draining:
            scope.cancel()
        self._scopes.add(scope)

    def discard(self, scope: trio.CancelScope) -> None:
        self._scopes.discard(scope)


Handler = Callable[[Request], Awaitable[Response]]
Accepted = TypeVar("Accepted")
UpgradeHandler = Callable[[Request, trio.SocketStream, bytes], Awaitable[Response | Accepted]]
"""Takes the request, the stream and bytes received past the request head. Returns a Response
to send instead (refused), or what it accepted, which ``serve_http_connection`` returns."""


async def serve_http_connection(
    stream: trio.SocketStream,
    limits: Limits,
    handle: Handler,
    upgrade: UpgradeHandler[Accepted],
    idle: IdleConnections,
    proxies: TrustedProxies = NO_PROXIES,
) -> Accepted | None:
    """Serve requests on one connection until it closes, times out, is upgraded or the server
    drains while it waits for a request. An accepted upgrade is returned with the stream open
    for the caller to serve and close; the request and the parser state are gone by then (an
    upgraded connection may live for days). Otherwise the stream is closed on return.

    Each request is read from ``received`` (the bytes past the previous request, so pipelined
    requests are served in order) by the fast path when its head is simple, by h11 otherwise
    (``wire/http.py`` rule 1).
    """
    received = bytearray()
    timeout_s = limits.handshake_timeout_s
    upgraded = False
    connection = ConnectionInfo(peer_address(stream), proxies, limits.max_json_depth)
    try:
        while True:
            read = await _read_request(stream, received, limits, timeout_s, idle, connection)
            if read is None:
                return None
            request, keep_alive = read
            if is_websocket_upgrade(request):
                answer = await upgrade(request, stream, bytes(received))
                if isinstance(answer, Response):
                    await stream.send_all(response_bytes(answer, close=True))
                    return None
                upgraded = True
                return answer
            response = await handle(request)
            head_only = request.method == "HEAD"
            await stream.send_all(
                response_bytes(response, close=not keep_alive, head_only=head_only)
            )
            if not keep_alive:
                return None
            timeout_s = limits.idle_timeout_s
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        return None
    finally:
        if not upgraded:
            with trio.move_on_after(1) as cleanup:
                cleanup.shield = True
                await stream.aclose()


async def _read_request(
    stream: trio.SocketStream,
    received: bytearray,
    limits: Limits,
    timeout_s: float,
    idle: IdleConnections,
    connection: ConnectionInfo = NO_CONNECTION_INFO,
) -> tuple[Request, bool] | None:
    """The next request (taken off ``received``, which keeps the bytes past it) and whether the
    connection stays open after its response; or None if the connection is done: closed by the
    client, drained, timed out (the head must be complete within ``timeout_s``), or answered
    with an error."""
    end = received.find(b"\r\n\r\n")
    eof = False
    if end < 0 and not _for_h11(received, limits.max_header_bytes):
        deadline = trio.current_time() + timeout_s
        with trio.CancelScope(deadline=deadline) as waiting:
            idle.add(waiting)
            try:
                end, eof = await _receive_head(stream, received, limits.max_header_bytes)
            finally:
                idle.discard(waiting)
        if waiting.cancelled_caught:
            if received and not idle.draining:
                await _send_error(stream, 408, "timeout", "the request took too long to arrive")
            return None
        if eof and not received:
            return None
    else:
        deadline = math.inf  # the head is here already: h11 sets a deadline for the body
    simple = read_simple(received, end, limits.max_header_bytes, connection)
    if simple is not None:
        return simple
    return await _read_with_h11(stream, received, eof, limits, deadline, idle, connection)


async def _receive_head(
    stream: trio.SocketStream, received: bytearray, max_header_bytes: int
) -> tuple[int, bool]:
    """Receive into ``received`` until it holds a CRLF-terminated head; returns the head's end
    (-1 when h11 must look: the client closed, the head is over the limit or uses bare LF line
    ends) and whether the client closed."""
    while True:
        data = await stream.receive_some(MAX_RECEIVE_BYTES)
        if not data:
            return -1, True
        scanned = max(0, len(received) - 3)
        received += data
        end = received.find(b"\r\n\r\n", scanned)
        if end >= 0:
            return end, False
        if _for_h11(received, max_header_bytes):
            return -1, False


def _for_h11(received: bytearray, max_header_bytes: int) -> bool:
    """Whether bytes without a CRLF-terminated head are for h11 to read or refuse: over the
    head limit, or with a head whose lines end in bare LF."""
    return len(received) > max_header_bytes or b"\n\n" in received or b"\n\r\n" in received


async def _read_with_h11(
    stream: trio.SocketStream,
    received: bytearray,
    eof: bool,
    limits: Limits,
    deadline: float,
    idle: IdleConnections,
    connection: ConnectionInfo = NO_CONNECTION_INFO,
) -> tuple[Request, bool] | None:
    """Read one request that is not simple with h11, fed the bytes already received: its body
    must arrive within ``handshake_timeout_s`` of its head. ``received`` then holds the bytes
    past it. Malformed input is answered with h11's error status (400, 431, 501) and None."""
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=limits.max_header_bytes)
    conn.receive_data(bytes(received))
    received.clear()
    if eof:
        conn.receive_data(b"")
    with trio.CancelScope(deadline=deadline) as waiting:
        idle.add(waiting)
        try:
            read = await _read_h11_request(conn, stream, limits, waiting, connection)
        except h11.RemoteProtocolError as exc:
            status = exc.error_status_hint
            code = "headers_too_large" if status == 431 else "malformed_request"
            await _send_error(stream, status, code, f"malformed HTTP request: {exc}")
            return None
        except errors.PayloadTooLarge as exc:
            await _send_error(stream, 413, exc.code, exc.message)
            return None
        finally:
            idle.discard(waiting)
    if waiting.cancelled_caught:
        if not idle.draining:
            await _send_error(stream, 408, "timeout", "the request took too long to arrive")
        return None
    if read is not None:
        received += conn.trailing_data[0]
    return read


async def _read_h11_request(
    conn: h11.Connection,
    stream: trio.SocketStream,
    limits: Limits,
    scope: trio.CancelScope,
    connection: ConnectionInfo = NO_CONNECTION_INFO,
) -> tuple[Request, bool] | None:
    """The request with its body (none for an upgrade) and whether it keeps the connection
    alive, or None if the client closed first or the head was over the limit (answered). Sets
    ``scope``'s deadline for the body. A head with both ``Transfer-Encoding`` and
    ``Content-Length`` is refused (``RemoteProtocolError``: 400, the connection closes;
    ``wire/http.py`` rule 2)."""
    event = await _next_event(conn, stream)
    if isinstance(event, h11.ConnectionClosed):
        return None
    assert isinstance(event, h11.Request)
    check_framing(event)
    if h11_head_bytes(event) > limits.max_header_bytes:
        await _send_error(
            stream,
            431,
            "headers_too_large",
            f"request head is over the limit of {limits.max_header_bytes} bytes",
        )
        return None
    request, keep_alive = h11_request(event, b"", connection)
    if is_websocket_upgrade(request):
        return request, keep_alive
    scope.deadline = trio.current_time() + limits.handshake_timeout_s
    body = await _read_body(conn, stream, limits.max_body_bytes)
    return attrs.evolve(request, body=body), keep_alive


async def _next_event(conn: h11.Connection, stream: trio.SocketStream) -> h11.Event:
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            data = await stream.receive_some(MAX_RECEIVE_BYTES)
            conn.receive_data(data)
            continue
        assert not isinstance(event, type)  # PAUSED cannot happen before a request
        return event


async def _read_body(conn: h11.Connection, stream: trio.SocketStream, max_bytes: int) -> bytes:
    chunks: list[bytes] = []
    size = 0
    while True:
        event = await _next_event(conn, stream)
        if isinstance(event, h11.Data):
            size += len(event.data)
            if size > max_bytes:
                raise errors.PayloadTooLarge(f"request body is over the limit of {max_bytes} bytes")
            chunks.append(event.data)
        elif isinstance(event, h11.EndOfMessage):
            return b"".join(chunks)
        elif isinstance(event, h11.ConnectionClosed):
            raise trio.BrokenResourceError("client closed mid-body")


async def _send_error(stream: trio.SocketStream, status: int, code: str, message: str) -> None:
    await send_refusal(stream, Response(status, error_body(code, message)))


async def send_refusal(stream: trio.SocketStream, response: Response) -> None:
    """Send ``response`` with ``Connection: close`` (within a second, if the client is still
    there): for errors, and for an upgraded request that was refused after all."""
    try:
        with trio.move_on_after(1):
            await stream.send_all(response_bytes(response, close=True))
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        return


def error_response(error: errors.ChatError) -> Response:
    status, headers, body = error_response_parts(error)
    return Response(status, body, headers=tuple(headers))
