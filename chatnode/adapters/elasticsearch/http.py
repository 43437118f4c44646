"""A small HTTP/1.1 client on Trio for Elasticsearch: :class:`HttpPool`.

Why not elasticsearch-py here: its ``AsyncElasticsearch`` on httpx spent 18-20 µs of node CPU
per archived document (9-10 ms per 500-document bulk: request building, serializing the NDJSON
lines one by one, the transport's node pool and retry layers, httpx) and ~2.5 ms per search;
the same bulk body POSTed through this client costs ~1.2 ms, most of it the kernel's copy of
the body, and a search ~0.7 ms. Why not h11 either: one request/response cycle through h11's
state machine costs ~95 µs, most of a search's own CPU; ES answers plain HTTP/1.1 (a
``Content-Length`` or a chunked body), which the few lines below read. elasticsearch-py
remains the admin client (``chatnode migrate``, tests); the archive's every call goes through
here.

Rules:

1. **Keep-alive pool.** A request takes an idle connection (the most recently used) or opens
   one; a connection whose exchange completed cleanly goes back to the pool, at most
   ``max_idle`` of them. Anything else -- an error, a cancellation, ``Connection: close``, a
   body delimited by the end of the connection -- closes it: a connection is never reused in
   an unknown state.
2. **Every request must be idempotent.** A request on a reused connection that fails before
   any byte of a response arrived (the server had closed the idle connection) is sent again on
   the next idle connection, or a new one, as browsers do.
3. **Failures are one exception.** Refused, reset, TLS errors, an answer that is not HTTP/1.x
   and an early EOF raise :class:`HttpUnreachable`. No timeouts here: the caller wraps a
   request in ``fail_after``; a cancelled request closes its connection.
"""

from __future__ import annotations

import base64
import ssl
from typing import Final
from urllib.parse import unquote, urlsplit

import attrs
import trio

_RECEIVE_BYTES: Final = 256 * 1024
_MAX_LINE_BYTES: Final = 64 * 1024
_NO_BODY_STATUSES: Final = frozenset({204, 304})
UNAVAILABLE_STATUSES: Final = frozenset({408, 429, 500, 502, 503, 504})
"""Answers meaning the server cannot serve the request now: retry later."""


class HttpUnreachable(Exception):
    """The server could not be reached, or the connection broke before the full response."""


@attrs.frozen
class HttpResponse:
    status: int
    body: bytes


@attrs.define(eq=False)
class _Connection:
    stream: trio.abc.Stream
    buffer: bytearray = attrs.Factory(bytearray)
    answered: bool = False
    """Some byte of the current exchange's response came (the connection was not stale)."""

    async def exchange(self, request: bytes, *, head_only: bool) -> tuple[HttpResponse, bool]:
        """Send ``request``, read its response; return it and whether the connection may be
        reused. ``head_only``: the request was HEAD (no body follows the headers)."""
        self.answered = False
        await self.stream.send_all(request)
        while True:
            version, status, headers = await self._head()
            if status >= 200:
                break  # a 1xx answer (100 Continue) is followed by the real one
        reusable = version == b"HTTP/1.1" and headers.get(b"connection") != b"close"
        if head_only or status in _NO_BODY_STATUSES:
            body = b""
        elif headers.get(b"transfer-encoding", b"").endswith(b"chunked"):
            body = await self._chunked()
        elif (length := headers.get(b"content-length")) is not None:
            body = await self._exactly(int(length))
        else:  # delimited by the end of the connection
            while True:
                try:
                    await self._fill()
                except _Closed:
                    break
            body, reusable = bytes(self.buffer), False
            self.buffer.clear()
        return HttpResponse(status, body), reusable and not self.buffer

    async def _head(self) -> tuple[bytes, int, dict[bytes, bytes]]:
        version, _, rest = (await self._line()).partition(b" ")
        if not version.startswith(b"HTTP/1."):
            raise HttpUnreachable(f"not an HTTP/1.x answer: {version[:40]!r}")
        status = int(rest[:3])
        headers = {}
        while line := await self._line():
            name, _, value = line.partition(b":")
            headers[name.strip().lower()] = value.strip().lower()
        return version, status, headers

    async def _chunked(self) -> bytes:
        parts = []
        while size := int((await self._line()).partition(b";")[0], 16):
            parts.append(await self._exactly(size))
            if await self._line():
                raise HttpUnreachable("a chunk longer than its size")
        while await self._line():  # trailers
            pass
        return b"".join(parts)

    async def _line(self) -> bytes:
        while (end := self.buffer.find(b"\r\n")) < 0:
            if len(self.buffer) > _MAX_LINE_BYTES:
                raise HttpUnreachable("an answer line longer than 64 KiB")
            await self._fill()
        line = bytes(self.buffer[:end])
        del self.buffer[: end + 2]
        return line

    async def _exactly(self, size: int) -> bytes:
        while len(self.buffer) < size:
            await self._fill()
        data = bytes(self.buffer[:size])
        del self.buffer[:size]
        return data

    async def _fill(self) -> None:
        data = await self.stream.receive_some(_RECEIVE_BYTES)
        if not data:
            raise _Closed("the server closed the connection")
        self.answered = True
        self.buffer += data


