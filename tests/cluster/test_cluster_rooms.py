"""Who may be in a room, across the cluster: two node processes behind nginx on MariaDB,
Redis and Elasticsearch. A direct room asked for by both its users at once, on two nodes, is
made once; a ban made on one node closes the banned user's connection on the other."""

from __future__ import annotations

import json

import httpx
import pytest
import trio
from trio_websocket import ConnectionClosed, ConnectionRejected, open_websocket_url

from tests.cluster.cluster import running_cluster
from tests.cluster.harness import nginx_available
from tests.cluster.test_cluster_e2e import poll, read_until_live, token_for

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(
        not nginx_available(), reason="nginx not installed (scripts/services install)"
    ),
]

PAIRS = 8


async def test_both_users_asking_at_once_on_two_nodes_get_one_direct_room() -> None:
    """Each of ``PAIRS`` pairs asks for its direct room from both sides at the same moment,
    one side on each node: every pair gets one room (one 201, one 200, the same id), and
    the cluster holds one direct room per pair."""
    async with (
        running_cluster(nodes=2) as cluster,
        httpx.AsyncClient(base_url=cluster.node_url(0), timeout=10) as node1,
        httpx.AsyncClient(base_url=cluster.node_url(1), timeout=10) as node2,
    ):
        tokens = {}
        for n in range(PAIRS):
            for side in ("a", "b"):
                tokens[f"{side}{n}"] = await token_for(node1, f"{side}{n}")
        answers: dict[int, list[httpx.Response]] = {n: [] for n in range(PAIRS)}

        async def ask(client: httpx.AsyncClient, n: int, me: str, other: str) -> None:
            r = await client.post(
                "/v1/direct",
                json={"user": other},
                headers={"Authorization": f"Bearer {tokens[me]}"},
            )
            answers[n].append(r)

        with trio.fail_after(30):
            async with trio.open_nursery() as nursery:
                for n in range(PAIRS):
                    nursery.start_soon(ask, node1, n, f"a{n}", f"b{n}")
                    nursery.start_soon(ask, node2, n, f"b{n}", f"a{n}")

        ids = set()
        for n, (first, second) in answers.items():
            assert sorted((first.status_code, second.status_code)) == [200, 201], (n, first.text)
            assert first.json()["id"] == second.json()["id"], n
            assert first.json()["visibility"] == "direct"
            ids.add(first.json()["id"])
        assert len(ids) == PAIRS
        a0 = {"Authorization": f"Bearer {tokens['a0']}"}
        r = await node2.get("/v1/chatrooms", headers=a0)
        assert [(x["visibility"], x["member_count"]) for x in r.json()["chatrooms"]] == [
            ("direct", 2)
        ]


async def test_a_ban_on_one_node_closes_the_connection_on_the_other() -> None:
    async with (
        running_cluster(nodes=2) as cluster,
        httpx.AsyncClient(base_url=cluster.url, timeout=10) as api,
    ):
        ann = await token_for(api, "ann")
        bob = await token_for(api, "bob")
        r = await api.post(
            "/v1/chatrooms",
            json={"name": "group", "visibility": "private", "members": ["bob"]},
            headers={"Authorization": f"Bearer {ann}"},
        )
        assert r.status_code == 201, r.text
        room = r.json()["id"]

        def url(node: int, token: str) -> str:
            port = cluster.node_ports[node]
            return f"ws://127.0.0.1:{port}/v1/chatrooms/{room}/join?token={token}"

        async with (
            open_websocket_url(url(0, ann), subprotocols=["chatnode.v1"]) as ann_ws,
            open_websocket_url(url(1, bob), subprotocols=["chatnode.v1"]) as bob_ws,
        ):
            await read_until_live(ann_ws)
            await read_until_live(bob_ws)
            await ann_ws.send_message(json.dumps({"type": "send", "message": "walrus plans"}))

            async def hits(token: str, **params: object) -> list[object]:
                r = await api.get(
                    "/v1/messages/search",
                    params={"q": "walrus", **params},
                    headers={"Authorization": f"Bearer {token}"},
                )
                assert r.status_code == 200, r.text
                found: list[object] = r.json()["hits"]
                return found

            assert await poll("walrus indexed", lambda: hits(bob))  # a member finds it in ES
            node1 = cluster.node_url(0)
            r = await api.post(
                f"{node1}/v1/chatrooms/{room}/bans",
                json={"user": "bob"},
                headers={"Authorization": f"Bearer {ann}"},
            )
            assert r.json() == {"chatroom": room, "user": "bob", "banned": True}, r.text
            with trio.fail_after(10), pytest.raises(ConnectionClosed) as closed:
                while True:
                    await bob_ws.get_message()
            reason = closed.value.reason
            assert reason is not None and reason.code == 4501

            # bob is out on both nodes: the room does not exist for him any more
            for node in (0, 1):
                with pytest.raises(ConnectionRejected) as rejected:
                    async with open_websocket_url(url(node, bob), subprotocols=["chatnode.v1"]):
                        pass
                assert rejected.value.status_code == 404
                assert json.loads(rejected.value.body or b"{}")["error"]["code"] == (
                    "room_not_found"
                )
            assert await hits(bob) == []  # no longer one of his rooms
            r = await api.get(
                "/v1/messages/search",
                params={"q": "walrus", "chatroom": room},
                headers={"Authorization": f"Bearer {bob}"},
            )
            assert r.status_code == 404 and r.json()["error"]["code"] == "room_not_found"
            assert await hits(ann)
            await ann_ws.send_message(json.dumps({"type": "send", "id": "x", "message": "hi"}))
            while json.loads(await ann_ws.get_message())["type"] != "ack":
                pass
