"""RespClient against a real Redis: replies of every shape, pipelined calls from many tasks,
the handshake (client name, a refused password), scripts loaded on NOSCRIPT, pub/sub pushes in
order, and failures -- a killed, cut or silent connection, a refused one -- as ``Unavailable``,
each followed by a new connection with the next ``serial``. Connections are broken with
``CLIENT KILL`` or a TCP proxy in front of the shared server, never by restarting it."""

from __future__ import annotations

from collections.abc import AsyncIterator
from urllib.parse import urlsplit

import pytest
import trio
import trio.testing

from chatnode.adapters.redis import RespClient
from chatnode.adapters.redis.client import Script
from chatnode.core import errors
from chatnode.wire.resp import RespError
from tests.contracts.conftest import redis_test_clients
from tests.contracts.harness import require_service
from tests.fault_proxy import FaultProxy
from tests.redis_support import RedisAdmin

pytestmark = pytest.mark.integration


@pytest.fixture
def redis_url() -> str:
    return require_service("CHATNODE_TEST_REDIS_URL")


@pytest.fixture
async def redis(redis_url: str) -> AsyncIterator[tuple[RedisAdmin, str, RespClient]]:
    """An admin client, the test's key prefix, and a client whose connections are named
    after the prefix (so a test kills only its own)."""
    async with (
        redis_test_clients(redis_url) as (clients, prefix),
        RespClient.from_url(redis_url, timeout_s=5.0, client_name=prefix) as resp,
    ):
        yield clients[0], prefix, resp


@pytest.fixture
async def proxied(
    redis_url: str, nursery: trio.Nursery
) -> AsyncIterator[tuple[FaultProxy, RespClient]]:
    """A proxy in front of the test server and a client connected through it."""
    parts = urlsplit(redis_url)
    proxy = FaultProxy(parts.port or 6379, parts.hostname or "127.0.0.1")
    port = await nursery.start(proxy.serve)
    url = f"redis://127.0.0.1:{port}{parts.path}"
    async with RespClient.from_url(url, timeout_s=1.0) as client:
        yield proxy, client


# -- replies ------------------------------------------------------------------------------------


async def test_replies_of_every_shape(redis: tuple[RedisAdmin, str, RespClient]) -> None:
    _, prefix, resp = redis
    key = f"{prefix}:k"
    assert await resp.call("SET", key, b"") == b"OK"  # a simple string
    assert await resp.call("GET", key) == b""  # an empty bulk string
    assert await resp.call("GET", f"{prefix}:missing") is None  # a nil bulk string
    assert await resp.call("INCRBY", f"{prefix}:n", -12) == -12  # an integer
    assert await resp.call("MGET", key, f"{prefix}:missing") == [b"", None]
    assert await resp.call("XREAD", "COUNT", 1, "STREAMS", f"{prefix}:s", "0-0") is None  # nil *
    assert await resp.call("LRANGE", f"{prefix}:missing", 0, -1) == []
    script = "return {1, '', {2, {}}, redis.error_reply('MINE inside'), false}"
    nested = await resp.call("EVAL", script, 0)
    assert isinstance(nested, list) and len(nested) == 5
    assert nested[:3] == [1, b"", [2, []]] and nested[4] is None
    assert isinstance(nested[3], RespError) and nested[3].prefix == b"MINE"


async def test_a_reply_larger_than_many_reads_comes_back_whole(
    redis: tuple[RedisAdmin, str, RespClient],
) -> None:
    _, prefix, resp = redis
    value = bytes(range(256)) * 16_384  # 4 MiB, every byte value, "\r\n" inside
    assert await resp.call("SET", f"{prefix}:big", value) == b"OK"
    assert await resp.call("GET", f"{prefix}:big") == value
    assert await resp.call("STRLEN", f"{prefix}:big") == len(value)


async def test_arguments_are_binary_safe(redis: tuple[RedisAdmin, str, RespClient]) -> None:
    _, prefix, resp = redis
    for value in (b"\r\n", b"$3\r\nabc", b"*1\r\n:1\r\n", "zoë €", b"\x00\xff"):
        await resp.call("SET", f"{prefix}:v", value)
        expected = value.encode() if isinstance(value, str) else value
        assert await resp.call("GET", f"{prefix}:v") == expected


async def test_an_error_reply_raises_and_the_connection_goes_on(
    redis: tuple[RedisAdmin, str, RespClient],
) -> None:
    _, prefix, resp = redis
    await resp.call("SET", f"{prefix}:s", "x")
    with pytest.raises(RespError, match="WRONGTYPE") as caught:
        await resp.call("HSET", f"{prefix}:s", "f", "v")
    assert caught.value.prefix == b"WRONGTYPE"
    with pytest.raises(RespError, match="unknown command"):
        await resp.call("NO-SUCH-COMMAND")
    assert await resp.call("GET", f"{prefix}:s") == b"x"
    assert resp.connects == 1


# -- pipelining ---------------------------------------------------------------------------------


async def test_many_tasks_share_one_pipelined_connection(
    redis: tuple[RedisAdmin, str, RespClient],
) -> None:
    _, prefix, resp = redis
    results: dict[int, object] = {}

    async def incr(n: int) -> None:
        results[n] = await resp.call("INCRBY", f"{prefix}:n", n)

    async with trio.open_nursery() as nursery:
        for n in range(1, 201):
            nursery.start_soon(incr, n)

    assert await resp.call("GET", f"{prefix}:n") == str(sum(range(1, 201))).encode()
    assert sorted(results.values()) == sorted(set(results.values()))  # each saw its own reply
    assert resp.connects == 1


