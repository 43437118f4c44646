"""A small HTTP/1.1 client on Trio for Elasticsearch: :class:`HttpPool`.

Why not elasticsearch-py here: its ``AsyncElasticsearch`` on httpx spent 18-20 µs of node CPU
per archived document (9-10 ms per 500-document bulk: request building, serializing the NDJSON
lines one by one, the transport's node pool and retry layers, httpx) and ~2.5 ms per search;
the same bulk body POSTed through this client costs ~1.2 ms, most of it the kernel's copy of
the body, and a search ~0.7 ms (docs/benchmarks.md). elasticsearch-py remains the admin client
(``admin.py``: ``chatnode migrate``, tests); the archive's every call goes through here.

Rules:

1. **h11 reads and writes HTTP.** Each connection has an ``h11.Connection`` in the client
   role: it writes the request head and frames the body, and parses the response (status,
   ``Content-Length``, chunked, a body delimited by the end of the connection, 1xx answers,
   keep-alive), so chatnode has no hand-written HTTP response parser to keep in step with
   h11, which the edge (``edge/http.py``) reads requests with. This module does the I/O: a
   socket stream per connection, the pool, the failures. The price: an exchange through h11
   costs ~100-150 µs of CPU where a hand parser took ~10-15 µs (canned answers, no socket,
   on a loaded 2-core machine), ~0.1 µs per document of a 1,000-document bulk.
2. **Keep-alive pool.** A request takes an idle connection (the most recently used) or opens
   one; a connection whose exchange completed cleanly (h11 agrees both sides are ready for
   the next cycle, and nothing came after the response) goes back to the pool, at most
   ``max_idle`` of them. Anything else -- an error, a cancellation, ``Connection: close``, a
   body delimited by the end of the connection -- closes it: a connection is never reused in
   an unknown state.
3. **Every request must be idempotent.** A request on a reused connection that fails before
   any byte of a response arrived (the server had closed the idle connection) is sent again on
   the next idle connection, or a new one, as browsers do.
4. **Failures are one exception.** Refused, reset, TLS errors, an answer h11 cannot read
   (not HTTP/1.x, a head still unfinished past 64 KiB, a malformed chunk) and an early EOF raise
   :class:`HttpUnreachable`. No timeouts here: the caller wraps a request in ``fail_after``;
   a cancelled request closes its connection.
"""

from __future__ import annotations

import base64
import ssl
from typing import Final
from urllib.parse import unquote, urlsplit

import attrs
import h11
import trio

_RECEIVE_BYTES: Final = 256 * 1024
_MAX_HEAD_BYTES: Final = 64 * 1024
UNAVAILABLE_STATUSES: Final = frozenset({408, 429, 500, 502, 503, 504})
"""Answers meaning the server cannot serve the request now: retry later."""


class HttpUnreachable(Exception):
    """The server could not be reached, or the connection broke before the full response."""


@attrs.frozen
class HttpResponse:
    status: int
    body: bytes


def _new_h11() -> h11.Connection:
    return h11.Connection(h11.CLIENT, max_incomplete_event_size=_MAX_HEAD_BYTES)


@attrs.define(eq=False)
class _Connection:
    stream: trio.abc.Stream
    http: h11.Connection = attrs.Factory(_new_h11)
    answered: bool = False
    """Some byte of the current exchange's response came (the connection was not stale)."""

    async def exchange(self, request: h11.Request, body: bytes) -> tuple[HttpResponse, bool]:
        """Send ``request`` and its ``body``, read the response; return it and whether the
        connection may be reused (module rule 2)."""
        self.answered = False
        http = self.http
        head = http.send(request) or b""
        http.send_with_data_passthrough(h11.Data(data=body))  # framed by its Content-Length
        http.send(h11.EndOfMessage())
        await self.stream.send_all(head + body)
        status = 0
        parts: list[bytes] = []
        while True:
            event = http.next_event()
            if event is h11.NEED_DATA:
                data = await self.stream.receive_some(_RECEIVE_BYTES)
                if data:
                    self.answered = True
                # b"": the end of the connection; TLS streams hand out bytearrays
                http.receive_data(data if isinstance(data, bytes) else bytes(data))
            elif isinstance(event, h11.Response):
                status = event.status_code  # (an InformationalResponse, 1xx, is skipped)
            elif isinstance(event, h11.Data):
                parts.append(event.data)
            elif isinstance(event, h11.EndOfMessage):
                break
            elif isinstance(event, h11.ConnectionClosed):
                raise HttpUnreachable("the server closed the connection")
        reusable = (
            http.our_state is h11.DONE
            and http.their_state is h11.DONE
            and not http.trailing_data[0]
        )
        if reusable:
            http.start_next_cycle()
        return HttpResponse(status, b"".join(parts)), reusable


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
        headers = [("Host", self._host_header), ("Content-Length", str(len(body)))]
        if body:
            headers.append(("Content-Type", content_type))
        if self.authorization:
            headers.append(("Authorization", self.authorization))
        request = h11.Request(method=method, target=self.base_path + target, headers=headers)
        while self._idle:
            connection = self._idle.pop()
            try:
                return await self._exchange(connection, request, body)
            except HttpUnreachable:
                if connection.answered:
                    raise
                # An idle connection the server had closed (rule 3): try the next one.
        return await self._exchange(await self._connect(), request, body)

    @property
    def _host_header(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host  # an IPv6 address
        return f"{host}:{self.port}"

    async def _exchange(
        self, connection: _Connection, request: h11.Request, body: bytes
    ) -> HttpResponse:
        try:
            response, reusable = await connection.exchange(request, body)
        except (OSError, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            await trio.aclose_forcefully(connection.stream)
            raise HttpUnreachable(f"connection to {self.host}:{self.port} lost: {exc!r}") from exc
        except h11.RemoteProtocolError as exc:  # not HTTP/1.x, a cut body, a head too long
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
