"""Scenario 1 — resume: a member that left at offset N and comes back with ``since=N`` on the
OTHER node gets exactly N+1..head as its replay, then live traffic, in order, once."""

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
    node_ws,
    record,
    settle_all,
    start_all,
    verify_room,
)

pytestmark = pytest.mark.integration


async def test_resume_with_since_on_the_other_node() -> None:
    async with fault_cluster() as (cluster, api):
        tokens = await make_users(api, ["ann", "bob"])
        room = await make_room(api, tokens["ann"])

        def member(name: str, node: int, since: int = 0) -> FaultClient:
            return FaultClient(
                name,
                tokens[name],
                room,
                connect_url=node_ws(cluster, node),
                api_url=cluster.url,
                since=since,
            )

        ann, bob = member("ann", 0), member("bob", 0)
        async with trio.open_nursery() as nursery:
            await start_all(nursery, [ann, bob])
            for i in range(10):
                ann.send(f"ann before {i}")
            with trio.fail_after(10):
                await bob.wait_offset(10)
            await bob.close()  # bob leaves at offset 10
            left_at = bob.last_offset
            for i in range(20):
                ann.send(f"ann missed {i}")
            with trio.fail_after(10):
                await ann.wait_settled()
            head = ann.last_offset

            # bob comes back on node 2, straight to its port, with since=<last offset seen>
            bob2 = member("bob", 1, since=left_at)
            t0 = time.monotonic()
            await nursery.start(bob2.run)
            resume_s = time.monotonic() - t0
            assert bob2.nodes == ["node2"]
            replayed = [m.offset for m in bob2.received]  # everything before `live`
            assert replayed == list(range(left_at + 1, head + 1)), replayed
            assert [m.text for m in bob2.received] == [f"ann missed {i}" for i in range(20)]

            for i in range(5):  # then live, both ways
                ann.send(f"ann live {i}")
                bob2.send(f"bob live {i}")
            await settle_all([ann, bob2])
            await close_all([ann, bob2])

        verify_room([ann, bob2], "resume", head=head + 10)
        assert bob.verify_stream() == list(range(1, left_at + 1))
        record(
            "1 resume", "replay of 20 missed messages on the other node (join to live)", resume_s
        )
