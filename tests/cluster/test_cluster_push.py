"""Push notifications across the cluster (``node/push.py``): two node processes behind nginx,
a real HTTP receiver in the test. Messages sent on both nodes to a member who is not
connected make exactly one webhook call per collapse window, whichever node published them;
a webhook that refuses connections or never answers delays no message and no ack."""

from __future__ import annotations

import json
import socket
from typing import Any

import httpx
import pytest
import trio
from trio_websocket import WebSocketConnection, open_websocket_url

from tests.cluster.cluster import Cluster, running_cluster
from tests.cluster.harness import nginx_available
from tests.cluster.test_cluster_e2e import read_until_live, token_for
from tests.push_receiver import Receiver

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(
        not nginx_available(), reason="nginx not installed (scripts/services install)"
    ),
]

COLLAPSE_S = 2.0


async def group_with_an_offline_member(api: httpx.AsyncClient) -> tuple[dict[str, str], int]:
    """ann's private room with bob and cat; the tokens."""
    tokens = {name: await token_for(api, name) for name in ("ann", "bob", "cat")}
    auth = {"Authorization": f"Bearer {tokens['ann']}"}
    r = await api.post("/v1/chatrooms", json={"name": "g", "visibility": "private"}, headers=auth)
    room: int = r.json()["id"]
    for user in ("bob", "cat"):
        r = await api.post(f"/v1/chatrooms/{room}/members", json={"user": user}, headers=auth)
        assert r.status_code == 201, r.text
    return tokens, room


def join_url(cluster: Cluster, node: int, room: int, token: str) -> str:
    port = cluster.node_ports[node]
    return f"ws://127.0.0.1:{port}/v1/chatrooms/{room}/join?token={token}"


async def send_acked(ws: WebSocketConnection, *texts: str) -> list[int]:
    """Send ``texts``; their offsets, from the acks."""
    for text in texts:
        await ws.send_message(json.dumps({"type": "send", "message": text}))
    offsets = []
    while len(offsets) < len(texts):
        frame: dict[str, Any] = json.loads(await ws.get_message())
        if frame["type"] == "ack":
            offsets.append(frame["offset"])
    return offsets


async def test_one_webhook_call_per_collapse_window_across_two_nodes() -> None:
    receiver = Receiver()
    async with trio.open_nursery() as nursery:
        await nursery.start(receiver.serve)
        async with (
            running_cluster(nodes=2, push_url=receiver.url, push_collapse_s=COLLAPSE_S) as cluster,
            httpx.AsyncClient(base_url=cluster.url, timeout=10) as api,
        ):
            tokens, room = await group_with_an_offline_member(api)
            with trio.fail_after(60):
                async with (
                    open_websocket_url(
                        join_url(cluster, 0, room, tokens["ann"]), subprotocols=["chatnode.v1"]
                    ) as ann,
                    open_websocket_url(
                        join_url(cluster, 1, room, tokens["bob"]), subprotocols=["chatnode.v1"]
                    ) as bob,
                ):
                    await read_until_live(ann)
                    await read_until_live(bob)
                    (first,) = await send_acked(ann, "one")
                    await receiver.wait_for(1)  # at once (leading edge), by node 1
                    await send_acked(bob, "two")  # on node 2: held back by node 1's window
                    (last,) = await send_acked(ann, "three")
                    await receiver.wait_for(2)  # the latest, at the window's end
                    (again,) = await send_acked(bob, "four")  # in the renewed window
                    await receiver.wait_for(3)
            bodies, times = receiver.bodies, receiver.times
            assert [b["user"] for b in bodies] == ["cat"] * 3  # never the connected ones
            assert [b["offset"] for b in bodies] == [first, last, again]
            assert [b["preview"] for b in bodies] == ["one", "three", "four"]
            assert [b["unread"] for b in bodies] == [1, 3, 4]
            assert [b["sender"] for b in bodies] == ["ann", "ann", "bob"]
            assert times[1] - times[0] >= 0.9 * COLLAPSE_S
            assert times[2] - times[1] >= 0.9 * COLLAPSE_S
            assert receiver.requests == 3
        nursery.cancel_scope.cancel()


async def test_a_webhook_down_or_hanging_delays_no_message() -> None:
    """Node 1's webhook refuses connections, node 2's never answers: members on both nodes
    still get every message and every ack while both hold notifications they retry."""
    hanging = Receiver(hang=True)
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    refused_url = f"http://127.0.0.1:{closed.getsockname()[1]}/hook"
    closed.close()
    async with trio.open_nursery() as nursery:
        await nursery.start(hanging.serve)
        async with (
            running_cluster(
                nodes=2,
                push_collapse_s=0.2,
                per_node_env=[
                    {"CHATNODE_PUSH_URL": refused_url},
                    {"CHATNODE_PUSH_URL": hanging.url},
                ],
                rate_burst=1000,
                rate_messages_per_s=1000.0,
            ) as cluster,
            httpx.AsyncClient(base_url=cluster.url, timeout=10) as api,
        ):
            tokens, room = await group_with_an_offline_member(api)
            await token_for(api, "dan")
            r = await api.post(
                "/v1/direct",
                json={"user": "dan"},
                headers={"Authorization": f"Bearer {tokens['ann']}"},
            )
            direct = r.json()["id"]
            with trio.fail_after(60):
                async with (
                    open_websocket_url(
                        join_url(cluster, 0, room, tokens["ann"]), subprotocols=["chatnode.v1"]
                    ) as ann,
                    open_websocket_url(
                        join_url(cluster, 1, room, tokens["bob"]), subprotocols=["chatnode.v1"]
                    ) as bob,
                    open_websocket_url(
                        join_url(cluster, 0, direct, tokens["ann"]), subprotocols=["chatnode.v1"]
                    ) as ann_to_dan,
                ):
                    await read_until_live(ann)
                    await read_until_live(bob)
                    await read_until_live(ann_to_dan)
                    # The windows' holders, in this order: node 1 for dan (refused), then
                    # node 2 for cat (never answered); both are failing during the burst.
                    await send_acked(ann_to_dan, "to dan")
                    await bob.send_message(json.dumps({"type": "send", "message": "b-first"}))
                    await hanging.wait_for(1)
                    texts = {
                        "ann": [f"a{i}" for i in range(30)],
                        "bob": [f"b{i}" for i in range(30)],
                    }
                    everything = sorted(["b-first", *texts["ann"], *texts["bob"]])
                    got: dict[str, list[str]] = {}

                    async def chat(name: str, ws: WebSocketConnection) -> None:
                        for text in texts[name]:
                            await ws.send_message(json.dumps({"type": "send", "message": text}))
                        acks, seen = 0, []
                        mine = len(texts[name]) + (name == "bob")  # b-first's ack too
                        while acks < mine or len(seen) < len(everything):
                            frame = json.loads(await ws.get_message())
                            acks += frame["type"] == "ack"
                            if frame["type"] == "message":
                                seen.append(frame["message"])
                        got[name] = seen

                    async with trio.open_nursery() as both:
                        both.start_soon(chat, "ann", ann)
                        both.start_soon(chat, "bob", bob)
                    assert sorted(got["ann"]) == sorted(got["bob"]) == everything

            async def node1_failed() -> bool:
                async with httpx.AsyncClient(base_url=cluster.node_url(0)) as node1:
                    text = (await node1.get("/metrics")).text
                return 'chatnode_push_failed_total{node="node1"} 0' not in text

            with trio.fail_after(30):
                while not await node1_failed():  # noqa: ASYNC110 -- another process's counter
                    await trio.sleep(0.2)
        nursery.cancel_scope.cancel()
