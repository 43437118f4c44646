"""Single-node behaviour under stress: resume, storms, slow consumers, graceful stop."""

from __future__ import annotations

import json
from pathlib import Path

import trio
from trio_websocket import ConnectionClosed

from chatnode.app import App
from tests.e2e.harness import (
    api_client,
    join,
    messages,
    next_of_type,
    node_config,
    raw_websocket,
    running_node,
    until_live,
)


async def send_and_ack(ws, text: str) -> int:  # type: ignore[no-untyped-def]
    await ws.send_message(json.dumps({"type": "send", "message": text}))
    ack = await next_of_type(ws, "ack")
    offset: int = ack["offset"]
    return offset


async def test_resume_with_since_gets_exactly_what_was_missed(tmp_path: Path) -> None:
    async with running_node(node_config(str(tmp_path))) as node, api_client(node) as api:
        ann = await api.user_with_token("ann")
        bob = await api.user_with_token("bob")
        room = await api.create_room(ann)
        async with join(node, room, token=ann) as a:
            await until_live(a)
            async with join(node, room, token=bob) as b:
                await until_live(b)
                await send_and_ack(a, "seen by bob")
                last_seen = (await messages(b, 1))[0]["offset"]
            for i in range(5):
                await send_and_ack(a, f"missed {i}")
            async with join(node, room, token=bob, since=last_seen) as b:
                joined, history = await until_live(b)
                assert [m["offset"] for m in history] == [2, 3, 4, 5, 6]
                assert joined["history"] == 5
                await send_and_ack(a, "live again")
                assert (await messages(b, 1))[0]["offset"] == 7


async def test_join_storm_loads_history_once_per_room(tmp_path: Path) -> None:
    async with running_node(node_config(str(tmp_path))) as node, api_client(node) as api:
        ann = await api.user_with_token("ann")
        room = await api.create_room(ann)
        async with join(node, room, token=ann) as a:
            await until_live(a)
            for i in range(20):
                await send_and_ack(a, f"m{i}")
        # the room has no member now: its session (and cache) is gone
        results: list[list[int]] = []

        async def member() -> None:
            async with join(node, room, token=ann) as ws:
                _, history = await until_live(ws)
                results.append([m["offset"] for m in history])

        async with trio.open_nursery() as nursery:
            for _ in range(50):
                nursery.start_soon(member)
        assert results == [list(range(1, 21))] * 50
        metrics = (await api.client.get("/metrics")).text
        loads = [
            line for line in metrics.splitlines() if line.startswith("chatnode_history_loads_total")
        ]
        # one load for the storm (the first join of the empty room loaded nothing: head was 0)
        assert loads and float(loads[0].split()[-1]) <= 2, loads


async def test_slow_consumer_is_cut_off_and_others_get_everything(tmp_path: Path) -> None:
    config = node_config(
        str(tmp_path), send_backlog_bytes=64 * 1024, rate_messages_per_s=1e6, rate_burst=1_000_000
    )
    async with running_node(config) as node, api_client(node) as api:
        ann = await api.user_with_token("ann")
        room = await api.create_room(ann)
        slow = await raw_websocket(node.port, f"/v1/chatrooms/{room}/join?token={ann}")
        total, text = 4000, "x" * 2000
        async with join(node, room, token=ann) as fast, join(node, room, token=ann) as sender:
            await until_live(fast)
            await until_live(sender)
            # The sender keeps at most `window` messages ahead of what the two reading members
            # have read, so their backlogs stay far below the bound whatever the scheduling;
            # the member that never reads falls behind without limit and is cut.
            window = 8
            got: dict[str, list[int]] = {"fast": [], "sender": []}
            progressed = trio.Event()

            async def read(name: str, ws) -> None:  # type: ignore[no-untyped-def]
                nonlocal progressed
                while len(got[name]) < total:
                    got[name].append((await messages(ws, 1))[0]["offset"])
                    progressed.set()
                    progressed = trio.Event()

            async def send_all() -> None:
                for i in range(total):
                    while i - min(len(got["fast"]), len(got["sender"])) >= window:
                        await progressed.wait()
                    await sender.send_message(
                        json.dumps({"type": "send", "message": f"{i} {text}"})
                    )

            async with trio.open_nursery() as nursery:
                nursery.start_soon(send_all)
                nursery.start_soon(read, "sender", sender)
                nursery.start_soon(read, "fast", fast)
            assert got["fast"] == got["sender"] == list(range(1, total + 1))
        # the slow consumer was disconnected: reading now ends with EOF (or a 4001 close frame)
        received = 0
        with trio.fail_after(10):
            while chunk := await slow.recv(65536):
                received += len(chunk)
        assert received < total * len(text)
        slow.close()


async def test_graceful_stop_tells_clients_to_reconnect(tmp_path: Path) -> None:
    config = node_config(str(tmp_path))
    app = App(config)
    async with trio.open_nursery() as nursery:
        ports = await nursery.start(app.run)
        from tests.e2e.harness import RunningNode

        node = RunningNode(app, ports[0])
        async with api_client(node) as api:
            ann = await api.user_with_token("ann")
            room = await api.create_room(ann)
            async with join(node, room, token=ann) as a:
                await until_live(a)
                app.request_stop()
                try:
                    while True:
                        await a.get_message()
                except ConnectionClosed as exc:
                    assert exc.reason.code == 4000
    # App.run returned: the listener is closed
    try:
        await trio.open_tcp_stream("127.0.0.1", ports[0])
    except OSError:
        pass
    else:
        raise AssertionError("the node still accepts connections after stopping")


async def test_a_replay_larger_than_the_send_backlog_is_not_cut(tmp_path: Path) -> None:
    config = node_config(
        str(tmp_path),
        send_backlog_bytes=2048,
        history_on_join=300,
        rate_messages_per_s=1e6,
        rate_burst=1_000_000,
    )
    async with running_node(config) as node, api_client(node) as api:
        ann = await api.user_with_token("ann")
        bob = await api.user_with_token("bob")
        room = await api.create_room(ann)
        async with join(node, room, token=ann) as a:
            await until_live(a)
            for i in range(200):
                await a.send_message(
                    json.dumps({"type": "send", "message": f"{i:03d} " + "y" * 100})
                )
            await messages(a, 200)

            async def live_traffic() -> None:
                for i in range(20):
                    await send_and_ack(a, f"live {i}")

            async with trio.open_nursery() as nursery:
                nursery.start_soon(live_traffic)  # live messages race the replay
                async with join(node, room, token=bob) as b:
                    _, history = await until_live(b)
                    offsets = [m["offset"] for m in history]
                    offsets += [m["offset"] for m in await messages(b, 220 - len(history))]
            assert offsets == list(range(1, 221))
