"""A client's two recoveries, end to end on one embedded node: retrying a send whose ``ack``
it never got (same ``id``: the same ack, nothing stored twice, also from a new connection),
and resuming from further back than the replay limit (a ``gap`` frame first, then the
newest ``CHATNODE_MAX_REPLAY`` messages)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
from trio_websocket import WebSocketConnection

from tests.e2e.harness import (
    api_client,
    auth,
    join,
    next_of_type,
    node_config,
    running_node,
    until_live,
)


def send(text: str, frame_id: str) -> str:
    return json.dumps({"type": "send", "id": frame_id, "message": text})


async def test_a_send_retried_with_its_id_gets_the_same_ack_and_stores_nothing(
    tmp_path: Path,
) -> None:
    async with running_node(node_config(str(tmp_path))) as node, api_client(node) as api:
        ann = await api.user_with_token("ann")
        room = await api.create_room(ann)
        async with join(node, room, token=ann) as ws:
            await until_live(ws)
            await ws.send_message(send("hello", "id-1"))
            first = await next_of_type(ws, "ack")
            await ws.send_message(send("hello", "id-1"))  # the ack was "lost": retry
            again = await next_of_type(ws, "ack")
        async with join(node, room, token=ann, since=first["offset"]) as ws:  # reconnected
            await until_live(ws)
            await ws.send_message(send("hello", "id-1"))
            third = await next_of_type(ws, "ack")
            await ws.send_message(send("next", "id-2"))
            fourth = await next_of_type(ws, "ack")

        assert first["offset"] == again["offset"] == third["offset"] == 1
        assert first["timestamp"] == again["timestamp"] == third["timestamp"]
        assert again["id"] == third["id"] == "id-1"
        assert fourth["offset"] == 2
        r = await api.client.get(f"/v1/chatrooms/{room}/messages", headers=auth(ann))
        assert [m["message"] for m in r.json()["messages"]] == ["hello", "next"]


async def test_a_resume_beyond_the_replay_limit_says_what_it_skipped(tmp_path: Path) -> None:
    config = node_config(str(tmp_path), max_replay=5, rate_burst=100)
    async with running_node(config) as node, api_client(node) as api:
        ann = await api.user_with_token("ann")
        room = await api.create_room(ann)
        async with join(node, room, token=ann) as ws:
            await until_live(ws)
            for n in range(12):
                await ws.send_message(send(f"m{n}", f"s{n}"))
                await next_of_type(ws, "ack")

        async with join(node, room, token=ann, since=2) as ws:
            joined = json.loads(await ws.get_message())
            gap = json.loads(await ws.get_message())
            replay = await replay_until_live(ws)
        async with join(node, room, token=ann, since=7) as ws:  # within the limit: no gap
            _, replay_within = await until_live(ws)

        assert joined["offset"] == 12 and joined["history"] == 5
        assert gap == {"type": "gap", "chatroom": room, "from": 3, "to": 7}
        assert [m["offset"] for m in replay] == [8, 9, 10, 11, 12]
        assert [m["offset"] for m in replay_within] == [8, 9, 10, 11, 12]
        async with httpx.AsyncClient(base_url=node.http_url) as c:  # the gap, paged over REST
            r = await c.get(
                f"/v1/chatrooms/{room}/messages",
                params={"before": 8, "limit": 5},
                headers=auth(ann),
            )
        assert [m["offset"] for m in r.json()["messages"]] == [3, 4, 5, 6, 7]


async def replay_until_live(ws: WebSocketConnection) -> list[dict[str, Any]]:
    """The replayed messages until ``live`` (``joined`` and ``gap`` already read)."""
    history = []
    while (frame := json.loads(await ws.get_message()))["type"] != "live":
        assert frame["type"] == "message", frame
        history.append(frame)
    return history
