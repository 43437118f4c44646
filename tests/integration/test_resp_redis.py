"""RespClient against a real Redis: handshake (client name), pipelined calls from many
tasks, scripts loaded on NOSCRIPT, reconnect after a killed connection, refused connection."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
import trio

from chatnode.adapters.redis import RedisClient, RespClient
from chatnode.adapters.redis.client import RespError, Script
from chatnode.core import errors
from tests.contracts.conftest import redis_test_clients
from tests.contracts.harness import require_service

pytestmark = pytest.mark.integration


@pytest.fixture
async def redis() -> AsyncIterator[tuple[RedisClient, str, RespClient]]:
    url = require_service("CHATNODE_TEST_REDIS_URL")
    async with redis_test_clients(url) as (clients, prefix):
        resp = RespClient.from_url(url, timeout_s=5.0, client_name=prefix)
        try:
            yield clients[0], prefix, resp
        finally:
            await resp.aclose()


async def test_many_tasks_share_one_pipelined_connection(
    redis: tuple[RedisClient, str, RespClient],
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


async def test_the_connection_carries_the_client_name(
    redis: tuple[RedisClient, str, RespClient],
) -> None:
    admin, prefix, resp = redis
    assert await resp.call("CLIENT", "GETNAME") == prefix.encode()
    assert any(info["name"] == prefix for info in await admin.client_list())


async def test_a_script_is_sent_whole_when_redis_lacks_it(
    redis: tuple[RedisClient, str, RespClient],
) -> None:
    _, prefix, resp = redis
    script = Script(f"-- {prefix}\nreturn redis.call('INCR', KEYS[1]) + tonumber(ARGV[1])")
    assert await script.run(resp, [f"{prefix}:s"], [10]) == 11  # NOSCRIPT, then EVAL
    assert await script.run(resp, [f"{prefix}:s"], [10]) == 12  # EVALSHA
    with pytest.raises(RespError, match="WRONGTYPE"):
        await resp.call("HSET", f"{prefix}:s", "f", "v")


async def test_a_killed_connection_fails_its_call_and_the_next_one_reconnects(
    redis: tuple[RedisClient, str, RespClient],
) -> None:
    admin, prefix, resp = redis
    assert await resp.call("PING") == b"PONG"
    for info in await admin.client_list():
        if info["name"] == prefix:
            await admin.client_kill(identifier=int(info["id"]))
    with pytest.raises(errors.Unavailable):
        await resp.call("PING")
    assert await resp.call("PING") == b"PONG"
    assert resp.connects == 2


async def test_a_refused_connection_is_unavailable() -> None:
    resp = RespClient.from_url("redis://127.0.0.1:1/0", timeout_s=1.0)
    with pytest.raises(errors.Unavailable, match="cannot connect"):
        await resp.call("PING")
    with pytest.raises(errors.Unavailable):
        await resp.connect()
