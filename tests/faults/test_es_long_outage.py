"""Scenario 10 — Elasticsearch away for three leases while traffic flows: one reader at a time.

Both nodes reach Elasticsearch through a fault proxy cut for ``3 x archive_claim_idle_s``
while every member keeps sending, and the archivers take a batch every quarter second, so
every bulk slot of the reading node holds a retrying bulk before the lease passes. Proves: the archive stream's lease is handed over while
Elasticsearch is down, as the reader's rule 3 says (a reader whose oldest batch waited the
lease gives it up, with its bulks still retrying); the times during which each node reads the
stream, from its "reads the archive stream" log line to the line that ends its turn ("hands
the archive stream over", "lost the lease", "releases"), never overlap between the nodes;
after the restore Elasticsearch holds every offset, and the members got every message once,
in order.
"""

from __future__ import annotations

import datetime
import itertools
import time

import attrs
import pytest
import trio

from tests.cluster.cluster import Cluster
from tests.faults.support import (
    FAULT_SETTINGS,
    clients_on_nodes,
    close_all,
    fault_cluster,
    fault_proxy,
    make_room,
    make_users,
    record,
    send_series,
    send_until,
    settle_all,
    start_all,
    verify_room,
    wait_archived,
)

pytestmark = pytest.mark.integration

SCENARIO = "10 long elasticsearch outage"
LEASE_S = float(FAULT_SETTINGS["archive_claim_idle_s"])
OUTAGE_S = 3 * LEASE_S
LINGER_S = 0.25
"""A busy node's pace: a batch every quarter second, so every slot holds a retrying bulk well
before a batch waited the lease (at the default 1 s linger the fourth batch, and with it a
check of the lease, came after the lease)."""
INTERVAL_S = 0.05
TURN_START = "reads the archive stream"
TURN_ENDS = ("hands the archive stream over", "lost the lease", "releases the archive stream")


@attrs.frozen
class Turn:
    """A time during which ``node`` read the archive stream (epoch seconds, from its log)."""

    node: str
    start: float
    end: float
    ended_by: str


def reading_turns(cluster: Cluster) -> list[Turn]:
    """Every node's turns of reading the archive stream, from the feed's log lines, by start;
    a turn still going on ends at infinity."""
    turns: list[Turn] = []
    for i, node in enumerate(cluster.nodes):
        name = f"node{i + 1}"
        start: float | None = None
        for line in node.log.read_text().splitlines():
            if "archive feed: " not in line:
                continue
            at = datetime.datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f").timestamp()
            if TURN_START in line:
                assert start is None, f"{name} started reading twice without an end: {line}"
                start = at
            elif start is not None and (end := next((e for e in TURN_ENDS if e in line), None)):
                turns.append(Turn(name, start, at, end))
                start = None
        if start is not None:
            turns.append(Turn(name, start, float("inf"), "(still reading)"))
    return sorted(turns, key=lambda t: t.start)


async def test_a_long_elasticsearch_outage_hands_the_stream_over_one_reader_at_a_time() -> None:
    async with (
        fault_proxy("CHATNODE_TEST_ES_URL") as proxy,
        fault_cluster(
            node_env={"CHATNODE_ELASTICSEARCH_URL": f"http://127.0.0.1:{proxy.port}"},
            archive_linger_s=LINGER_S,
        ) as (cluster, api),
    ):
        tokens = await make_users(api, [f"u{i}" for i in range(4)])
        room = await make_room(api, tokens["u0"])
        clients = clients_on_nodes(cluster, tokens, room, [0, 0, 1, 1])
        async with trio.open_nursery() as nursery:
            await start_all(nursery, clients)
            async with trio.open_nursery() as traffic:
                for client in clients:
                    traffic.start_soon(send_series, client, 5, INTERVAL_S, "before ")
            before = await settle_all(clients)
            await wait_archived(cluster, room, before, timeout_s=10)

            proxy.cut()
            cut_at = time.time()
            stop = trio.Event()
            async with trio.open_nursery() as traffic:  # chat goes on throughout
                for client in clients:
                    traffic.start_soon(send_until, client, stop, INTERVAL_S, "during ")
                await trio.sleep(OUTAGE_S)  # the fault lasts this long
                proxy.restore()
                restored_at = time.time()
                stop.set()
            head = await settle_all(clients)
            await wait_archived(cluster, room, head, timeout_s=20)
            caught_up_s = time.time() - restored_at
            turns = reading_turns(cluster)
            await close_all(clients)

    shown = "; ".join(
        f"{t.node} {t.start - cut_at:+.2f}..{t.end - cut_at:+.2f} s ({t.ended_by})" for t in turns
    )
    print(f"[faults] {SCENARIO}: reading turns, seconds from the cut: {shown}")
    for earlier, later in itertools.pairwise(turns):
        assert earlier.end <= later.start, f"two nodes read the archive stream at once: {shown}"
    handovers = [t for t in turns if t.ended_by == TURN_ENDS[0] and cut_at <= t.end <= restored_at]
    assert handovers, f"the lease was not handed over while ES was down: {shown}"
    first_handover_s = handovers[0].end - cut_at
    assert first_handover_s <= 2 * LEASE_S + 1, shown
    gaps = [
        later.start - earlier.end
        for earlier, later in itertools.pairwise(turns)
        if cut_at <= earlier.end <= restored_at
    ]
    verify_room(clients, SCENARIO, head=head)
    record(SCENARIO, "outage duration", restored_at - cut_at)
    record(SCENARIO, "messages in the room", head, "")
    record(SCENARIO, "first hand-over, after the cut", first_handover_s)
    record(SCENARIO, "hand-overs during the outage", len(handovers), "")
    record(SCENARIO, "longest time without a reader during the outage", max(gaps))
    record(SCENARIO, "archive caught up (every offset in ES), after restore", caught_up_s)
