"""A ``redis-server`` of one fault test: its own port and data directory, started, stopped
and killed by PID, so the shared Redis of the other tests is never touched."""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import tempfile
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path

import trio

from chatnode.adapters.redis.client import RespClient
from chatnode.core import errors
from tests.cluster.harness import free_port

DURABLE: tuple[str, ...] = ("--save", "", "--appendonly", "yes", "--appendfsync", "always")
"""The recommended settings (docs/deployment.md): nothing acknowledged is lost on a crash."""
EVERYSEC: tuple[str, ...] = ("--save", "", "--appendonly", "yes", "--appendfsync", "everysec")
VOLATILE: tuple[str, ...] = ("--save", "", "--appendonly", "no")
"""No persistence: a restart starts empty (a ``SAVE`` still writes a snapshot that the next
start loads: a Redis that comes back with older data)."""


class DedicatedRedis:
    """``start()``; ``kill()`` (SIGKILL), ``shutdown_nosave()`` or ``stop()``; ``start()``
    again on the same port and data directory."""

    def __init__(self, data_dir: Path, persistence: Sequence[str] = DURABLE) -> None:
        self.port = free_port()
        self.data_dir = data_dir
        self.persistence = tuple(persistence)
        self.process: trio.Process | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    async def start(self) -> None:
        server = shutil.which("redis-server")
        assert server is not None
        argv = [server, "--port", str(self.port), "--bind", "127.0.0.1",
                *self.persistence, "--dir", str(self.data_dir)]  # fmt: skip
        log = (self.data_dir / "redis.log").open("ab")
        try:
            self.process = await trio.lowlevel.open_process(
                argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log
            )
        finally:
            log.close()
        with trio.fail_after(10):  # a process gives no readiness event: poll, bounded
            while True:
                try:
                    if await self.call("PING") == b"PONG":
                        return
                except errors.Unavailable:
                    pass
                await trio.sleep(0.01)

    async def call(self, *args: str) -> object:
        """One command on a connection of its own."""
        client = RespClient.from_url(self.url, timeout_s=5)
        try:
            return await client.call(*args)
        finally:
            await client.aclose()

    async def kill(self) -> None:
        assert self.process is not None
        self.process.kill()
        await self.process.wait()

    async def shutdown_nosave(self) -> None:
        """``SHUTDOWN NOSAVE``: Redis exits and, without persistence, forgets everything."""
        assert self.process is not None
        with contextlib.suppress(errors.Unavailable):  # the connection ends with the server
            await self.call("SHUTDOWN", "NOSAVE")
        with trio.fail_after(10):
            await self.process.wait()

    async def stop(self) -> None:
        with trio.CancelScope(shield=True):
            if self.process is not None and self.process.returncode is None:
                self.process.terminate()
                with trio.move_on_after(10):
                    await self.process.wait()
                if self.process.returncode is None:
                    self.process.kill()
                    await self.process.wait()


@asynccontextmanager
async def dedicated_redis(persistence: Sequence[str] = DURABLE) -> AsyncIterator[DedicatedRedis]:
    with tempfile.TemporaryDirectory(prefix="chatnode-redis-") as tmp:
        redis = DedicatedRedis(Path(tmp), persistence)
        await redis.start()
        try:
            yield redis
        finally:
            await redis.stop()
