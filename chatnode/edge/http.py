"""HTTP/1.1 connections on h11: keep-alive, limits, timeouts, and the hand-off to WebSocket.

One task per connection (owned by the listener's nursery). A connection serves requests one
after another; each request head must arrive within ``handshake_timeout_s`` and an idle
keep-alive connection is closed after ``idle_timeout_s``. Malformed input gets a 4xx with a
JSON error body and the connection is closed; nothing a client sends can crash the node.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable
from http import HTTPStatus
from typing import Any, TypeVar
from urllib.parse import parse_qsl, urlsplit

import attrs
import h11
import trio

from chatnode.core import errors
from chatnode.edge.errors import error_body, error_response_parts

log = logging.getLogger(__name__)

MAX_RECEIVE_BYTES = 64 * 1024
_REASONS = {status.value: status.phrase.encode() for status in HTTPStatus}


@attrs.frozen
class Request:
    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    body: bytes = b""

    def json(self, *, required: bool = True) -> dict[str, Any]:
        if not self.body.strip():
            if required:
                raise errors.BadRequest("a JSON object body is required", code="invalid_json")
            return {}
        try:
            value = json.loads(self.body)
        except ValueError:
            raise errors.BadRequest("body is not valid JSON", code="invalid_json") from None
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


@attrs.frozen
class Limits:
    max_header_bytes: int
    max_body_bytes: int
    handshake_timeout_s: float
    idle_timeout_s: float


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
) -> Accepted | None:
    """Serve requests on one connection until it closes, times out, is upgraded or the server
    drains while it waits for a request. An accepted upgrade is returned with the stream open
    for the caller to serve and close; the request and the h11 state are gone by then (an
    upgraded connection may live for days). Otherwise the stream is closed on return."""
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=limits.max_header_bytes)
    timeout_s = limits.handshake_timeout_s
    upgraded = False
    try:
        while True:
            with trio.CancelScope() as waiting:
                idle.add(waiting)
                try:
                    request = await _read_request(conn, stream, limits, timeout_s)
                finally:
                    idle.discard(waiting)
            if waiting.cancelled_caught or request is None:
                return None
            if is_websocket_upgrade(request):
                answer = await upgrade(request, stream, conn.trailing_data[0])
                if isinstance(answer, Response):
                    await _respond(conn, stream, answer, close=True)
                    return None
                upgraded = True
                return answer
            response = await handle(request)
            await _respond(conn, stream, response, close=False)
            if conn.our_state is h11.MUST_CLOSE or conn.their_state is h11.MUST_CLOSE:
                return None
            conn.start_next_cycle()
            timeout_s = limits.idle_timeout_s
    except (trio.BrokenResourceError, trio.ClosedResourceError, h11.LocalProtocolError):
        return None
    finally:
        if not upgraded:
            with trio.move_on_after(1) as cleanup:
                cleanup.shield = True
                await stream.aclose()


async def _read_request(
    conn: h11.Connection, stream: trio.SocketStream, limits: Limits, timeout_s: float
) -> Request | None:
    """The next request with its body (none for an upgrade), or None if the connection is
    done: closed by the client, timed out, or answered with an error."""
    try:
        with trio.fail_after(timeout_s):
            event = await _next_event(conn, stream)
            if isinstance(event, h11.ConnectionClosed):
                return None
            assert isinstance(event, h11.Request)
            head_bytes = len(event.target) + sum(len(k) + len(v) + 4 for k, v in event.headers)
            if head_bytes > limits.max_header_bytes:
                await _send_error(
                    conn,
                    stream,
                    431,
                    "headers_too_large",
                    f"request head is over the limit of {limits.max_header_bytes} bytes",
                )
                return None
            path, query = parse_target(event.target)
            headers = {k.decode().lower(): v.decode("latin-1") for k, v in event.headers}
            request = Request(event.method.decode(), path, query, headers)
            if is_websocket_upgrade(request):
                return request
        with trio.fail_after(limits.handshake_timeout_s):
            body = await _read_body(conn, stream, limits.max_body_bytes)
        return attrs.evolve(request, body=body)
    except trio.TooSlowError:
        if conn.their_state is not h11.IDLE:
            await _send_error(conn, stream, 408, "timeout", "the request took too long to arrive")
        return None
    except h11.RemoteProtocolError as exc:
        status = exc.error_status_hint
        code = "headers_too_large" if status == 431 else "malformed_request"
        await _send_error(conn, stream, status, code, f"malformed HTTP request: {exc}")
        return None
    except errors.PayloadTooLarge as exc:
        await _send_error(conn, stream, 413, exc.code, exc.message)
        return None


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


async def _respond(
    conn: h11.Connection, stream: trio.SocketStream, response: Response, *, close: bool
) -> None:
    headers = [
        ("Content-Type", response.content_type),
        ("Content-Length", str(len(response.body))),
        *response.headers,
    ]
    if close:
        headers.append(("Connection", "close"))
    reason = _REASONS.get(response.status, b"")
    data = conn.send(h11.Response(status_code=response.status, headers=headers, reason=reason))
    data += conn.send(h11.Data(data=response.body)) if response.body else b""
    data += conn.send(h11.EndOfMessage())
    await stream.send_all(data)


async def _send_error(
    conn: h11.Connection, stream: trio.SocketStream, status: int, code: str, message: str
) -> None:
    if conn.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
        return
    response = Response(status, error_body(code, message))
    try:
        with trio.move_on_after(1):
            await _respond(conn, stream, response, close=True)
    except h11.LocalProtocolError:
        return


async def send_refusal(stream: trio.SocketStream, response: Response) -> None:
    """Answer an upgraded request that was refused after all (its h11 state is gone): the
    bytes h11 would send for ``response`` with ``Connection: close``."""
    head = [
        f"HTTP/1.1 {response.status} {_REASONS.get(response.status, b'').decode()}",
        f"Content-Type: {response.content_type}",
        f"Content-Length: {len(response.body)}",
        *(f"{name}: {value}" for name, value in response.headers),
        "Connection: close",
    ]
    try:
        with trio.move_on_after(1):
            await stream.send_all(
                ("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + response.body
            )
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        return


def error_response(error: errors.ChatError) -> Response:
    status, headers, body = error_response_parts(error)
    return Response(status, body, headers=tuple(headers))
