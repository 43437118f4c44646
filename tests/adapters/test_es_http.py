"""HttpPool (``chatnode/adapters/es_http.py``) against small h11 servers on port 0: keep-alive
reuse, a stale idle connection sent again, chunked answers, failures as ``HttpUnreachable``,
and a cancelled request never leaving its connection in the pool. Also the Elasticsearch
adapter's request bodies and bulk answers, which need no server."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from functools import partial
from unittest.mock import ANY

import attrs
import h11
import pytest
import trio

from chatnode.adapters.elasticsearch import bulk_body, bulk_outcome, usable
from chatnode.adapters.elasticsearch.http import HttpPool, HttpUnreachable
from chatnode.core.models import ChatMessage

Answer = Callable[[h11.Request, bytes], Awaitable[tuple[int, list[bytes]]]]


@attrs.define
class Server:
    """Answers each request with ``answer(request, body) -> (status, body chunks)``; more
    than one chunk is sent chunked. ``close_after`` closes each connection after that many
    answers (an idle timeout on the server side)."""

    answer: Answer
    close_after: int = 0
    connections: int = 0
    requests: list[bytes] = attrs.Factory(list)

    async def serve(self, stream: trio.SocketStream) -> None:
        self.connections += 1
        conn = h11.Connection(h11.SERVER)
        answered = 0
        async with stream:
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    data = await stream.receive_some(65536)
                    if not data:
                        return
                    conn.receive_data(data)
                    continue
                if not isinstance(event, h11.Request):
                    continue
                request = event
                body = b""
                while not isinstance(event, h11.EndOfMessage):
                    event = conn.next_event()
                    if event is h11.NEED_DATA:
                        conn.receive_data(await stream.receive_some(65536))
                    elif isinstance(event, h11.Data):
                        body += event.data
                self.requests.append(body)
                status, chunks = await self.answer(request, body)
                headers = [("Content-Type", "application/json")]
                if len(chunks) == 1:
                    headers.append(("Content-Length", str(len(chunks[0]))))
                else:
                    headers.append(("Transfer-Encoding", "chunked"))
                out = conn.send(h11.Response(status_code=status, headers=headers)) or b""
                for chunk in chunks:
                    out += conn.send(h11.Data(data=chunk)) or b""
                out += conn.send(h11.EndOfMessage()) or b""
                await stream.send_all(out)
                answered += 1
                if answered == self.close_after:
                    return
                conn.start_next_cycle()


async def start(nursery: trio.Nursery, server: Server) -> HttpPool:
    listeners = await nursery.start(partial(trio.serve_tcp, server.serve, 0, host="127.0.0.1"))
    port = listeners[0].socket.getsockname()[1]
    return HttpPool.from_url(f"http://127.0.0.1:{port}")


async def echo(request: h11.Request, body: bytes) -> tuple[int, list[bytes]]:
    return 200, [request.target + b" " + body]


async def test_requests_reuse_one_connection(nursery: trio.Nursery) -> None:
    server = Server(echo)
    pool = await start(nursery, server)

    for n in range(3):
        response = await pool.request("POST", f"/x?n={n}", b"body")
        assert (response.status, response.body) == (200, f"/x?n={n} body".encode())

    assert server.connections == 1
    await pool.aclose()
    nursery.cancel_scope.cancel()


async def test_an_idle_connection_the_server_closed_is_replaced(nursery: trio.Nursery) -> None:
    server = Server(echo, close_after=1)
    pool = await start(nursery, server)

    assert (await pool.request("GET", "/a")).body == b"/a "
    await trio.sleep(0.05)  # the server's close reaches the idle connection
    assert (await pool.request("GET", "/b")).body == b"/b "

    assert server.connections == 2
    assert server.requests == [b"", b""]  # each request reached the server once
    nursery.cancel_scope.cancel()


async def test_a_chunked_answer_is_read_whole(nursery: trio.Nursery) -> None:
    async def chunked(request: h11.Request, body: bytes) -> tuple[int, list[bytes]]:
        return 404, [b'{"a":', b"1", b"}"]

    pool = await start(nursery, Server(chunked))

    response = await pool.request("GET", "/")

    assert (response.status, json.loads(response.body)) == (404, {"a": 1})
    nursery.cancel_scope.cancel()


async def test_nothing_listening_is_unreachable() -> None:
    with trio.socket.socket() as probe:  # a port that was free a moment ago
        await probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    pool = HttpPool.from_url(f"http://127.0.0.1:{port}")

    with pytest.raises(HttpUnreachable):
        await pool.request("GET", "/")


async def test_a_connection_closed_mid_answer_is_unreachable(nursery: trio.Nursery) -> None:
    async def serve_half(stream: trio.SocketStream) -> None:
        async with stream:
            await stream.receive_some(65536)
            await stream.send_all(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nshort")

    listeners = await nursery.start(partial(trio.serve_tcp, serve_half, 0, host="127.0.0.1"))
    pool = HttpPool.from_url(f"http://127.0.0.1:{listeners[0].socket.getsockname()[1]}")

    with pytest.raises(HttpUnreachable):
        await pool.request("GET", "/")
    nursery.cancel_scope.cancel()


async def test_a_cancelled_request_does_not_leave_its_connection_idle(
    nursery: trio.Nursery,
) -> None:
    release = trio.Event()

    async def slow(request: h11.Request, body: bytes) -> tuple[int, list[bytes]]:
        if request.target == b"/slow":
            await release.wait()
        return 200, [request.target]

    server = Server(slow)
    pool = await start(nursery, server)
    with trio.move_on_after(0.1) as scope:
        await pool.request("GET", "/slow")
    assert scope.cancelled_caught
    release.set()

    # The late answer to /slow is never read as the answer to /fast.
    assert (await pool.request("GET", "/fast")).body == b"/fast"
    assert server.connections == 2
    nursery.cancel_scope.cancel()


def test_from_url_reads_credentials_and_path() -> None:
    pool = HttpPool.from_url("https://elastic:p%40ss@es.example:9243/prefix/")

    assert (pool.host, pool.port, pool.base_path) == ("es.example", 9243, "/prefix")
    assert pool.tls is not None
    assert pool.authorization == "Basic ZWxhc3RpYzpwQHNz"  # elastic:p@ss
    with pytest.raises(ValueError, match="http"):
        HttpPool.from_url("redis://127.0.0.1:6379")


def test_bulk_body_is_one_create_and_one_document_per_message() -> None:
    messages = [
        ChatMessage(3, 1, "ann", 'say "hi"\n\\ \u00e9\U0001f600', 1_700_000_000_001),
        ChatMessage(3, 2, "b\ud800b", "lone \udfff surrogate", 1_700_000_000_002),
    ]

    lines = bulk_body([m.document for m in messages]).decode().split("\n")

    assert lines[-1] == ""
    assert [json.loads(line) for line in lines[:-1]] == [
        {"create": {"_id": "3:1"}},
        {
            "chatroom": 3,
            "offset": 1,
            "user": "ann",
            "message": 'say "hi"\n\\ \u00e9\U0001f600',
            "timestamp": 1_700_000_000_001,
        },
        {"create": {"_id": "3:2"}},
        {
            "chatroom": 3,
            "offset": 2,
            "user": "b\ufffdb",
            "message": "lone \ufffd surrogate",
            "timestamp": 1_700_000_000_002,
        },
    ]


@pytest.mark.parametrize(
    "document",
    [
        b'{"chatroom":3,"offset":1,"user":"a","message":"x\ny","timestamp":1}',  # a raw newline
        b'{"offset":1,"chatroom":3,"user":"a","message":"x","timestamp":1}',  # another order
        b'{"chatroom":3,"offset":0,"user":"a","message":"x","timestamp":1}',  # offset 0
        b'{"chatroom":-3,"offset":1,"user":"a","message":"x","timestamp":1}',
        b"garbage",
        b"",
    ],
)
def test_a_document_bulk_body_cannot_frame_is_sorted_out(document: bytes) -> None:
    good = ChatMessage(3, 2, "ann", "fine", 1_700_000_000_001).document

    with pytest.raises(ValueError):
        bulk_body([good, document])

    assert usable([document, good, document]) == (
        [good],
        [(document, ANY), (document, ANY)],
    )


def test_bulk_outcome_sorts_item_failures() -> None:
    def item(status: int, kind: str = "") -> dict[str, object]:
        error = {"type": kind, "reason": f"{kind} reason"} if kind else None
        return {"create": {"status": status, **({"error": error} if error else {})}}

    outcome = bulk_outcome(
        {
            "errors": True,
            "items": [
                item(201),
                item(409, "version_conflict_engine_exception"),
                item(400, "document_parsing_exception"),
                item(429, "es_rejected_execution_exception"),
                item(403, "cluster_block_exception"),
            ],
        }
    )

    assert outcome.refused == [
        (2, "HTTP 400 document_parsing_exception: document_parsing_exception reason")
    ]
    assert outcome.conflicts == [1]  # to be read back: the same message, or another
    assert [reason.split()[2] for reason in outcome.retry] == [
        "es_rejected_execution_exception:",
        "cluster_block_exception:",
    ]
    assert bulk_outcome({"errors": False}) == bulk_outcome({})