async def test_one_callers_commands_run_in_its_order(
    redis: tuple[RedisAdmin, str, RespClient],
) -> None:
    _, prefix, resp = redis
    echoes: dict[int, list[object]] = {}

    async def caller(n: int) -> None:
        echoes[n] = []
        for i in range(20):
            await resp.call("RPUSH", f"{prefix}:l{n}", i)
            echoes[n].append(await resp.call("ECHO", f"{n}:{i}"))

    async with trio.open_nursery() as nursery:
        for n in range(10):
            nursery.start_soon(caller, n)
    for n in range(10):
        assert await resp.call("LRANGE", f"{prefix}:l{n}", 0, -1) == [
            str(i).encode() for i in range(20)
        ]
        assert echoes[n] == [f"{n}:{i}".encode() for i in range(20)]


# -- handshake and scripts ------------------------------------------------------------------------


async def test_the_connection_carries_the_client_name(
    redis: tuple[RedisAdmin, str, RespClient],
) -> None:
    admin, prefix, resp = redis
    assert await resp.call("CLIENT", "GETNAME") == prefix.encode()
    assert any(info["name"] == prefix for info in await admin.client_list())


async def test_a_refused_password_is_unavailable(redis_url: str) -> None:
    parts = urlsplit(redis_url)
    url = f"redis://:not-the-password@{parts.hostname}:{parts.port or 6379}{parts.path}"
    async with RespClient.from_url(url, timeout_s=2.0) as resp:
        with pytest.raises(errors.Unavailable, match="refused"):
            await resp.call("PING")
        assert resp.connects == 0


async def test_a_script_is_sent_whole_when_redis_lacks_it(
    redis: tuple[RedisAdmin, str, RespClient],
) -> None:
    _, prefix, resp = redis
    script = Script(f"-- {prefix}\nreturn redis.call('INCR', KEYS[1]) + tonumber(ARGV[1])")
    assert await script.run(resp, [f"{prefix}:s"], [10]) == 11  # NOSCRIPT, then EVAL
    assert await script.run(resp, [f"{prefix}:s"], [10]) == 12  # EVALSHA
    with pytest.raises(RespError, match="WRONGTYPE"):
        await resp.call("HSET", f"{prefix}:s", "f", "v")


# -- pub/sub ------------------------------------------------------------------------------------


async def test_pushes_arrive_in_publish_order_with_the_answers_of_pings(
    redis: tuple[RedisAdmin, str, RespClient],
) -> None:
    admin, prefix, resp = redis
    channel = f"{prefix}:c".encode()
    conn = await resp.connect()
    got: list[object] = []
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(conn.write_forever)
            conn.send_nowait("SUBSCRIBE", channel)
            while len(got) < 1:
                got += await conn.receive()
            assert got == [[b"subscribe", channel, 1]]
            for n in range(50):
                await admin.publish(channel, b"m%d" % n)
                if n % 10 == 0:
                    conn.send_nowait("PING")
            while len(got) < 1 + 50 + 5:
                got += await conn.receive()
            nursery.cancel_scope.cancel()
    finally:
        await conn.aclose()
    messages = [push[2] for push in got if isinstance(push, list) and push[0] == b"message"]
    assert messages == [b"m%d" % n for n in range(50)]
    pongs = [push for push in got if isinstance(push, list) and push[0] == b"pong"]
    assert len(pongs) == 5


# -- failures -----------------------------------------------------------------------------------


async def test_a_killed_connection_fails_its_call_and_the_next_one_reconnects(
    redis: tuple[RedisAdmin, str, RespClient],
) -> None:
    admin, prefix, resp = redis
    assert await resp.call_tracked("PING") == (b"PONG", 1)
    assert await admin.kill_clients_named(prefix) == 1
    with pytest.raises(errors.Unavailable):
        await resp.call("PING")
    assert await resp.call_tracked("PING") == (b"PONG", 2)
    assert resp.connects == 2


async def test_a_cut_connection_fails_every_waiting_call_and_serial_moves_on(
    proxied: tuple[FaultProxy, RespClient],
) -> None:
    proxy, client = proxied
    assert await client.call_tracked("PING") == (b"PONG", 1)
    proxy.freeze()
    failures: list[errors.Unavailable] = []

    async def call() -> None:
        try:
            await client.call("PING")
        except errors.Unavailable as exc:
            failures.append(exc)

    async with trio.open_nursery() as nursery:
        for _ in range(5):
            nursery.start_soon(call)
        await trio.testing.wait_all_tasks_blocked()
        proxy.drop()
    assert len(failures) == 5
    assert await client.call_tracked("PING") == (b"PONG", 2)


async def test_a_silent_server_fails_the_call_within_the_timeout(
    proxied: tuple[FaultProxy, RespClient],
) -> None:
    proxy, client = proxied
    await client.call("PING")
    proxy.freeze()  # a peer that vanished without a FIN
    with pytest.raises(errors.Unavailable, match="no reply within"):
        await client.call("PING")
    assert await client.call_tracked("PING") == (b"PONG", 2)  # a new connection


async def test_a_refused_connection_is_unavailable_until_the_server_is_back(
    proxied: tuple[FaultProxy, RespClient],
) -> None:
    proxy, client = proxied
    proxy.refusing = True
    with pytest.raises(errors.Unavailable):
        await client.call("PING")
    with pytest.raises(errors.Unavailable):
        await client.connect()
    proxy.refusing = False
    assert await client.call_tracked("PING") == (b"PONG", 1)


async def test_nothing_listening_is_unavailable() -> None:
    async with RespClient.from_url("redis://127.0.0.1:1/0", timeout_s=1.0) as resp:
        with pytest.raises(errors.Unavailable, match="cannot connect"):
            await resp.call("PING")
        with pytest.raises(errors.Unavailable):
            await resp.connect()
