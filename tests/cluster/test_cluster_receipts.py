"""Receipts and offline delivery across the cluster: two node processes behind nginx on
MariaDB, Redis and Elasticsearch. A reader's ``read`` on one node reaches the sender on the
other as a ``receipt``; a member who goes away and comes back after ``OFFLINE`` messages were
sent on the other node gets every one of them, once, in order, from their ``delivered``
cursor."""

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
from tests.cluster.test_cluster_e2e import read_until_live, token_for

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(
        not nginx_available(), reason="nginx not installed (scripts/services install)"
    ),
]

OFFLINE = 3000
BATCH = 100


async def next_of(ws: WebSocketConnection, kind: str) -> dict[str, Any]:
    while True:
        frame: dict[str, Any] = json.loads(await ws.get_message())
        if frame["type"] == kind:
            return frame


@pytest.mark.deadline(120)
async def test_receipts_cross_nodes_and_an_offline_member_gets_everything_once() -> None:
    async with (
        running_cluster(nodes=2, room_log_length=2 * OFFLINE) as cluster,
        httpx.AsyncClient(base_url=cluster.url, timeout=10) as api,
    ):
        ann = await token_for(api, "ann")
        bob = await token_for(api, "bob")
        r = await api.post(
            "/v1/chatrooms", json={"name": "lobby"}, headers={"Authorization": f"Bearer {bob}"}
        )
        room = r.json()["id"]

        def url(node: int, path: str, token: str) -> str:
            return f"ws://127.0.0.1:{cluster.node_ports[node]}{path}?token={token}"

        with trio.fail_after(90):
            async with (
                open_websocket_url(
                    url(1, f"/v1/chatrooms/{room}/join", bob), subprotocols=["chatnode.v1"]
                ) as bob_ws,
                open_websocket_url(url(0, "/v1/connect", ann), subprotocols=["chatnode.v1"]) as c,
            ):
                await read_until_live(bob_ws)
                await c.send_message(json.dumps({"type": "subscribe", "chatroom": room}))
                await next_of(c, "live")  # ann is a member now, on node 0
                await bob_ws.send_message(json.dumps({"type": "send", "message": "hello"}))
                offset = (await next_of(bob_ws, "ack"))["offset"]
                while True:
                    frame = json.loads(await c.get_message())
                    if frame["type"] == "message" and frame["offset"] == offset:
                        break
                await c.send_message(
                    json.dumps({"type": "read", "chatroom": room, "offset": offset})
                )
                receipt = await next_of(bob_ws, "receipt")
                assert receipt == {
                    "type": "receipt",
                    "chatroom": room,
                    "user": "ann",
                    "delivered": offset,
                    "read": offset,
                }
            # ann is away (her cursor written as she left); bob sends OFFLINE on node 1
            started = time.monotonic()
            async with open_websocket_url(
                url(1, f"/v1/chatrooms/{room}/join", bob), subprotocols=["chatnode.v1"]
            ) as bob_ws:
                await read_until_live(bob_ws)
                for start in range(0, OFFLINE, BATCH):
                    for i in range(start, start + BATCH):
                        await bob_ws.send_message(
                            json.dumps({"type": "send", "message": f"m{i}", "id": f"m{i}"})
                        )
                    for _ in range(BATCH):
                        await next_of(bob_ws, "ack")
            sent_s = time.monotonic() - started
            async with open_websocket_url(
                url(0, "/v1/connect", ann), subprotocols=["chatnode.v1"]
            ) as c:
                frames = []
                while True:
                    frame = json.loads(await c.get_message())
                    frames.append(frame)
                    if frame["type"] == "live":
                        break
            got = [f for f in frames if f["type"] == "message"]
            assert not [f for f in frames if f["type"] == "gap"]
            assert [f["offset"] for f in got] == list(range(offset + 1, offset + OFFLINE + 1))
            assert [f["message"] for f in got] == [f"m{i}" for i in range(OFFLINE)]
            print(
                f"{OFFLINE} sent in {sent_s:.1f}s, resumed in {time.monotonic() - started - sent_s:.1f}s"
            )
