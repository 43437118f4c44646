"""User presence across the cluster: two node processes behind nginx. A user connected on node 1
is online as seen from node 2 (``GET /v1/users/{name}`` and the ``presence`` frame of a
``/v1/connect`` partner there); once node 1 is killed (SIGKILL), the user goes offline with
``last_seen`` set within the presence TTL, reaped by node 2."""

from __future__ import annotations

import json
import time
from typing import Any

import httpx
import pytest
import trio
from trio_websocket import WebSocketConnection, open_websocket_url

from tests.cluster.cluster import running_cluster
from tests.cluster.harness import nginx_available
from tests.cluster.test_cluster_e2e import token_for

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(
        not nginx_available(), reason="nginx not installed (scripts/services install)"
    ),
]

TTL_S = 1.0


async def user_presence(ws: WebSocketConnection, user: str) -> dict[str, Any]:
    while True:
        frame: dict[str, Any] = json.loads(await ws.get_message())
        if frame["type"] == "presence" and "online" in frame and frame["user"] == user:
            return frame


async def test_a_user_on_a_killed_node_goes_offline_within_the_ttl() -> None:
    async with (
        running_cluster(nodes=2, presence_ttl_s=TTL_S) as cluster,
        httpx.AsyncClient(base_url=cluster.node_url(1), timeout=10) as node2,
    ):
        ann = await token_for(node2, "ann")
        bob = await token_for(node2, "bob")
        r = await node2.post(
            "/v1/direct", json={"user": "bob"}, headers={"Authorization": f"Bearer {ann}"}
        )
        assert r.status_code == 201, r.text
        node1_ws = f"ws://127.0.0.1:{cluster.node_ports[0]}"
        node2_ws = f"ws://127.0.0.1:{cluster.node_ports[1]}"

        async def bob_on_node1(task_status: trio.TaskStatus[None]) -> None:
            url = f"{node1_ws}/v1/connect?token={bob}"
            try:
                async with open_websocket_url(url, subprotocols=["chatnode.v1"]) as ws:
                    task_status.started()
                    while True:
                        await ws.get_message()
            except Exception:  # the node is killed under it
                return

        with trio.fail_after(30):
            url = f"{node2_ws}/v1/connect?token={ann}"
            async with (
                open_websocket_url(url, subprotocols=["chatnode.v1"]) as watcher,
                trio.open_nursery() as nursery,
            ):
                await nursery.start(bob_on_node1)
                online = await user_presence(watcher, "bob")
                assert online["online"] is True and online["chatroom"] is None
                r = await node2.get("/v1/users/bob", headers={"Authorization": f"Bearer {ann}"})
                assert r.json()["online"] is True

                killed_ms = time.time_ns() // 1_000_000
                killed_at = trio.current_time()
                cluster.nodes[0].kill()
                offline = await user_presence(watcher, "bob")
                took_s = trio.current_time() - killed_at
                assert offline["online"] is False
                assert offline["last_seen"] >= killed_ms
                # the heartbeat expires after the TTL; node 2 reaps every TTL/3
                assert took_s <= TTL_S * (1 + 1 / 3) + 1.5, took_s
                r = await node2.get("/v1/users/bob", headers={"Authorization": f"Bearer {ann}"})
                assert r.json() == {
                    "name": "bob",
                    "online": False,
                    "last_seen": offline["last_seen"],
                }
                nursery.cancel_scope.cancel()
