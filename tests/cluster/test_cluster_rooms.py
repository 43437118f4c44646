"""Who may be in a room, across the cluster: two node processes behind nginx on MariaDB,
Redis and Elasticsearch. A direct room asked for by both its users at once, on two nodes, is
made once; a ban made on one node closes the banned user's connection on the other."""

from __future__ import annotations

import json
from typing import Any

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


async def test_a_removed_member_gets_nothing_after_the_removal_on_either_node() -> None:
    """``node/rooms.py`` rule 7, hub Rule 8: messages flow while bob is removed. Bob's
    connections on both nodes get every offset up to his removal (k) and nothing after,
    then close with 4501; carl, who stays, gets every offset once, in order, k among
    them. Dave, added while connected to ``/v1/connect`` on the other node, gets what
    follows his ``added`` change and nothing before."""
    async with (
        running_cluster(nodes=2) as cluster,
        httpx.AsyncClient(base_url=cluster.url, timeout=10) as api,
    ):
        tokens = {name: await token_for(api, name) for name in ("ann", "bob", "carl", "dave")}
        ann = {"Authorization": f"Bearer {tokens['ann']}"}
        r = await api.post(
            "/v1/chatrooms",
            json={"name": "group", "visibility": "private", "members": ["bob", "carl"]},
            headers=ann,
        )
        assert r.status_code == 201, r.text
        room = r.json()["id"]

        def url(node: int, user: str) -> str:
            port = cluster.node_ports[node]
            return f"ws://127.0.0.1:{port}/v1/chatrooms/{room}/join?token={tokens[user]}"

        sent = 40
        with trio.fail_after(60):
            async with (
                open_websocket_url(url(0, "ann"), subprotocols=["chatnode.v1"]) as ann_ws,
                open_websocket_url(url(0, "bob"), subprotocols=["chatnode.v1"]) as bob0,
                open_websocket_url(url(1, "bob"), subprotocols=["chatnode.v1"]) as bob1,
                open_websocket_url(url(1, "carl"), subprotocols=["chatnode.v1"]) as carl_ws,
                open_websocket_url(
                    f"ws://127.0.0.1:{cluster.node_ports[1]}/v1/connect?token={tokens['dave']}",
                    subprotocols=["chatnode.v1"],
                ) as dave_ws,
            ):
                for ws in (ann_ws, bob0, bob1, carl_ws):
                    await read_until_live(ws)

                thirds = [trio.Event(), trio.Event()]
                marks = {sent // 3: thirds[0], 2 * sent // 3: thirds[1]}

                async def chatter() -> None:
                    for i in range(sent):
                        if i in marks:
                            marks[i].set()
                        await ann_ws.send_message(
                            json.dumps({"type": "send", "id": f"m{i}", "message": f"m{i}"})
                        )
                        await trio.sleep(0.01)  # pacing: the changes land among the messages

                async def change_members() -> None:
                    node0, node1 = cluster.node_url(0), cluster.node_url(1)
                    await thirds[0].wait()
                    r = await api.delete(f"{node1}/v1/chatrooms/{room}/members/bob", headers=ann)
                    assert r.status_code == 200, r.text
                    await thirds[1].wait()
                    r = await api.post(
                        f"{node0}/v1/chatrooms/{room}/members", json={"user": "dave"}, headers=ann
                    )
                    assert r.status_code == 201, r.text

                async with trio.open_nursery() as nursery:
                    nursery.start_soon(chatter)
                    nursery.start_soon(change_members)

                async def frames_until_closed(ws: Any) -> tuple[list[dict[str, Any]], int]:
                    got = []
                    with pytest.raises(ConnectionClosed) as closed:
                        while True:
                            got.append(json.loads(await ws.get_message()))
                    reason = closed.value.reason
                    return got, reason.code if reason is not None else 0

                for bob_ws in (bob0, bob1):
                    got, code = await frames_until_closed(bob_ws)
                    assert code == 4501
                    ordered = [f for f in got if f["type"] in ("message", "member")]
                    assert ordered[-1]["type"] == "member", ordered[-3:]
                    assert (ordered[-1]["user"], ordered[-1]["event"]) == ("bob", "removed")
                    removal = ordered[-1]["offset"]
                    offsets = [f["offset"] for f in ordered]
                    assert offsets == list(range(offsets[0], removal + 1))  # none after k

                carl: list[dict[str, Any]] = []
                while len([f for f in carl if f["type"] in ("message", "member")]) < sent + 2:
                    frame = json.loads(await carl_ws.get_message())
                    carl.append(frame)
                ordered = [f for f in carl if f["type"] in ("message", "member")]
                assert [f["offset"] for f in ordered] == list(range(1, sent + 3))
                changes = [
                    (f["user"], f["event"], f["by"]) for f in ordered if f["type"] == "member"
                ]
                assert changes == [("bob", "removed", "ann"), ("dave", "added", "ann")]
                added = next(f["offset"] for f in ordered if f.get("event") == "added")

                dave: list[dict[str, Any]] = []
                while not any(f["type"] == "live" for f in dave):
                    dave.append(json.loads(await dave_ws.get_message()))
                while not dave or dave[-1].get("offset") != sent + 2:
                    dave.append(json.loads(await dave_ws.get_message()))
                seen = [f["offset"] for f in dave if f["type"] in ("message", "member")]
                assert seen == list(range(added, sent + 3))  # from his "added" change on

        r = await api.get(f"/v1/chatrooms/{room}/messages", params={"limit": 100}, headers=ann)
        history = r.json()["messages"]
        assert [m["offset"] for m in history] == list(range(1, sent + 3))
        assert [(m["user"], m["event"]) for m in history if "event" in m] == [
            ("bob", "removed"),
            ("dave", "added"),
        ]
