"""HTTP/1.1 request heads in, responses out (RFC 9112), sans-IO: the edge owns the socket.

One connection has one reader of its requests: :func:`read_simple` takes a request off the
connection's buffer when its head is simple (nearly every REST call), and h11 reads every
other request (bodies, chunked, obs-fold, bare LF, absolute targets, anything malformed),
fed the bytes the buffer holds, so odd input gets exactly h11's reading and h11's error status.

Rules:

1. The fast path reads a strict subset of what h11 reads, and reads it as h11 does (method,
   target, headers, keep-alive, and where the request ends: right after its blank line).
   Whatever it does not recognise as simple it leaves whole to h11, so the two never read one
   byte stream differently. This is proven, not assumed: ``tests/wire/test_http.py`` runs a
   differential fuzz against h11 (Hypothesis, a fixed budget of examples, in CI) over request
   lines, header whitespace and folding, duplicate and conflicting Content-Length,
   Transfer-Encoding, chunked bodies, pipelined requests and bad bytes.
2. Wherever a proxy in front and this server could read a request's framing differently, the
   request is refused with 400 and the connection closed: a head with both
   Transfer-Encoding and Content-Length (:func:`check_framing`, RFC 9112 §6.1; h11 would read
   it as chunked), and everything h11 refuses (conflicting Content-Lengths, bad bytes).
3. :func:`response_bytes` writes what h11 would send for a response, in one buffer.

Why two readers and not h11 alone: an h11 parse-and-respond cycle costs ~60 µs of CPU per
request, the fast path ~4 µs, out of ~200 µs a REST read costs the node in all (the
benchmark's ``GET /v1/chatrooms`` through nginx, docs/benchmarks.md). Why not the fast path
alone: bodies, chunked encoding and malformed input are where parsers go wrong; h11 has
the test depth for them.
"""

from __future__ import annotations

import ipaddress
import json
import re
from http import HTTPStatus
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import attrs
import h11

from chatnode.core import errors, validation

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


def parse_target(target: bytes) -> tuple[str, dict[str, str]]:
    parts = urlsplit(target.decode("latin-1"))
    return parts.path, dict(parse_qsl(parts.query, keep_blank_values=True))


def is_websocket_upgrade(request: Request) -> bool:
    return (
        request.method == "GET"
        and "websocket" in request.headers.get("upgrade", "").lower()
        and "upgrade" in request.headers.get("connection", "").lower()
    )


# -- the fast path (rule 1) ---------------------------------------------------------------

_TOKEN = rb"[-!#$%&'*+.^_`|~0-9a-zA-Z]+"
_REQUEST_LINE = re.compile(rb"(%s) (/[\x21-\x7e]*) HTTP/1\.([01])" % _TOKEN)
_HEADER_FIELD = re.compile(rb"(%s):[ \t]*((?:[^\x00\s]+(?:[ \t]+[^\x00\s]+)*)?)[ \t]*" % _TOKEN)
_SIMPLE_METHODS = frozenset({b"GET", b"HEAD", b"DELETE", b"OPTIONS"})


def read_simple(
    received: bytearray,
    end: int,
    max_header_bytes: int,
    connection: ConnectionInfo = NO_CONNECTION_INFO,
) -> tuple[Request, bool] | None:
    """The next request of ``received`` (whose first blank line starts at ``end``, -1 if
    none) and whether it keeps the connection alive, taken off the buffer, when its head is
    complete, within ``max_header_bytes`` and simple (:func:`parse_simple_head`); else None,
    the buffer untouched, for h11 to read (rule 1)."""
    if end < 0 or end > max_header_bytes:
        return None
    simple = parse_simple_head(bytes(received[:end]), connection)
    if simple is not None:
        del received[: end + 4]
    return simple


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


# -- what h11 read ------------------------------------------------------------------------


def check_framing(event: h11.Request) -> None:
    """Refuse a head with both ``Transfer-Encoding`` and ``Content-Length`` (rule 2):
    ``h11.RemoteProtocolError`` with status 400."""
    names = {name for name, _ in event.headers}
    if b"transfer-encoding" in names and b"content-length" in names:
        raise h11.RemoteProtocolError(
            "Transfer-Encoding together with Content-Length", error_status_hint=400
        )


def h11_head_bytes(event: h11.Request) -> int:
    """The size of a head h11 read, as the head limit counts it."""
    return len(event.target) + sum(len(k) + len(v) + 4 for k, v in event.headers)


def h11_request(
    event: h11.Request, body: bytes = b"", connection: ConnectionInfo = NO_CONNECTION_INFO
) -> tuple[Request, bool]:
    """The request h11 read, and whether it keeps the connection alive (as h11 decides)."""
    path, query = parse_target(event.target)
    headers = {k.decode().lower(): v.decode("latin-1") for k, v in event.headers}
    tokens = b",".join(value for name, value in event.headers if name == b"connection")
    close = b"close" in (token.strip() for token in tokens.lower().split(b","))
    keep_alive = event.http_version >= b"1.1" and not close
    return Request(event.method.decode(), path, query, headers, body, connection), keep_alive


# -- responses (rule 3) -------------------------------------------------------------------


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