class _Closed(HttpUnreachable):
    """EOF from the server."""


@attrs.define(eq=False)
class HttpPool:
    """Requests to one HTTP(S) origin (see the module rules). Build with :meth:`from_url`."""

    host: str
    port: int
    tls: ssl.SSLContext | None = None
    base_path: str = ""
    authorization: str | None = None
    max_idle: int = 8
    _idle: list[_Connection] = attrs.field(factory=list, init=False)
    _closed: bool = attrs.field(default=False, init=False)

    @classmethod
    def from_url(cls, url: str, *, max_idle: int = 8) -> HttpPool:
        """A pool for ``http[s]://[user:password@]host[:port][/path]``."""
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"not an http(s) URL: {url!r}")
        tls = ssl.create_default_context() if parts.scheme == "https" else None
        authorization = None
        if parts.username is not None:
            user_password = f"{unquote(parts.username)}:{unquote(parts.password or '')}"
            authorization = "Basic " + base64.b64encode(user_password.encode()).decode()
        return cls(
            parts.hostname,
            parts.port or (443 if tls else 80),
            tls,
            parts.path.rstrip("/"),
            authorization,
            max_idle,
        )

    async def request(
        self, method: str, target: str, body: bytes = b"", *, content_type: str = "application/json"
    ) -> HttpResponse:
        """Send one request (``target`` is the path and query under the URL's path) and return
        the whole response. Raises :class:`HttpUnreachable`."""
        host = f"[{self.host}]" if ":" in self.host else self.host  # an IPv6 address
        head = f"{method} {self.base_path}{target} HTTP/1.1\r\nHost: {host}:{self.port}\r\n"
        head += f"Content-Length: {len(body)}\r\n"
        if body:
            head += f"Content-Type: {content_type}\r\n"
        if self.authorization:
            head += f"Authorization: {self.authorization}\r\n"
        request = (head + "\r\n").encode() + body
        head_only = method == "HEAD"
        while self._idle:
            connection = self._idle.pop()
            try:
                return await self._exchange(connection, request, head_only)
            except HttpUnreachable:
                if connection.answered:
                    raise
                # An idle connection the server had closed (rule 2): try the next one.
        return await self._exchange(await self._connect(), request, head_only)

    async def _exchange(
        self, connection: _Connection, request: bytes, head_only: bool
    ) -> HttpResponse:
        try:
            response, reusable = await connection.exchange(request, head_only=head_only)
        except (OSError, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            await trio.aclose_forcefully(connection.stream)
            raise HttpUnreachable(f"connection to {self.host}:{self.port} lost: {exc!r}") from exc
        except ValueError as exc:  # a number that is not one
            await trio.aclose_forcefully(connection.stream)
            raise HttpUnreachable(f"not a valid HTTP answer: {exc}") from exc
        except BaseException:
            await trio.aclose_forcefully(connection.stream)
            raise
        if reusable and not self._closed and len(self._idle) < self.max_idle:
            self._idle.append(connection)
        else:
            await trio.aclose_forcefully(connection.stream)
        return response

    async def _connect(self) -> _Connection:
        try:
            if self.tls is not None:
                stream: trio.abc.Stream = await trio.open_ssl_over_tcp_stream(
                    self.host, self.port, ssl_context=self.tls
                )
            else:
                stream = await trio.open_tcp_stream(self.host, self.port)
        except OSError as exc:
            raise HttpUnreachable(f"cannot connect to {self.host}:{self.port}: {exc}") from exc
        return _Connection(stream)

    async def aclose(self) -> None:
        """Close the idle connections; requests in flight close theirs when they end."""
        self._closed = True
        idle, self._idle = self._idle, []
        for connection in idle:
            await trio.aclose_forcefully(connection.stream)
        await trio.lowlevel.checkpoint()
