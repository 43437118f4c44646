"""Scenario 9 — Redis loses data under traffic, and no acknowledged message is lost.

The cluster runs on a ``redis-server`` of its own (``tests/faults/redis_server.py``) that
loses data in one of three ways while four members on two nodes send every 50 ms:

- ``wipe``: no persistence, ``SHUTDOWN NOSAVE``, restarted empty: every room offset, room
  log and the archive stream's entries not yet archived are gone;
- ``rollback``: restarted from a snapshot taken about a second of traffic earlier (``SAVE``,
  then ``kill -9``): what a failover to a replica that lagged, or an AOF that lost its last
  second with the machine, leaves -- counters and logs behind what the members saw;
- ``aof-everysec``: ``kill -9`` of a Redis writing its AOF every second, restarted from it
  (a process crash: the kernel still wrote what Redis had written; the figure says what it
  lost).

Proves, from what real clients saw and from the history and Elasticsearch: every
acknowledged message is delivered once to every member, in offset order; offsets are never
reused (every member, the history and Elasticsearch agree on the message at each offset);
the history and Elasticsearch hold every offset once; the WebSocket connections live
through it.
"""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest
import trio

from tests.faults.client import FaultClient
from tests.faults.redis_server import EVERYSEC, VOLATILE, DedicatedRedis, dedicated_redis
from tests.faults.support import (
    clients_on_nodes,
    close_all,
    es_messages,
    fault_cluster,
    history,
    make_room,
    make_users,
    probe_reaches_everyone,
    record,
    require_tools,
    send_until,
    settle_all,
    start_all,
    verify_room,
    wait_archived,
)

pytestmark = pytest.mark.integration

INTERVAL_S = 0.05
OUTAGE_S = 1.5
LOSSES = {"wipe": VOLATILE, "rollback": VOLATILE, "aof-everysec": EVERYSEC}


async def lose_data(
    loss: str, redis: DedicatedRedis, clients: list[FaultClient], counter_key: str
) -> int:
    """Take Redis down the ``loss`` way (module docstring); return the room offset the data
    it will come back with holds."""
    if loss == "wipe":
        await redis.shutdown_nosave()
        return 0
    if loss == "rollback":
        await redis.call("SAVE")
        saved_at = int(await redis.call("GET", counter_key))  # type: ignore[call-overload]
        with trio.fail_after(10):  # about a second of traffic the snapshot does not hold
            await clients[0].wait_offset(saved_at + 60)
        await redis.kill()
        return saved_at
    await redis.kill()
    return aof_counter(redis.data_dir, counter_key)


def aof_counter(data_dir: Path, counter_key: str) -> int:
    """The room offset the AOF files hold: the last SET of its counter key in them."""
    key = counter_key.encode()
    pattern = re.compile(
        rb"\*3\r\n\$3\r\nSET\r\n\$%d\r\n%b\r\n\$\d+\r\n(\d+)\r\n" % (len(key), re.escape(key))
    )
    found = 0
    for path in sorted((data_dir / "appendonlydir").glob("*.aof")):
        for match in pattern.finditer(path.read_bytes()):
            found = int(match[1])
    return found


@pytest.mark.parametrize("loss", LOSSES)
async def test_redis_losing_data_loses_no_acknowledged_message(loss: str) -> None:
    require_tools("redis-server")
    scenario = f"9 redis {loss}"
    async with (
        dedicated_redis(LOSSES[loss]) as redis,
        fault_cluster(redis_url=redis.url) as (cluster, api),
    ):
        names = [f"u{i}" for i in range(4)]
        tokens = await make_users(api, [*names, "probe"])
        room = await make_room(api, tokens["u0"])
        clients = clients_on_nodes(cluster, {n: tokens[n] for n in names}, room, [0, 0, 1, 1])
        probe = FaultClient(
            "probe", tokens["probe"], room, connect_url=cluster.ws_url, api_url=cluster.url
        )
        everyone = [*clients, probe]

        async with trio.open_nursery() as nursery:
            await start_all(nursery, everyone)
            stop_traffic = trio.Event()
            async with trio.open_nursery() as traffic:
                for client in clients:
                    traffic.start_soon(send_until, client, stop_traffic, INTERVAL_S)
                with trio.fail_after(10):
                    await clients[0].wait_offset(40)

                counter_key = f"{cluster.prefix}:room:{room}:offset"
                redis_kept = await lose_data(loss, redis, clients, counter_key)
                acked = max(offset for c in clients for offset in c.acked.values())
                await trio.sleep(OUTAGE_S)
                await redis.start()
                restarted_at = time.monotonic()

                await probe_reaches_everyone(probe, everyone, "probe after restart")
                recovered_at = time.monotonic()
                await trio.sleep(0.5)  # traffic on the recovered cluster
                stop_traffic.set()

            head = await settle_all(everyone, timeout_s=30)
            room_messages = verify_room(everyone, scenario, head=head)
            await wait_archived(cluster, room, head, timeout_s=30)
            archived_s = time.monotonic() - restarted_at
            assert await es_messages(cluster, room) == room_messages
            assert await history(api, tokens["u0"], room) == room_messages
            await close_all(everyone)

    for client in clients:
        assert not client.close_codes, client.close_codes  # the connections lived through it
    record(scenario, "acknowledged before the fault (newest offset)", acked, "")
    record(scenario, "of them Redis came back with (room offset it held)", redis_kept, "")
    record(scenario, "message delivered to every member again, after restart",
           recovered_at - restarted_at)  # fmt: skip
    record(scenario, "Elasticsearch holds every offset, after restart", archived_s)
