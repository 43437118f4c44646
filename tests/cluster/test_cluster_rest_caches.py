"""The REST read caches on two real node processes (cluster mode), each asked directly: a
node sees its own writes at once; the other node catches up (within the directory cache's
``local_ttl_s``, tested on a mock clock in tests/integration/test_redis_directory_cache.py;
here it is polled, a client has no event to wait on); a remembered token stops working when
its user is deleted."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import httpx
import pytest
import trio

from tests.cluster.cluster import running_cluster
from tests.cluster.harness import nginx_available

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(
        not nginx_available(), reason="nginx not installed (scripts/services install)"
    ),
]


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def token_for(client: httpx.AsyncClient, name: str) -> str:
    r = await client.post("/v1/users", json={"name": name, "password": "correct-horse-battery"})
    assert r.status_code == 201, r.text
    r = await client.post("/v1/tokens", json={"name": name, "password": "correct-horse-battery"})
    token: str = r.json()["token"]
    return token


async def eventually(check: Callable[[], Awaitable[bool]]) -> None:
    """Another node's cache catches up on its own: poll it (the test's guard bounds it)."""
    while not await check():  # noqa: ASYNC110 -- no event tells a client another node caught up
        await trio.sleep(0.02)


async def room_ids(client: httpx.AsyncClient, token: str) -> list[Any]:
    r = await client.get("/v1/chatrooms", headers=bearer(token))
    assert r.status_code == 200, r.text
    ids: list[Any] = r.json()["ids"]
    return ids


async def test_new_rooms_show_on_the_writing_node_at_once_and_on_the_other_soon() -> None:
    async with (
        running_cluster(nodes=2) as cluster,
        httpx.AsyncClient(base_url=cluster.node_url(0)) as one,
        httpx.AsyncClient(base_url=cluster.node_url(1)) as two,
    ):
        token = await token_for(one, "ann")
        assert await room_ids(one, token) == [] == await room_ids(two, token)  # both cached

        for name, writer, other in (("first", one, two), ("second", two, one)):
            r = await writer.post("/v1/chatrooms", json={"name": name}, headers=bearer(token))
            assert r.status_code == 201, r.text
            created = r.json()["id"]
            assert created in await room_ids(writer, token)

            async def other_sees_it(
                other: httpx.AsyncClient = other, created: int = created
            ) -> bool:
                return created in await room_ids(other, token)

            await eventually(other_sees_it)


async def test_a_remembered_token_stops_working_when_its_user_is_deleted() -> None:
    async with (
        running_cluster(nodes=2) as cluster,
        httpx.AsyncClient(base_url=cluster.node_url(0)) as one,
        httpx.AsyncClient(base_url=cluster.node_url(1)) as two,
    ):
        await token_for(one, "root")
        await cluster.grant_admin("root")
        r = await one.post("/v1/tokens", json={"name": "root", "password": "correct-horse-battery"})
        root = r.json()["token"]
        ann = await token_for(one, "ann")
        for node in (one, two):
            for _ in range(2):  # verified, then remembered
                assert (await node.get("/v1/chatrooms", headers=bearer(ann))).status_code == 200

        r = await one.request("DELETE", "/v1/users", headers=bearer(root))
        assert r.status_code == 200 and r.json()["deleted"] == 2, r.text

        r = await one.get("/v1/chatrooms", headers=bearer(ann))
        assert r.status_code == 401 and r.json()["error"]["code"] == "token_invalid"

        async def refused_on_two() -> bool:
            r = await two.get("/v1/chatrooms", headers=bearer(ann))
            return r.status_code == 401

        await eventually(refused_on_two)  # the node's user check lasts USER_CHECK_TTL_S
