"""The HTTP/1.1 connection loop without sockets: the fast path for requests without a body,
the fall-back to h11 for everything else on the same connection, limits, timeouts, keep-alive
and the hand-off to the upgrade handler (the bytes themselves: ``tests/wire/test_http.py``)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any, cast

import attrs
import pytest
import trio
import trio.testing

from chatnode.edge.http import IdleConnections, Limits, serve_http_connection
from chatnode.wire.http import Request, Response

LIMITS = Limits(
    max_header_bytes=1024, max_body_bytes=1024, handshake_timeout_s=10, idle_timeout_s=10
)


async def echo(request: Request) -> Response:
    return Response.json(200, {**attrs.asdict(request), "body": request.body.decode()})


@attrs.define
class Served:
    client: trio.abc.Stream
    idle: IdleConnections
    upgrades: list[tuple[Request, bytes]] = attrs.Factory(list)
    result: list[object] = attrs.Factory(list)
    done: trio.Event = attrs.Factory(trio.Event)
    received: bytes = b""

    async def response(self) -> tuple[int, dict[str, str], bytes]:
        """The next response (our responses always have a Content-Length)."""
        while b"\r\n\r\n" not in self.received:
            await self._receive()
        head, _, self.received = self.received.partition(b"\r\n\r\n")
        status_line, *lines = head.decode("latin-1").split("\r\n")
        headers = dict(line.split(": ", 1) for line in lines)
        length = int(headers["Content-Length"])
        while len(self.received) < length:
            await self._receive()
        body, self.received = self.received[:length], self.received[length:]
        return int(status_line.split(" ")[1]), headers, body

    async def json(self) -> tuple[int, dict[str, str], Any]:
        status, headers, body = await self.response()
        return status, headers, json.loads(body)

    async def closed(self) -> None:
        """The server closes the connection with nothing more to say."""
        assert await self.client.receive_some() == b""
        assert self.received == b""
        await self.done.wait()

    async def _receive(self) -> None:
        data = await self.client.receive_some()
        assert data, f"connection closed with {self.received!r} left"
        self.received += data


@asynccontextmanager
async def served(limits: Limits = LIMITS, refuse: bool = False) -> AsyncIterator[Served]:
    client, server = trio.testing.memory_stream_pair()
    conn = Served(client, IdleConnections())

    async def upgrade(request: Request, stream: object, rest: bytes) -> Response | str:
        conn.upgrades.append((request, rest))
        return Response(403, b"{}") if refuse else "accepted"

    async def run() -> None:
        stream = cast(trio.SocketStream, server)
        conn.result.append(await serve_http_connection(stream, limits, echo, upgrade, conn.idle))
        conn.done.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(run)
        yield conn
        nursery.cancel_scope.cancel()


def get(path: str, *extra: str, version: str = "1.1") -> bytes:
    return "\r\n".join([f"GET {path} HTTP/{version}", "Host: x", *extra, "", ""]).encode()


async def test_keep_alive_serves_requests_one_after_another() -> None:
    async with served() as conn:
        for i in range(3):
            await conn.client.send_all(get(f"/v1/rooms?page={i}&q", "Authorization: Bearer t"))
            status, headers, body = await conn.json()
            assert status == 200 and "Connection" not in headers
            assert body["path"] == "/v1/rooms" and body["query"] == {"page": str(i), "q": ""}
            assert body["headers"] == {"host": "x", "authorization": "Bearer t"}
        assert not conn.done.is_set()


async def test_pipelined_requests_in_one_buffer_are_answered_in_order() -> None:
    pipelined = get("/a") + b"DELETE /b HTTP/1.1\r\nHost: x\r\n\r\n" + get("/c") + get("/d")[:9]
    async with served() as conn:
        await conn.client.send_all(pipelined)
        for method, path in [("GET", "/a"), ("DELETE", "/b"), ("GET", "/c")]:
            _, _, body = await conn.json()
            assert (body["method"], body["path"]) == (method, path)
        await conn.client.send_all(get("/d")[9:])
        assert (await conn.json())[2]["path"] == "/d"


@pytest.mark.parametrize(
    "request_bytes",
    [
        get("/", "Connection: close"),
        get("/", "Connection: keep-alive, Close"),
        get("/", version="1.0"),
        get("/", "Connection: keep-alive", version="1.0"),
        b"GET / HTTP/1.0\r\n\r\n",
        b"POST / HTTP/1.0\r\nContent-Length: 1\r\n\r\na",  # read by h11
        b"POST / HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: 1\r\n\r\na",
    ],
)
async def test_connection_close_and_http_1_0_close_after_the_response(request_bytes: bytes) -> None:
    async with served() as conn:
        await conn.client.send_all(request_bytes + get("/never"))
        status, headers, _ = await conn.response()
        assert status == 200 and headers["Connection"] == "close"
        await conn.closed()


async def test_head_gets_the_headers_without_the_body() -> None:
    async with served() as conn:
        await conn.client.send_all(b"HEAD / HTTP/1.1\r\nHost: x\r\n\r\n" + get("/next"))
        while b"\r\n\r\n" not in conn.received:
            await conn._receive()
        head, _, conn.received = conn.received.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200 OK\r\n") and b"Content-Length: " in head
        assert (await conn.json())[2]["path"] == "/next"


async def test_requests_with_a_body_fall_back_to_h11_on_the_same_connection() -> None:
    chunked = (
        b"POST /c HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n"
    )
    sized = b"PUT /s HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhel"
    async with served() as conn:
        await conn.client.send_all(get("/first") + chunked + sized)
        assert (await conn.json())[2]["path"] == "/first"
        assert (await conn.json())[2]["body"] == "abc"
        await conn.client.send_all(b"lo" + get("/after") + b"DELETE /d HTTP/1.1\r\nHost: x\r\n\r\n")
        assert (await conn.json())[2]["body"] == "hello"
        assert (await conn.json())[2]["path"] == "/after"
        assert (await conn.json())[2]["method"] == "DELETE"


async def test_odd_but_valid_heads_are_read_by_h11() -> None:
    async with served() as conn:
        folded = get("/f", "X-Folded: a", " b")  # obs-fold
        await conn.client.send_all(folded + b"GET /lf HTTP/1.1\nHost: x\n\n")  # and bare LF
        assert (await conn.json())[2]["headers"]["x-folded"] == "a b"
        assert (await conn.json())[2]["path"] == "/lf"
        await conn.client.send_all(get("http://x/abs?q=1"))  # absolute form
        assert (await conn.json())[2]["query"] == {"q": "1"}


@pytest.mark.parametrize(
    ("request_bytes", "status"),
    [
        (b"NOT HTTP AT ALL\r\n\r\n", 400),
        (b"GET  / HTTP/1.1\r\nHost: x\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\n\r\n", 400),  # no Host
        (get("/", "Host: y"), 400),  # two Hosts
        (get("/", "Bad Name: v"), 400),
        (get("/", "X: a\x00b"), 400),
        (get("/", "Content-Length: 1", "Content-Length: 2"), 400),
        (get("/", "Content-Length: x"), 400),
        (b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\n\r\n", 501),
        # RFC 9112 6.1: both framings at once may smuggle a request past a proxy
        (
            b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
            b"Content-Length: 5\r\n\r\n0\r\n\r\n",
            400,
        ),
        (get("/", "Content-Length: 0", "Transfer-Encoding: chunked") + b"0\r\n\r\n", 400),
    ],
)
async def test_malformed_requests_get_an_error_and_the_connection_closes(
    request_bytes: bytes, status: int
) -> None:
    async with served() as conn:
        await conn.client.send_all(request_bytes + get("/never"))
        got, headers, body = await conn.json()
        assert got == status and headers["Connection"] == "close"
        assert body["error"]["code"] == "malformed_request"
        await conn.closed()


@pytest.mark.parametrize("split", [False, True])
async def test_a_head_over_the_limit_gets_431(split: bool) -> None:
    big = get("/", "X-Big: " + "a" * LIMITS.max_header_bytes)
    async with served() as conn:
        if split:
            await conn.client.send_all(big[:100])
            await trio.testing.wait_all_tasks_blocked()
            await conn.client.send_all(big[100:])
        else:
            await conn.client.send_all(big)
        status, _, body = await conn.json()
        assert status == 431 and body["error"]["code"] == "headers_too_large"
        await conn.closed()


async def test_a_body_over_the_limit_gets_413() -> None:
    size = LIMITS.max_body_bytes + 1
    async with served() as conn:
        await conn.client.send_all(
            f"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: {size}\r\n\r\n".encode()
        )
        await conn.client.send_all(b"a" * size)
        status, _, body = await conn.json()
        assert status == 413 and body["error"]["code"] == "payload_too_large"
        await conn.closed()


@pytest.mark.parametrize("first", [True, False])
async def test_a_head_not_complete_by_its_deadline_gets_408(first: bool) -> None:
    limits = attrs.evolve(LIMITS, handshake_timeout_s=0.05, idle_timeout_s=0.05)
    async with served(limits) as conn:
        if not first:
            await conn.client.send_all(get("/"))
            await conn.response()
        await conn.client.send_all(b"GET / HTTP/1.1\r\nHo")  # and then nothing (slowloris)
        status, _, body = await conn.json()
        assert status == 408 and body["error"]["code"] == "timeout"
        await conn.closed()


async def test_a_body_not_complete_by_its_deadline_gets_408() -> None:
    limits = attrs.evolve(LIMITS, handshake_timeout_s=0.05)
    async with served(limits) as conn:
        await conn.client.send_all(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nab")
        assert (await conn.json())[0] == 408
        await conn.closed()


async def test_an_idle_keep_alive_connection_is_closed_quietly() -> None:
    limits = attrs.evolve(LIMITS, idle_timeout_s=0.05)
    async with served(limits) as conn:
        await conn.client.send_all(get("/"))
        await conn.response()
        await conn.closed()
        assert conn.result == [None]


async def test_draining_closes_a_connection_waiting_for_its_next_request() -> None:
    async with served() as conn:
        await conn.client.send_all(get("/"))
        await conn.response()
        await trio.testing.wait_all_tasks_blocked()
        conn.idle.drain()
        await conn.closed()
        assert conn.result == [None]


UPGRADE = get("/v1/chatrooms/1/join", "Upgrade: websocket", "Connection: Upgrade")


async def test_an_upgrade_reaches_the_upgrade_handler_with_the_bytes_past_its_head() -> None:
    async with served() as conn:
        await conn.client.send_all(get("/") + UPGRADE + b"\x81\x80frame")
        await conn.response()
        await conn.done.wait()
        assert conn.result == ["accepted"]
        [(request, rest)] = conn.upgrades
        assert request.path == "/v1/chatrooms/1/join" and request.headers["upgrade"] == "websocket"
        assert rest == b"\x81\x80frame"


async def test_a_refused_upgrade_is_answered_and_closed() -> None:
    async with served(refuse=True) as conn:
        await conn.client.send_all(UPGRADE)
        status, headers, _ = await conn.response()
        assert status == 403 and headers["Connection"] == "close"
        await conn.closed()
