"""HTTP/1.1 connections: keep-alive, limits, timeouts, and the hand-off to WebSocket.

One task per connection (owned by the listener's nursery). A connection serves requests one
after another; each request head must arrive within ``handshake_timeout_s`` and an idle
keep-alive connection is closed after ``idle_timeout_s`` (a request's body, within
``handshake_timeout_s`` of its head). Malformed input gets a 4xx with a JSON error body and the
connection is closed; nothing a client sends can crash the node.

Requests without a body and with a plain head (``parse_simple_head``: nearly every GET) are
parsed by hand from the connection's buffer; everything else (bodies, chunked, obs-fold, bare
LF, absolute targets, anything malformed) is read by h11, fed the bytes already received, so
odd input gets exactly h11's reading and h11's error status. Why not h11 for all: an h11
parse-and-respond cycle cost ~60 us of CPU per request, the hand parse ~4 us, and the REST
reads cost the node ~200 us in all (the benchmark's GET /v1/chatrooms through nginx). Every
response is written by ``response_bytes`` (the bytes h11 would send) in one send.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import math
import re
from collections.abc import Awaitable, Callable
from http import HTTPStatus
from typing import Any, TypeVar
from urllib.parse import parse_qsl, urlsplit

import attrs
import h11
import trio

from chatnode.core import errors, validation
from chatnode.edge.errors import error_body, error_response_parts

log = logging.getLogger(__name__)

MAX_RECEIVE_BYTES = 64 * 1024
_REASONS = {status.value: status.phrase.encode() for status in HTTPStatus}


@attrs.frozen
class TrustedProxies:
    """Peers whose ``X-Real-IP`` / ``X-Forwarded-For`` headers name the client: the networks
    given (nginx's addresses), and every Unix-socket peer (only processes on this host reach
    it). From any other peer the headers are ignored: a client cannot choose its address."""

    networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()

    @classmethod
    def parse(cls, text: str) -> TrustedProxies:
        """``"127.0.0.1/8, ::1"``: comma-separated addresses or networks; ``ValueError``."""
        return cls(
            tuple(
                ipaddress.ip_network(part.strip(), strict=False)
                for part in text.split(",")
                if part.strip()
            )
        )

    def client(self, peer: str, headers: dict[str, str]) -> str:
        """The client's address of a request from ``peer`` (``""``: a Unix socket)."""
        if peer and not self._trusted(peer):
            return peer
        real_ip = headers.get("x-real-ip", "").strip()
        if real_ip:
            return real_ip
        forwarded = [a.strip() for a in headers.get("x-forwarded-for", "").split(",")]
        for address in reversed(forwarded):  # the nearest hop no trusted proxy added
            if address and not self._trusted(address):
                return address
        return peer or "unix"

    def _trusted(self, address: str) -> bool:
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return False
        return any(ip in network for network in self.networks)


NO_PROXIES: TrustedProxies = TrustedProxies()
"""Only Unix-socket peers are trusted."""


@attrs.frozen
class ConnectionInfo:
    """What every request of one connection shares: its peer's address (``""``: a Unix
    socket), the proxies trusted to name the client, and the deepest JSON a body may hold.
    Made once per connection: a request carries it by reference."""

    peer: str = ""
    proxies: TrustedProxies = NO_PROXIES
    max_json_depth: int = validation.DEFAULT_MAX_JSON_DEPTH


NO_CONNECTION_INFO: ConnectionInfo = ConnectionInfo()


@attrs.frozen
class Request:
    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    body: bytes = b""
    connection: ConnectionInfo = NO_CONNECTION_INFO

    @property
    def client(self) -> str:
        """The client's address as the edge determines it (:class:`TrustedProxies`): the
        peer's, or the one a trusted proxy (nginx) forwarded; ``"unix"`` for a Unix-socket
        peer that forwarded none. Worked out when asked: most requests never ask."""
        connection = self.connection
        return connection.proxies.client(connection.peer, self.headers)

    def json(self, *, required: bool = True) -> dict[str, Any]:
        """The body's JSON object (``core/validation.py`` Rule 2), or ``invalid_json``."""
        if not self.body.strip():
            if required:
                raise errors.BadRequest("a JSON object body is required", code="invalid_json")
            return {}
        value = validation.json_value(self.body, max_depth=self.connection.max_json_depth)
        if not isinstance(value, dict):
            raise errors.BadRequest("body must be a JSON object", code="invalid_json")
        return value

    @property
    def bearer_token(self) -> str | None:
        header = self.headers.get("authorization", "")
        if header[:7].lower() == "bearer ":
            return header[7:].strip() or None
        return self.query.get("token") or None


@attrs.frozen
class Response:
    status: int
    body: bytes = b""
    content_type: str = "application/json"
    headers: tuple[tuple[str, str], ...] = ()

    @classmethod
    def json(
        cls, status: int, value: object, headers: tuple[tuple[str, str], ...] = ()
    ) -> Response:
        return cls(status, json.dumps(value, ensure_ascii=False).encode(), headers=headers)


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


def parse_target(target: bytes) -> tuple[str, dict[str, str]]:
    parts = urlsplit(target.decode("latin-1"))
    return parts.path, dict(parse_qsl(parts.query, keep_blank_values=True))


