"""HttpPool (``chatnode/adapters/elasticsearch/http.py``) against small servers on port 0: h11
servers for well-formed exchanges, raw ones that write exact bytes (chunk extensions,
trailers, a body delimited by the end of the connection, a server closing early). Keep-alive
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
    closed: trio.Event = attrs.Factory(trio.Event)
    """Set when the server closed a connection."""

    async def serve(self, stream: trio.SocketStream) -> None:
        self.connections += 1
        try:
            await self._serve(stream)
        finally:
            self.closed.set()

    async def _serve(self, stream: trio.SocketStream) -> None:
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
    await server.closed.wait()  # the idle connection is stale now
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
    arrived, release = trio.Event(), trio.Event()

    async def slow(request: h11.Request, body: bytes) -> tuple[int, list[bytes]]:
        if request.target == b"/slow":
            arrived.set()
            await release.wait()
        return 200, [request.target]

    server = Server(slow)
    pool = await start(nursery, server)
    with trio.CancelScope() as scope:
        nursery.start_soon(_cancel_when, arrived, scope)
        await pool.request("GET", "/slow")
    assert scope.cancelled_caught
    release.set()

    # The late answer to /slow is never read as the answer to /fast.
    assert (await pool.request("GET", "/fast")).body == b"/fast"
    assert server.connections == 2
    nursery.cancel_scope.cancel()


async def _cancel_when(event: trio.Event, scope: trio.CancelScope) -> None:
    await event.wait()
    scope.cancel()


# --- raw servers: the exact bytes of an answer -------------------------------------------------


async def read_request(stream: trio.SocketStream) -> bytes | None:
    """The head and the Content-Length body of the next request; None at EOF."""
    data = b""
    while b"\r\n\r\n" not in data:
        more = await stream.receive_some(65536)
        if not more:
            return None
        data += more
    head, _, body = data.partition(b"\r\n\r\n")
    length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
    while len(body) < length:
        body += await stream.receive_some(65536)
    return head


@attrs.define
class RawServer:
    """Answers the n-th request on any connection with ``answers[n]`` verbatim, then closes the
    connection if ``close`` (else reads the next request)."""

    answers: list[bytes]
    close: bool = False
    connections: int = 0
    heads: list[bytes] = attrs.Factory(list)

    async def serve(self, stream: trio.SocketStream) -> None:
        self.connections += 1
        async with stream:
            while (head := await read_request(stream)) is not None:
                self.heads.append(head)
                await stream.send_all(self.answers[len(self.heads) - 1])
                if self.close:
                    return


async def start_raw(nursery: trio.Nursery, server: RawServer) -> HttpPool:
    listeners = await nursery.start(partial(trio.serve_tcp, server.serve, 0, host="127.0.0.1"))
    return HttpPool.from_url(f"http://127.0.0.1:{listeners[0].socket.getsockname()[1]}")


async def test_chunk_extensions_trailers_and_a_1xx_answer_are_read(nursery: trio.Nursery) -> None:
    server = RawServer(
        [
            b"HTTP/1.1 100 Continue\r\n\r\n"
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
            b'3;ext=1\r\n{"a\r\n5\r\n":12}\r\n0\r\nX-Trailer: yes\r\n\r\n',
            b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}",
        ]
    )
    pool = await start_raw(nursery, server)

    first = await pool.request("GET", "/one")
    second = await pool.request("GET", "/two")

    assert (first.status, json.loads(first.body)) == (200, {"a": 12})
    assert (second.status, second.body) == (200, b"{}")
    assert server.connections == 1  # kept alive after a chunked answer
    nursery.cancel_scope.cancel()


async def test_a_chunked_answer_cut_mid_chunk_is_unreachable(nursery: trio.Nursery) -> None:
    server = RawServer(
        [b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nA\r\nonly5"], close=True
    )
    pool = await start_raw(nursery, server)

    with pytest.raises(HttpUnreachable):
        await pool.request("GET", "/")
    assert server.connections == 1  # bytes of an answer came: never sent again
    nursery.cancel_scope.cancel()


async def test_a_server_closing_after_the_head_is_unreachable(nursery: trio.Nursery) -> None:
    server = RawServer([b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n"], close=True)
    pool = await start_raw(nursery, server)

    with pytest.raises(HttpUnreachable):
        await pool.request("POST", "/_bulk", b"{}")
    nursery.cancel_scope.cancel()


async def test_a_new_connection_closed_before_answering_is_unreachable(
    nursery: trio.Nursery,
) -> None:
    server = RawServer([b"", b"", b""], close=True)  # reads the request, closes
    pool = await start_raw(nursery, server)

    with pytest.raises(HttpUnreachable):
        await pool.request("GET", "/")
    assert server.connections == 1  # a fresh connection is not retried
    nursery.cancel_scope.cancel()


async def test_a_body_delimited_by_the_end_of_the_connection_is_read_and_not_reused(
    nursery: trio.Nursery,
) -> None:
    server = RawServer(
        [b"HTTP/1.0 200 OK\r\n\r\nall of it", b"HTTP/1.0 200 OK\r\n\r\nagain"], close=True
    )
    pool = await start_raw(nursery, server)

    assert (await pool.request("GET", "/a")).body == b"all of it"
    assert (await pool.request("GET", "/b")).body == b"again"
    assert server.connections == 2
    nursery.cancel_scope.cancel()


async def test_connection_close_and_head_answers(nursery: trio.Nursery) -> None:
    server = RawServer(
        [
            b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n",  # HEAD: no body follows
            b"HTTP/1.1 404 Not Found\r\nConnection: close\r\nContent-Length: 2\r\n\r\n{}",
            b"HTTP/1.1 204 No Content\r\n\r\n",
        ]
    )
    pool = await start_raw(nursery, server)

    head = await pool.request("HEAD", "/index")
    closing = await pool.request("GET", "/gone")
    empty = await pool.request("DELETE", "/x")

    assert (head.status, head.body) == (200, b"")
    assert (closing.status, closing.body) == (404, b"{}")
    assert (empty.status, empty.body) == (204, b"")
    assert server.connections == 2  # reused after HEAD, not after Connection: close
    nursery.cancel_scope.cancel()


@pytest.mark.parametrize(
    "answer",
    [
        b"SSH-2.0-OpenSSH_9.6\r\n\r\n",  # not HTTP
        b"HTTP/1.1 200 OK\r\nContent-Length: nope\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
    ],
)
async def test_an_answer_that_is_not_valid_http_is_unreachable(
    nursery: trio.Nursery, answer: bytes
) -> None:
    pool = await start_raw(nursery, RawServer([answer], close=True))

    with pytest.raises(HttpUnreachable):
        await pool.request("GET", "/")
    nursery.cancel_scope.cancel()


async def test_a_head_unfinished_past_64_kib_is_unreachable(nursery: trio.Nursery) -> None:
    endless = b"HTTP/1.1 200 OK\r\n" + b"X-Long: " + b"a" * 70_000  # and the server waits
    pool = await start_raw(nursery, RawServer([endless]))

    with pytest.raises(HttpUnreachable):
        await pool.request("GET", "/")
    nursery.cancel_scope.cancel()


async def test_the_request_carries_host_length_type_and_credentials(
    nursery: trio.Nursery,
) -> None:
    server = RawServer([b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"] * 2)
    listeners = await nursery.start(partial(trio.serve_tcp, server.serve, 0, host="127.0.0.1"))
    port = listeners[0].socket.getsockname()[1]
    pool = HttpPool.from_url(f"http://user:pw@127.0.0.1:{port}/base")

    await pool.request("POST", "/_bulk?x=1", b"line\n", content_type="application/x-ndjson")
    await pool.request("GET", "/_cluster/health")

    posted, got = (head.decode().lower().split("\r\n") for head in server.heads)
    assert posted[0] == "post /base/_bulk?x=1 http/1.1"
    assert f"host: 127.0.0.1:{port}" in posted
    assert "content-length: 5" in posted
    assert "content-type: application/x-ndjson" in posted
    assert "authorization: basic dxnlcjpwdw==" in posted  # user:pw
    assert got[0] == "get /base/_cluster/health http/1.1"
    assert "content-length: 0" in got
    assert not any(line.startswith("content-type") for line in got)
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
