"""A real Redis restart under a serving RedisBus, on a private ``redis-server`` this test starts
(never the shared one): the bus survives the outage, reconnects, resubscribes, tells the node,
and offsets continue where they were because the server runs with AOF."""

from __future__ import annotations

import shutil
import socket
import subprocess
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path

import pytest
import trio

from chatnode.adapters.redis import RespClient
from chatnode.core import errors
from chatnode.core.models import Draft
from tests.contracts.harness import Recorder, require_service
from tests.redis_support import OpeningRedisBus

pytestmark = pytest.mark.integration

T0 = 1_700_000_000_000


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@asynccontextmanager
async def private_redis(port: int, data_dir: Path) -> AsyncIterator[trio.Process]:
    """A ``redis-server`` on ``port`` with AOF in ``data_dir``, ready; stopped on exit."""
    server = shutil.which("redis-server")
    if server is None:
        pytest.skip("redis-server is not installed (scripts/services install redis)")
    argv = [server, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
            "--appendonly", "yes", "--dir", str(data_dir)]  # fmt: skip
    async with trio.open_nursery() as nursery:
        process: trio.Process = await nursery.start(
            partial(trio.run_process, argv, stdout=subprocess.DEVNULL, check=False)
        )
        try:
            await wait_for_port(port)
            yield process
        finally:
            process.terminate()


async def wait_for_port(port: int) -> None:
    """Poll until the server accepts connections: a process gives no readiness event."""
    with trio.fail_after(10):
        while True:
            try:
                stream = await trio.open_tcp_stream("127.0.0.1", port)
            except OSError:
                await trio.sleep(0.02)
                continue
            await stream.aclose()
            return


async def test_the_bus_survives_a_real_redis_restart(tmp_path: Path, nursery: trio.Nursery) -> None:
    require_service("CHATNODE_TEST_REDIS_URL")  # the services (and redis-server) are installed
    port = free_port()
    url = f"redis://127.0.0.1:{port}/0"
    client = RespClient.from_url(url, timeout_s=2.0)
    try:
        async with private_redis(port, tmp_path) as first_server:
            bus = OpeningRedisBus(client, "restart", min_backoff_s=0.01, max_backoff_s=0.1)
            recorder = Recorder()
            await nursery.start(bus.serve, recorder)
            await bus.subscribe(1)
            before = await bus.publish(Draft(1, "bob", "before", T0))
            await recorder.wait_for_messages(1, 1)
            first_server.terminate()  # SIGTERM: Redis flushes the AOF and exits
            await first_server.wait()

        with pytest.raises(errors.Unavailable):
            await bus.publish(Draft(1, "bob", "while down", T0))

        async with private_redis(port, tmp_path):
            await recorder.wait_until(lambda: recorder.resubscribes == 1)
            after = await bus.publish(Draft(1, "bob", "after", T0))

            assert await recorder.wait_for_messages(1, 2) == [before, after]
            assert after.offset == 2
            assert await bus.read_log(1, after_offset=0, limit=10) == [before, after]
            nursery.cancel_scope.cancel()
    finally:
        await client.aclose()


async def test_the_client_fails_while_redis_is_down_and_reconnects_after(tmp_path: Path) -> None:
    """The client alone across a real restart: every call while Redis is down is
    ``Unavailable``; the first one after it gets a new connection (the next ``serial``, so a
    caller comparing replies knows they come from another run of the server)."""
    require_service("CHATNODE_TEST_REDIS_URL")
    port = free_port()
    async with RespClient.from_url(f"redis://127.0.0.1:{port}/0", timeout_s=2.0) as client:
        async with private_redis(port, tmp_path) as server:
            assert await client.call_tracked("SET", "k", "v") == (b"OK", 1)
            server.terminate()
            await server.wait()
        for _ in range(3):
            with pytest.raises(errors.Unavailable):
                await client.call("GET", "k")
        async with private_redis(port, tmp_path):
            assert await client.call_tracked("GET", "k") == (b"v", 2)  # AOF kept it
            assert client.connects == 2
