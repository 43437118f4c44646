"""A join's replay is written in pages as the member reads (docs/architecture.md, "path of a
message"; hub Rule 3): a replay far longer than the send backlog, stalled by a reader that
has not read yet while the room goes on, still reaches the member whole, once, in order,
with no gap between history and live, also when the live messages that arrived meanwhile
were more than the seat may queue."""

from __future__ import annotations

import json
from pathlib import Path

import trio

from chatnode.core.models import Draft
from chatnode.node import accounts
from tests.e2e.harness import api_client, node_config, running_node
from tests.security.support import FrameStream, upgrade

HISTORY = 3000
LIVE = 600  # more than the seat's queue (the room cache: 256)
TEXT_BYTES = 4000  # 12 MB of replay: more than the kernel's socket buffers take


async def test_a_stalled_replay_meets_the_live_messages_its_seat_dropped(tmp_path: Path) -> None:
    config = node_config(str(tmp_path), send_backlog_bytes=64 * 1024)
    async with running_node(config) as node, api_client(node) as api:
        token = await api.user_with_token("ann")
        room = await api.create_room(token)
        assert node.app.node is not None
        hub, bus = node.app.node.hub, node.app.node.backends.bus

        async def publish(start: int, count: int) -> None:
            for i in range(start, start + count):
                text = f"{i:06d} " + "x" * (TEXT_BYTES - 7)
                await bus.publish(Draft(room, "ann", text, accounts.now_ms()))

        await publish(0, HISTORY)
        member = await upgrade(
            node.port, f"/v1/chatrooms/{room}/join?token={token}&since=0", rcvbuf=4096
        )
        assert member.status == 101
        await publish(HISTORY, LIVE)  # the member reads nothing yet: its replay waits
        seat = next(iter(hub._sessions[room].seats.values()))
        assert not seat.live and seat.skipped_to > HISTORY, (seat.live, seat.skipped_to)

        frames = FrameStream(member.sock, member.rest)
        kinds: list[str] = []
        offsets: list[int] = []
        with trio.fail_after(30):
            while len(offsets) < HISTORY + LIVE:
                kind, payload = await frames.next()
                if kind != "text":
                    continue
                frame = json.loads(payload)
                kinds.append(frame["type"])
                if frame["type"] == "message":
                    offsets.append(frame["offset"])
                elif frame["type"] in ("joined", "live"):
                    assert frame["offset"] == HISTORY, frame
        member.sock.close()
    assert offsets == list(range(1, HISTORY + LIVE + 1))
    assert kinds[0] == "joined" and kinds.index("live") == HISTORY + 1
