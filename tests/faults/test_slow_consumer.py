"""Scenario 8 — a slow consumer in a room spread over the cluster.

A member that completes the handshake and then never reads (a raw socket with a 4 KiB receive
buffer) sits on node 1 -- connected straight to its port, so that nginx's own buffers do not
hide its slowness -- while a sender on node 2 pushes a few megabytes through the room. Proves:
the slow member is disconnected (close code 4001, or cut) once its bounded backlog
(``CHATNODE_SEND_BACKLOG_BYTES``) overflows, and what it did get is in order; the room's other
members on both nodes get every message, in order, once, and are not slowed: their delivery
lag behind the sender's own copy is printed and bounded. Then the slow member does what 4001
tells it to: it reconnects through nginx with ``since=<last offset it got>`` and gets the
rest -- a replay many times larger than the send backlog.
"""

from __future__ import annotations

import json
import statistics
import struct
import time

import pytest
import trio

from tests.e2e.harness import raw_websocket
from tests.faults.client import FaultClient
from tests.faults.support import (
    clients_on_nodes,
    close_all,
    fault_cluster,
    make_room,
    make_users,
    record,
    settle_all,
    start_all,
    verify_room,
)

pytestmark = pytest.mark.integration

BACKLOG_BYTES = 256 * 1024
MESSAGES = 1500
TEXT = "x" * 2000


def parse_frames(data: bytes) -> tuple[list[bytes], int | None]:
    """Server frames (unmasked) in ``data``: the text payloads, and the close code if a close
    frame came (a cut connection may end mid-frame: the tail is ignored)."""
    texts: list[bytes] = []
    i = 0
    while i + 2 <= len(data):
        opcode, length = data[i] & 0x0F, data[i + 1] & 0x7F
        i += 2
        if length == 126:
            (length,) = struct.unpack("!H", data[i : i + 2])
            i += 2
        elif length == 127:
            (length,) = struct.unpack("!Q", data[i : i + 8])
            i += 8
        if i + length > len(data):
            break
        payload = data[i : i + length]
        i += length
        if opcode == 0x1:
            texts.append(payload)
        elif opcode == 0x8:
            return texts, struct.unpack("!H", payload[:2])[0] if len(payload) >= 2 else None
    return texts, None


async def test_slow_consumer_is_cut_off_and_the_room_is_not_slowed() -> None:
    async with fault_cluster(send_backlog_bytes=BACKLOG_BYTES) as (cluster, api):
        tokens = await make_users(api, ["fast1", "fast2", "sender", "slow"])
        room = await make_room(api, tokens["sender"])
        clients = clients_on_nodes(
            cluster,
            {n: tokens[n] for n in ("fast1", "fast2", "sender")},
            room,
            [0, 1, 1],
            max_inflight=16,  # the sender reads its own echoes as it goes
        )
        fast1, fast2, sender = clients
        slow = await raw_websocket(
            cluster.node_ports[0], f"/v1/chatrooms/{room}/join?token={tokens['slow']}&since=0"
        )
        async with trio.open_nursery() as nursery:
            await start_all(nursery, clients)
            t0 = time.monotonic()
            for i in range(MESSAGES):
                sender.send(f"{i} {TEXT}")
            head = await settle_all(clients, timeout_s=40)
            elapsed_s = time.monotonic() - t0

            # the slow member was disconnected: reading now ends (EOF or a reset) after a 4001
            data = bytearray()
            with trio.fail_after(10):
                try:
                    while chunk := await slow.recv(65536):
                        data += chunk
                except ConnectionResetError:
                    pass
            slow.close()
            texts, close_code = parse_frames(bytes(data))
            frames = [json.loads(t) for t in texts]
            offsets = [f["offset"] for f in frames if f["type"] == "message"]

            # ... and resumes with since=<last offset it got>: a replay far over the backlog
            resumed = FaultClient(
                "slow", tokens["slow"], room, cluster.ws_url, cluster.url, since=offsets[-1]
            )
            t1 = time.monotonic()
            await nursery.start(resumed.run)
            resume_s = time.monotonic() - t1
            await close_all([*clients, resumed])

    verify_room(clients, "8 slow consumer", head=MESSAGES)
    for client in clients:
        assert not client.close_codes and not client.outages, client.close_codes  # never cut
    assert close_code in (4001, None), close_code
    assert offsets == list(range(1, len(offsets) + 1))  # what it got was in order
    assert resumed.verify_stream() == list(range(offsets[-1] + 1, MESSAGES + 1))
    assert len(offsets) < MESSAGES, "the slow consumer was not cut off"
    # not slowed: each message reached the other members about when it reached its sender
    at_sender = {m.offset: m.at for m in sender.received}
    lags = sorted(m.at - at_sender[m.offset] for c in (fast1, fast2) for m in c.received)
    p99 = lags[int(len(lags) * 0.99)]
    print(
        f"[faults] 8 slow consumer: slow member got {len(offsets)} of {MESSAGES} messages then "
        f"close code {close_code}; others' lag behind the sender: median "
        f"{statistics.median(lags) * 1000:.1f} ms, p99 {p99 * 1000:.1f} ms, max "
        f"{lags[-1] * 1000:.1f} ms; {MESSAGES} x {len(TEXT)} B in {elapsed_s:.2f}s"
    )
    assert p99 < 1.0, f"the room was slowed: p99 lag {p99:.3f}s"
    record("8 slow consumer", f"{MESSAGES} messages of {len(TEXT)} B to every fast member",
           elapsed_s)  # fmt: skip
    record("8 slow consumer", "fast members' p99 lag behind the sender", p99 * 1000, " ms")
    record("8 slow consumer", "messages the slow member got before the cut", len(offsets), "")
    record("8 slow consumer", "its resume with since: join to live, replay far over the backlog",
           resume_s)  # fmt: skip
    assert head == MESSAGES
