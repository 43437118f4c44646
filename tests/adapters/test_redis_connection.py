"""The Redis client's connections against a scripted server, on an in-memory stream and on a
real socket pair (read and written by descriptor): pipelining, replies matched in order whoever
reads, replies cut anywhere, error replies and the error table, a silent, broken or garbled
server, pub/sub pushes; and Redis URLs."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from chatnode.adapters.redis.client import RedisAddress, RespConnection, check
from chatnode.core import errors
from chatnode.wire.resp import ReplyParser, RespError


@pytest.mark.parametrize(
    ("url", "address"),
    [
        ("redis://127.0.0.1:6380/2", RedisAddress("127.0.0.1", 6380, db=2)),
        ("redis://localhost", RedisAddress("localhost", 6379)),
        (
            "rediss://u%40x:p%3Aw@cache:7000/0",
            RedisAddress("cache", 7000, tls=True, username="u@x", password="p:w"),
        ),
        ("redis://:secret@h:1?db=3", RedisAddress("h", 1, password="secret", db=3)),
        ("unix:///run/redis.sock?db=1", RedisAddress(unix_path="/run/redis.sock", db=1)),
    ],
)
def test_urls(url: str, address: RedisAddress) -> None:
    assert RedisAddress.from_url(url) == address


def test_not_a_redis_url() -> None:
    with pytest.raises(ValueError, match="not a Redis URL"):
        RedisAddress.from_url("http://127.0.0.1:6379")


def test_error_replies_raise_and_not_now_replies_are_unavailable() -> None:
    assert check(b"OK") == b"OK"
    with pytest.raises(RespError, match="WRONGTYPE"):
        check(RespError("WRONGTYPE Operation against a key"))
    for reply in ("LOADING Redis is loading", "OOM command not allowed", "READONLY replica"):
        with pytest.raises(errors.Unavailable):
            check(RespError(reply))


class Server:
    """The far end of a connection: reads commands, answers when told to."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self.parser = ReplyParser()
        self.commands: list[list[bytes]] = []
        self.writes = 0

    async def read_commands(self, count: int) -> list[list[bytes]]:
        while len(self.commands) < count:
            data = await self.stream.receive_some(65536)
            assert data, "client closed"
            self.writes += 1
            self.commands += self.parser.feed(data)
        return self.commands[:count]

    async def answer(self, raw: bytes) -> None:
        await self.stream.send_all(raw)


TRANSPORTS = ["memory", "socket"]


def pair(transport: str, timeout_s: float = 5.0) -> tuple[RespConnection, Server]:
    client: trio.abc.Stream
    server: trio.abc.Stream
    if transport == "memory":
        client, server = trio.testing.memory_stream_pair()
    else:
        a, b = trio.socket.socketpair()
        client, server = trio.SocketStream(a), trio.SocketStream(b)
    return RespConnection(client, timeout_s=timeout_s), Server(server)


async def echo_twenty_calls(conn: RespConnection, server: Server) -> None:
    """Twenty concurrent ECHO calls, answered in the order received, in two parts cut inside
    a reply (the parser waits): each caller must get its own reply."""
    replies: dict[int, object] = {}

    async def call(n: int) -> None:
        replies[n] = await conn.call("ECHO", n)

    async with trio.open_nursery() as nursery:
        for n in range(20):
            nursery.start_soon(call, n)
        commands = await server.read_commands(20)
        answer = b"".join(b"$%d\r\n%b\r\n" % (len(arg), arg) for _, arg in commands)
        await server.answer(answer[:37])
        await trio.testing.wait_all_tasks_blocked()
        await server.answer(answer[37:])

    assert sorted(commands) == sorted([b"ECHO", str(n).encode()] for n in range(20))
    assert replies == {n: str(n).encode() for n in range(20)}


async def test_calls_of_one_scheduler_pass_leave_in_one_write_and_get_their_own_replies() -> None:
    conn, server = pair("memory")
    await echo_twenty_calls(conn, server)
    assert server.writes == 1


async def test_on_a_socket_calls_are_written_at_once_and_get_their_own_replies() -> None:
    conn, server = pair("socket")
    await echo_twenty_calls(conn, server)
    passes = 0

    # The write itself is no scheduler pass: the command is out before the caller yields.
    class Counter(trio.abc.Instrument):
        def before_run_loop(self) -> None: ...

        def after_io_wait(self, timeout: float) -> None:
            nonlocal passes
            passes += 1

    async def answer_one() -> None:
        await server.read_commands(21)
        await server.answer(b"+PONG\r\n")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(answer_one)
        await trio.testing.wait_all_tasks_blocked()
        trio.lowlevel.add_instrument(Counter())
        assert await conn.call("PING") == b"PONG"
    assert passes <= 3  # write, server reads and answers, client reads: no pass to write


