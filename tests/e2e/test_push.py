"""Push notifications end to end on one embedded node, with a real HTTP receiver: a member
of a direct room who is not connected gets one POST at once and the latest at the window's
end; a connected one and the sender get none; a webhook that never answers delays no
message."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import trio

from chatnode.config import ConfigError, load_config
from tests.e2e.harness import (
    Api,
    api_client,
    auth,
    join,
    node_config,
    running_node,
    until_live,
)
from tests.push_receiver import Receiver

FAST = {"rate_messages_per_s": 10_000.0, "rate_burst": 10_000}


async def direct_room(api: Api, me: str, other: str) -> int:
    r = await api.client.post("/v1/direct", json={"user": other}, headers=auth(me))
    assert r.status_code in (200, 201), r.text
    room: int = r.json()["id"]
    return room


async def test_an_offline_member_gets_the_first_at_once_and_the_latest_later(
    tmp_path: Path,
) -> None:
    receiver = Receiver()
    async with trio.open_nursery() as nursery:
        await nursery.start(receiver.serve)
        config = node_config(str(tmp_path), push_url=receiver.url, push_collapse_s=1.0, **FAST)
        async with running_node(config) as node, api_client(node) as api:
            ann = await api.user_with_token("ann")
            await api.user_with_token("bob")
            room = await direct_room(api, ann, "bob")
            with trio.fail_after(20):
                async with join(node, room, token=ann) as ws:
                    await until_live(ws)
                    for text in ("one", "two", "three"):
                        await ws.send_message(json.dumps({"type": "send", "message": text}))
                    await receiver.wait_for(2)
                first, second = receiver.bodies[:2]
                assert first["user"] == "bob" and first["sender"] == "ann"
                assert first["chatroom"] == room and first["preview"] == "one"
                assert first["unread"] == 1
                assert (second["preview"], second["unread"]) == ("three", 3)
                assert second["offset"] > first["offset"]
                assert (
                    receiver.times[1] - receiver.times[0] >= 0.9
                )  # the window, less the first POST's trip
                r = await api.client.get("/metrics")
                assert 'chatnode_push_sent_total{node="test-node"} 2' in r.text
        nursery.cancel_scope.cancel()


async def test_a_hanging_webhook_delays_no_message(tmp_path: Path) -> None:
    receiver = Receiver(hang=True)
    async with trio.open_nursery() as nursery:
        await nursery.start(receiver.serve)
        config = node_config(str(tmp_path), push_url=receiver.url, push_collapse_s=0.1, **FAST)
        async with running_node(config) as node, api_client(node) as api:
            ann = await api.user_with_token("ann")
            bob = await api.user_with_token("bob")
            await api.user_with_token("cat")
            r = await api.client.post(
                "/v1/chatrooms", json={"name": "g", "visibility": "private"}, headers=auth(ann)
            )
            room = r.json()["id"]
            for user in ("bob", "cat"):
                r = await api.client.post(
                    f"/v1/chatrooms/{room}/members", json={"user": user}, headers=auth(ann)
                )
                assert r.status_code in (200, 201), r.text
            with trio.fail_after(30):
                async with join(node, room, token=ann) as a, join(node, room, token=bob) as b:
                    await until_live(a)
                    await until_live(b)
                    await a.send_message(json.dumps({"type": "send", "message": "m0"}))
                    await receiver.wait_for(1)  # cat's notification: never answered
                    texts = [f"m{i}" for i in range(1, 51)]
                    for text in texts:
                        await a.send_message(json.dumps({"type": "send", "message": text}))
                    acks, got = 0, []
                    while acks < 51:
                        frame = json.loads(await a.get_message())
                        acks += frame.get("type") == "ack"
                    while len(got) < 51:
                        frame = json.loads(await b.get_message())
                        if frame.get("type") == "message":
                            got.append(frame["message"])
                    assert got == ["m0", *texts]
            assert [body["user"] for body in receiver.bodies] == ["cat"]
        nursery.cancel_scope.cancel()


def test_a_push_url_that_is_not_http_is_refused_at_start() -> None:
    for url in ("ftp://example.com/hook", "example.com", "http://"):
        with pytest.raises(ConfigError, match="CHATNODE_PUSH_URL"):
            load_config({"CHATNODE_PUSH_URL": url})
    config = load_config({"CHATNODE_PUSH_URL": "https://push.example.com/hook"})
    assert config.push_url == "https://push.example.com/hook"
