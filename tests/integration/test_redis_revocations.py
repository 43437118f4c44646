"""RedisRevocations against a real Redis, beyond the Revocations contract: the changes stream
is trimmed to about ``max_changes``, and a follower behind the trimming is told so; what it
leaves in Redis; failures as ``Unavailable``."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

import pytest
import trio

from chatnode.adapters.redis import RedisRevocations, RespClient
from chatnode.core import errors
from chatnode.core.models import Revocation, RevocationKind
from tests.contracts.conftest import redis_test_clients
from tests.contracts.harness import require_service
from tests.redis_support import RedisAdmin

pytestmark = pytest.mark.integration


@pytest.fixture
async def redis() -> AsyncIterator[tuple[RedisAdmin, str]]:
    async with redis_test_clients(require_service("CHATNODE_TEST_REDIS_URL")) as (clients, prefix):
        yield clients[0], prefix


def token(n: int) -> Revocation:
    now = time.time_ns() // 1_000_000
    return Revocation(RevocationKind.TOKEN, now, now + 60_000, 1, f"t{n}")


async def test_a_follower_behind_the_trimming_reads_incomplete(
    redis: tuple[RedisAdmin, str],
) -> None:
    client, prefix = redis
    store = RedisRevocations(client, prefix, max_changes=10)
    start = await store.changes(None)
    assert start.cursor == "0-0"
    for n in range(5):
        await store.record(token(n))
    read = await store.changes(start.cursor)
    assert [r.token_id for r in read.revocations] == [f"t{n}" for n in range(5)]
    assert read.complete

    for n in range(5, 400):  # XADD MAXLEN ~ trims whole stream nodes (100 entries)
        await store.record(token(n))
    assert await client.xlen(f"{prefix}:revoked:changes") < 400
    behind = await store.changes(read.cursor, limit=1000)
    assert not behind.complete
    assert behind.revocations[-1].token_id == "t399"
    assert (await store.changes(behind.cursor)).complete


async def redis_time_ms(client: RedisAdmin) -> int:
    seconds, micros = await client.call("TIME")  # type: ignore[misc]
    assert isinstance(seconds, bytes) and isinstance(micros, bytes)
    return int(seconds) * 1000 + int(micros) // 1000


async def test_a_stream_lost_with_redis_data_reads_incomplete(
    redis: tuple[RedisAdmin, str],
) -> None:
    client, prefix = redis
    store = RedisRevocations(client, prefix)
    await store.record(token(1))
    cursor = (await store.changes(None)).cursor
    await client.delete([f"{prefix}:revoked:changes"])  # what a Redis restarted empty holds
    # A restart takes longer than a millisecond: the new stream's first id is past the cursor.
    while await redis_time_ms(client) <= int(cursor.split("-")[0]):  # noqa: ASYNC110 - Redis clock
        await trio.sleep(0.001)
    await store.record(token(2))
    after = await store.changes(cursor)
    assert [r.token_id for r in after.revocations] == ["t2"] and not after.complete


async def test_keys_expire_with_the_tokens_they_end(redis: tuple[RedisAdmin, str]) -> None:
    client, prefix = redis
    store = RedisRevocations(client, prefix)
    await store.record(token(1))
    ttl_ms = await client.pttl(f"{prefix}:revoked:token:t1")
    assert 0 < ttl_ms <= 60_000
    now = time.time_ns() // 1_000_000
    await store.record(Revocation(RevocationKind.ACCOUNT, now, now + 30_000, account_id=7))
    await store.record(Revocation(RevocationKind.ACCOUNT, now - 5, now + 90_000, account_id=7))
    assert await client.get(f"{prefix}:revoked:account:7") == str(now).encode()
    assert 30_000 < await client.pttl(f"{prefix}:revoked:account:7") <= 90_000


async def test_an_unreachable_redis_is_unavailable() -> None:
    async with RespClient.from_url("redis://127.0.0.1:1/0", timeout_s=0.5) as client:
        store = RedisRevocations(client, "p")
        with pytest.raises(errors.Unavailable):
            await store.record(token(1))
        with pytest.raises(errors.Unavailable):
            await store.lookup(account_id=1, token_id="t1")
        with pytest.raises(errors.Unavailable):
            await store.changes("0-0")