async def test_a_write_the_socket_does_not_take_whole_is_finished_in_order() -> None:
    conn, server = pair("socket")
    big = b"x" * 4_000_000  # more than the socket buffers hold
    got: dict[str, object] = {}

    async def call(*args: str | bytes) -> None:
        got[str(args[0])] = await conn.call(*args)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(call, "SET", "k", big)
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(call, "GET", "k")  # queued behind the unfinished write
        commands = await server.read_commands(2)
        await server.answer(b"+OK\r\n$1\r\nv\r\n")
    assert commands == [[b"SET", b"k", big], [b"GET", b"k"]]
    assert got == {"SET": b"OK", "GET": b"v"}


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_a_cancelled_caller_does_not_shift_the_replies_of_the_others(transport: str) -> None:
    conn, server = pair(transport)
    got: list[object] = []
    first = trio.CancelScope()

    async def cancelled() -> None:
        with first:
            await conn.call("GET", "a")

    async def second() -> None:
        got.append(await conn.call("GET", "b"))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(cancelled)
        await trio.testing.wait_all_tasks_blocked()  # "a" is sent, its caller reads
        nursery.start_soon(second)
        await server.read_commands(2)
        first.cancel()  # the reader goes away before any reply
        await trio.testing.wait_all_tasks_blocked()
        await server.answer(b"$1\r\nA\r\n$1\r\nB\r\n")

    assert got == [b"B"]


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_error_replies_are_returned_to_their_caller_only(transport: str) -> None:
    conn, server = pair(transport)
    got: list[object] = []

    async def call(*args: str) -> None:
        got.append(await conn.call(*args))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(call, "INCR", "x")
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(call, "PING")
        await server.read_commands(2)
        await server.answer(b"-WRONGTYPE not a number\r\n+PONG\r\n")

    assert isinstance(got[0], RespError) and str(got[0]) == "WRONGTYPE not a number"
    assert got[1] == b"PONG"


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_a_silent_server_fails_the_call_and_the_connection(transport: str) -> None:
    conn, server = pair(transport, timeout_s=0.05)
    with pytest.raises(errors.Unavailable, match="no reply within"):
        await conn.call("PING")
    assert conn.broken
    with pytest.raises(errors.Unavailable):
        await conn.call("PING")  # never reused
    assert len(await server.read_commands(1)) == 1


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_a_closed_connection_fails_every_waiting_call(transport: str) -> None:
    conn, server = pair(transport)
    failures: list[str] = []

    async def call() -> None:
        try:
            await conn.call("PING")
        except errors.Unavailable as exc:
            failures.append(str(exc))

    async with trio.open_nursery() as nursery:
        for _ in range(3):
            nursery.start_soon(call)
        await server.read_commands(3)
        await server.stream.aclose()

    assert len(failures) == 3
    assert conn.broken


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_a_reply_nobody_asked_for_fails_the_connection(transport: str) -> None:
    conn, server = pair(transport)
    got: list[object] = []

    async def call() -> None:
        got.append(await conn.call("PING"))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(call)
        await server.read_commands(1)
        await server.answer(b"+PONG\r\n+EXTRA\r\n")

    assert got == [b"PONG"]
    assert conn.broken
    with pytest.raises(errors.Unavailable, match="protocol error"):
        await conn.call("PING")


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_pushes_are_received_in_batches_and_sends_are_flushed_by_the_writer(
    transport: str,
) -> None:
    conn, server = pair(transport)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(conn.write_forever)
        conn.send_nowait("SUBSCRIBE", "a", "b")
        assert await server.read_commands(1) == [[b"SUBSCRIBE", b"a", b"b"]]
        await server.answer(
            b"*3\r\n$9\r\nsubscribe\r\n$1\r\na\r\n:1\r\n"
            b"*3\r\n$9\r\nsubscribe\r\n$1\r\nb\r\n:2\r\n"
            b"*3\r\n$7\r\nmessage\r\n$1\r\na\r\n$2\r\nhi\r\n"
        )
        pushes = await conn.receive()
        await server.stream.aclose()
        with pytest.raises(errors.Unavailable):
            await conn.receive()
    assert pushes == [
        [b"subscribe", b"a", 1],
        [b"subscribe", b"b", 2],
        [b"message", b"a", b"hi"],
    ]


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_replies_written_a_byte_at_a_time_reach_their_callers(transport: str) -> None:
    conn, server = pair(transport)
    got: dict[str, object] = {}
    answer = (
        b"*4\r\n$5\r\nhello\r\n$-1\r\n*2\r\n:-7\r\n-ERR inside\r\n*0\r\n"  # nested, nil, error
        b"$0\r\n\r\n"  # empty
        b"*-1\r\n"  # nil array
    )

    async def call(name: str) -> None:
        got[name] = await conn.call("ECHO", name)

    async with trio.open_nursery() as nursery:
        for name in ("first", "second", "third"):
            nursery.start_soon(call, name)
            await trio.testing.wait_all_tasks_blocked()
        await server.read_commands(3)
        for i in range(len(answer)):
            await server.answer(answer[i : i + 1])
            await trio.testing.wait_all_tasks_blocked()

    first = got["first"]
    assert isinstance(first, list) and first[:2] == [b"hello", None] and first[3] == []
    nested = first[2]
    assert isinstance(nested, list) and nested[0] == -7
    assert isinstance(nested[1], RespError) and str(nested[1]) == "ERR inside"
    assert got["second"] == b"" and got["third"] is None
    assert not conn.broken


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_bytes_that_are_not_resp_fail_every_waiting_call(transport: str) -> None:
    conn, server = pair(transport)
    failures: list[str] = []

    async def call() -> None:
        try:
            await conn.call("PING")
        except errors.Unavailable as exc:
            failures.append(str(exc))

    async with trio.open_nursery() as nursery:
        for _ in range(2):
            nursery.start_soon(call)
        await server.read_commands(2)
        await server.answer(b"!not resp\r\n")

    assert len(failures) == 2 and all("protocol error" in f for f in failures)
    assert conn.broken


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_a_garbled_push_fails_the_pubsub_connection(transport: str) -> None:
    conn, server = pair(transport)
    await server.answer(b"*3\r\n$7\r\nmessage\r\n$1\r\na\r\n$2\r\nhi\r\n?garbage\r\n")
    with pytest.raises(errors.Unavailable, match="protocol error"):
        await conn.receive()
    assert conn.broken
