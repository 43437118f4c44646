"""``ports.PushGate``, memory and Redis alike (``node/push.py`` rules 2-3,
``adapters/redis/push_gate.py``): one opener per window, the newest note kept, only the
holder closes, a renewed window goes on until a close finds nothing pending."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from chatnode.adapters.memory import MemoryPushGate
from chatnode.adapters.redis import RedisPushGate
from chatnode.core.ports import PushGate
from tests.contracts.conftest import redis_test_clients
from tests.contracts.harness import require_service

W = 60_000


@pytest.fixture(params=["memory", pytest.param("redis", marks=pytest.mark.integration)])
async def gate(request: pytest.FixtureRequest) -> AsyncIterator[PushGate]:
    if request.param == "memory":
        yield MemoryPushGate()
        return
    url = require_service("CHATNODE_TEST_REDIS_URL")
    async with redis_test_clients(url) as (clients, prefix):
        yield RedisPushGate(clients[0], prefix)


async def test_one_opener_the_newest_note_and_only_the_holder_closes(gate: PushGate) -> None:
    opened = await gate.open(1, ["bob", "cat"], offset=1, note=b"n1", token="a/1", window_ms=W)
    assert opened == ["bob", "cat"]
    assert await gate.open(1, ["bob", "dan"], offset=3, note=b"n3", token="b/1", window_ms=W) == [
        "dan"
    ]
    assert await gate.open(1, ["bob"], offset=2, note=b"n2", token="b/2", window_ms=W) == []
    assert await gate.open(2, ["bob"], offset=9, note=b"x", token="b/3", window_ms=W) == ["bob"]

    assert await gate.close(1, ["bob", "cat"], token="b/1", window_ms=W) == [None, None]
    assert await gate.close(1, ["bob", "cat"], token="a/1", window_ms=W) == [b"n3", None]
    # cat's window closed (nothing pending): the next message opens it again
    assert await gate.open(1, ["cat"], offset=4, note=b"n4", token="c/1", window_ms=W) == ["cat"]
    # bob's was renewed: held back again, then closed when nothing is pending
    assert await gate.open(1, ["bob"], offset=5, note=b"n5", token="c/2", window_ms=W) == []
    assert await gate.close(1, ["bob"], token="a/1", window_ms=W) == [b"n5"]
    assert await gate.close(1, ["bob"], token="a/1", window_ms=W) == [None]
    assert await gate.open(1, ["bob"], offset=6, note=b"n6", token="c/3", window_ms=W) == ["bob"]