def is_websocket_upgrade(request: Request) -> bool:
    return (
        request.method == "GET"
        and "websocket" in request.headers.get("upgrade", "").lower()
        and "upgrade" in request.headers.get("connection", "").lower()
    )


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
    requests are served in order) by the fast path when its head is simple, by h11 otherwise.
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
    if end >= 0 and end <= limits.max_header_bytes:
        simple = parse_simple_head(bytes(received[:end]), connection)
        if simple is not None:
            del received[: end + 4]
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


_TOKEN = rb"[-!#$%&'*+.^_`|~0-9a-zA-Z]+"
_REQUEST_LINE = re.compile(rb"(%s) (/[\x21-\x7e]*) HTTP/1\.([01])" % _TOKEN)
_HEADER_FIELD = re.compile(rb"(%s):[ \t]*((?:[^\x00\s]+(?:[ \t]+[^\x00\s]+)*)?)[ \t]*" % _TOKEN)
_SIMPLE_METHODS = frozenset({b"GET", b"HEAD", b"DELETE", b"OPTIONS"})


def parse_simple_head(
    head: bytes, connection: ConnectionInfo = NO_CONNECTION_INFO
) -> tuple[Request, bool] | None:
    """The request of a head (without its blank line) and whether it keeps the connection
    alive, or None when the head is not simple: then h11 reads it, and answers it if malformed.

    Simple means: a GET, HEAD, DELETE or OPTIONS request line with an origin-form target
    (no fragment), HTTP/1.1 with one Host header or HTTP/1.0, every header line a strict
    ``name: value`` (no obs-fold, no bare LF, no control bytes), no Transfer-Encoding and no
    Content-Length other than a single ``0``, so no body. Everything here is what h11 would
    read the same way; keep-alive follows h11 too (HTTP/1.0 or ``Connection: close`` closes).
    """
    lines = head.split(b"\r\n")
    line = _REQUEST_LINE.fullmatch(lines[0])
    if line is None:
        return None
    method, target, minor = line.groups()
    if method not in _SIMPLE_METHODS or b"#" in target or target.startswith(b"//"):
        return None
    headers: dict[str, str] = {}
    hosts = 0
    close = minor == b"0"
    for raw in lines[1:]:
        field = _HEADER_FIELD.fullmatch(raw)
        if field is None:
            return None
        name = field[1].decode().lower()
        value = field[2].decode("latin-1")
        if name == "host":
            hosts += 1
        elif name == "content-length":
            if value != "0" or name in headers:
                return None
        elif name == "transfer-encoding":
            return None
        elif name == "connection":
            close = close or "close" in (token.strip() for token in value.lower().split(","))
        headers[name] = value
    if hosts > 1 or (hosts == 0 and minor == b"1"):
        return None
    path, _, query = target.decode("latin-1").partition("?")
    query_args = dict(parse_qsl(query, keep_blank_values=True)) if query else {}
    return Request(method.decode(), path, query_args, headers, b"", connection), not close


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
    ``Content-Length`` is refused (``RemoteProtocolError``: 400, the connection closes), as
    RFC 9112 §6.1 asks of a server that does not trust the sender: h11 would read it as
    chunked, which a proxy in front may not have done (request smuggling)."""
    event = await _next_event(conn, stream)
    if isinstance(event, h11.ConnectionClosed):
        return None
    assert isinstance(event, h11.Request)
    names = {name for name, _ in event.headers}
    if b"transfer-encoding" in names and b"content-length" in names:
        raise h11.RemoteProtocolError(
            "Transfer-Encoding together with Content-Length", error_status_hint=400
        )
    head_bytes = len(event.target) + sum(len(k) + len(v) + 4 for k, v in event.headers)
    if head_bytes > limits.max_header_bytes:
        await _send_error(
            stream,
            431,
            "headers_too_large",
            f"request head is over the limit of {limits.max_header_bytes} bytes",
        )
        return None
    path, query = parse_target(event.target)
    headers = {k.decode().lower(): v.decode("latin-1") for k, v in event.headers}
    method = event.method.decode()
    tokens = b",".join(value for name, value in event.headers if name == b"connection")
    close = b"close" in (token.strip() for token in tokens.lower().split(b","))
    keep_alive = event.http_version >= b"1.1" and not close  # as h11 decides
    if is_websocket_upgrade(Request(method, path, query, headers)):
        return Request(method, path, query, headers, b"", connection), keep_alive
    scope.deadline = trio.current_time() + limits.handshake_timeout_s
    body = await _read_body(conn, stream, limits.max_body_bytes)
    return Request(method, path, query, headers, body, connection), keep_alive


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


def response_bytes(response: Response, *, close: bool, head_only: bool = False) -> bytes:
    """What h11 would send for ``response``: status line, Content-Type, Content-Length, the
    response's own headers, ``Connection: close`` when ``close``, then the body (none for an
    answer to HEAD), in one buffer for one send."""
    head = b"HTTP/1.1 %d %s\r\nContent-Type: %s\r\nContent-Length: %d\r\n" % (
        response.status,
        _REASONS.get(response.status, b""),
        response.content_type.encode("latin-1"),
        len(response.body),
    )
    for name, value in response.headers:
        head += b"%s: %s\r\n" % (name.encode("latin-1"), value.encode("latin-1"))
    if close:
        head += b"Connection: close\r\n"
    return head + b"\r\n" if head_only else head + b"\r\n" + response.body


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
