"""RedisPresence against a real Redis, beyond the Presence contract: what it leaves in Redis
(only the users' last seen once connections are gone or reaped) and failures as
``Unavailable``."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from chatnode.adapters.redis import RedisPresence, RespClient
from chatnode.core import errors
from chatnode.core.models import PresenceEntry, Reaped
from tests.contracts.conftest import redis_test_clients
from tests.contracts.harness import require_service
from tests.redis_support import RedisAdmin

pytestmark = pytest.mark.integration


@pytest.fixture
async def redis() -> AsyncIterator[tuple[RedisAdmin, str]]:
    async with redis_test_clients(require_service("CHATNODE_TEST_REDIS_URL")) as (clients, prefix):
        yield clients[0], prefix


async def keys_of(client: RedisAdmin, prefix: str) -> set[str]:
    return {key.decode() async for key in client.scan_iter(f"{prefix}:*")}


async def test_removing_every_entry_leaves_only_node_bookkeeping(
    redis: tuple[RedisAdmin, str],
) -> None:
    client, prefix = redis
    presence = RedisPresence(client, prefix)
    entries = [PresenceEntry(room, "bob", "n1", f"c{room}") for room in (1, 2)]
    await presence.heartbeat("n1", ttl_ms=60_000)
    for e in entries:
        await presence.add(e)
    assert await presence.online(2) == ["bob"]

    for e in entries:
        await presence.remove(e)

    assert await keys_of(client, prefix) == {
        f"{prefix}:presence:nodes",
        f"{prefix}:presence:node:n1:alive",
        f"{prefix}:presence:last_seen",
    }


async def test_reaping_a_dead_node_removes_all_its_keys(redis: tuple[RedisAdmin, str]) -> None:
    client, prefix = redis
    presence = RedisPresence(client, prefix)
    for room in (1, 2, 3):
        await presence.add(PresenceEntry(room, "ghost", "dead-node", f"c{room}"))
    await presence.add(PresenceEntry(1, "ghost", "dead-node", "c1"))  # twice: counted once

    assert await presence.reap() == Reaped(3, ("ghost",))
    assert await keys_of(client, prefix) == {f"{prefix}:presence:last_seen"}


async def test_names_with_separators_stay_apart(redis: tuple[RedisAdmin, str]) -> None:
    client, prefix = redis
    presence = RedisPresence(client, prefix)
    tricky = PresenceEntry(1, 'a "b" 1 c', "node 1", "conn|1 ")
    plain = PresenceEntry(1, "a", "node", "1")
    await presence.add(tricky)
    await presence.add(plain)

    await presence.remove(plain)

    assert await presence.online(1) == ['a "b" 1 c']
    assert (await presence.reap()).entries == 1  # neither node heartbeated; one was left


async def test_an_unreachable_redis_is_unavailable() -> None:
    async with RespClient.from_url("redis://127.0.0.1:1/0", timeout_s=1.0) as client:
        presence = RedisPresence(client, "nowhere")
        entry = PresenceEntry(1, "bob", "n1", "c1")
        for call in (
            lambda: presence.add(entry),
            lambda: presence.remove(entry),
            lambda: presence.online(1),
            lambda: presence.heartbeat("n1", ttl_ms=1000),
            presence.reap,
            presence.check,
        ):
            with pytest.raises(errors.Unavailable):
                await call()
