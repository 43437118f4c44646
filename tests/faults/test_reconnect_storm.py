"""Scenario 7 — a reconnect storm: 200 clients of a few rooms come back at the same moment,
each resuming from an offset that the Redis room log no longer holds (the log is kept short),
so their history must come from Elasticsearch.

Proves: each node reads that history from Elasticsearch at most once per room
(``chatnode_archive_history_reads_total``: single-flight plus the room session's cache), and
every client still gets exactly the offsets it missed, in order, then live traffic.
"""

from __future__ import annotations

import time

import pytest
import trio

from tests.faults.client import FaultClient
from tests.faults.support import (
    close_all,
    fault_cluster,
    make_room,
    make_users,
    node_metric,
    record,
    redis_client,
    send_series,
    settle_all,
    verify_room,
    wait_archived,
)

pytestmark = pytest.mark.integration

ROOMS = 4
USERS = 50  # each user has one connection per room: 200 clients
MESSAGES = 300  # per room, so that the room log (10, trimmed approximately) lost the oldest
READS = "chatnode_archive_history_reads_total"
LOADS = "chatnode_history_loads_total"


async def test_reconnect_storm_reads_history_once_per_room_per_node() -> None:
    async with fault_cluster(room_log_length=10) as (cluster, api):
        names = [f"s{i}" for i in range(ROOMS)] + [f"u{i}" for i in range(USERS)]
        tokens = await make_users(api, names)
        rooms = [await make_room(api, tokens["s0"], f"storm{i}") for i in range(ROOMS)]

        # history: each room's sender talks, then leaves (no member is left on any node)
        senders = [
            FaultClient(f"s{i}", tokens[f"s{i}"], room, cluster.ws_url, cluster.url)
            for i, room in enumerate(rooms)
        ]
        async with trio.open_nursery() as nursery:
            for sender in senders:
                await nursery.start(sender.run)
            async with trio.open_nursery() as traffic:
                for sender in senders:
                    traffic.start_soon(send_series, sender, MESSAGES, 0)
            for sender in senders:
                await settle_all([sender])
            await close_all(senders)

        # everyone resumes from an offset the room log no longer holds
        since = {}
        async with redis_client(cluster) as redis:
            for room in rooms:
                first = await redis.xrange(f"{cluster.prefix}:room:{room}:log", count=1)
                first_logged = int(first[0].identifier.split(b"-")[0])
                assert first_logged > 20, "the room log was not trimmed"
                since[room] = first_logged - 20
        for room in rooms:
            await wait_archived(cluster, room, MESSAGES, timeout_s=20)
        reads_before = [await node_metric(p, READS) for p in cluster.node_ports]
        loads_before = [await node_metric(p, LOADS) for p in cluster.node_ports]

        clients = [
            FaultClient(
                f"u{u}",
                tokens[f"u{u}"],
                room,
                connect_url=cluster.ws_url,
                api_url=cluster.url,
                since=since[room],
            )
            for u in range(USERS)
            for room in rooms
        ]
        async with trio.open_nursery() as nursery:
            t0 = time.monotonic()
            async with trio.open_nursery() as storm:  # all at once
                for client in clients:
                    storm.start_soon(nursery.start, client.run)
            storm_s = time.monotonic() - t0
            reads = [
                await node_metric(p, READS) - before
                for p, before in zip(cluster.node_ports, reads_before, strict=True)
            ]
            loads = [
                await node_metric(p, LOADS) - before
                for p, before in zip(cluster.node_ports, loads_before, strict=True)
            ]
            for i, room in enumerate(rooms):  # then live traffic reaches everyone
                senders[i] = FaultClient(
                    f"s{i}", tokens[f"s{i}"], room, cluster.ws_url, cluster.url, since=MESSAGES
                )
                await nursery.start(senders[i].run)
                senders[i].send(f"s{i} after the storm")
            for i, room in enumerate(rooms):
                members = [c for c in clients if c.room == room]
                await settle_all([senders[i], *members])
            await close_all([*clients, *senders])

    per_node: dict[str, set[int]] = {}
    for client in clients:
        per_node.setdefault(client.nodes[0], set()).add(client.room)
    for i, room in enumerate(rooms):
        members = [c for c in clients if c.room == room]
        verify_room([*members, senders[i]], f"7 storm room {room}", head=MESSAGES + 1)
        for c in members:
            assert c.received[0].offset == since[room] + 1
    rooms_served = [len(per_node.get(f"node{i + 1}", set())) for i in range(2)]
    print(
        f"[faults] 7 storm: {len(clients)} simultaneous joins of {ROOMS} rooms; Elasticsearch "
        f"history reads per node {reads} (rooms served per node {rooms_served}); history "
        f"loads per node {loads}"
    )
    for node_reads, served in zip(reads, rooms_served, strict=True):
        assert node_reads <= served, (reads, rooms_served)
    assert sum(reads) >= 1  # the history did come from Elasticsearch
    record("7 reconnect storm", f"Elasticsearch history reads for {len(clients)} joins",
           int(sum(reads)), f" (per node {[int(r) for r in reads]}, rooms per node {rooms_served})")  # fmt: skip
    record("7 reconnect storm", f"{len(clients)} clients joined and replayed", storm_s)
