"""The implementation registries of the contract suites, and their fixtures.

Each registry maps a test id to an :class:`~tests.contracts.harness.Impl`; every test of a
suite runs once per entry (``pytest_generate_tests`` reads the registries at collection). What
an implementation's ``open(url)`` yields, per port:

    DIRECTORY_IMPLS   a Directory            ARCHIVE_IMPLS    an Archive
    BUS_IMPLS         NewBus: makes buses ("nodes") sharing one backend
    PRESENCE_IMPLS    PresenceRig: a Presence and an ``advance(seconds)`` for its clock

Add a real-service implementation with ``service_env`` set (see ``harness.py``): it is marked
``integration`` and gated on that environment variable (``CHATNODE_TEST_MYSQL_URL``,
``CHATNODE_TEST_REDIS_URL``, ``CHATNODE_TEST_ES_URL``), with a unique database / key prefix /
index per test so runs never see each other's data.
"""

from __future__ import annotations

import tempfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio

from chatnode.adapters.memory import MemoryPresence
from chatnode.adapters.sqlite import SqliteArchive, SqliteBus, SqliteDatabase, SqliteDirectory
from chatnode.core.ports import Archive, Bus, Directory

from .harness import FakeClock, Impl, NewBus, PresenceRig, impl_params, open_impl

TEST_DEADLINE_S = 10.0


@asynccontextmanager
async def sqlite_database(in_file: bool) -> AsyncIterator[SqliteDatabase]:
    """A fresh database: private in-memory, or a file in a temporary directory (WAL on disk)."""
    if not in_file:
        async with await SqliteDatabase.open(":memory:") as db:
            yield db
        return
    with tempfile.TemporaryDirectory(prefix="chatnode-test-") as tmp:
        async with await SqliteDatabase.open(Path(tmp) / "chatnode.db") as db:
            yield db


def sqlite_directory(in_file: bool) -> Impl[Directory]:
    @asynccontextmanager
    async def open_directory(_url: str) -> AsyncIterator[Directory]:
        async with sqlite_database(in_file) as db:
            yield SqliteDirectory(db)

    return Impl(open_directory)


def sqlite_archive(in_file: bool) -> Impl[Archive]:
    @asynccontextmanager
    async def open_archive(_url: str) -> AsyncIterator[Archive]:
        async with sqlite_database(in_file) as db:
            yield SqliteArchive(db)

    return Impl(open_archive)


def sqlite_buses(in_file: bool) -> Impl[NewBus]:
    @asynccontextmanager
    async def open_buses(_url: str) -> AsyncIterator[NewBus]:
        async with sqlite_database(in_file) as db:

            async def new_bus() -> Bus:
                await trio.lowlevel.checkpoint()
                return SqliteBus(db)

            yield new_bus

    return Impl(open_buses)


@asynccontextmanager
async def memory_presence(_url: str) -> AsyncIterator[PresenceRig]:
    clock = FakeClock()
    presence = MemoryPresence(clock=clock)
    yield PresenceRig(presence, clock.advance)
    await presence.aclose()


DIRECTORY_IMPLS: dict[str, Impl[Directory]] = {
    "sqlite-memory": sqlite_directory(in_file=False),
    "sqlite-file": sqlite_directory(in_file=True),
}
ARCHIVE_IMPLS: dict[str, Impl[Archive]] = {
    "sqlite-memory": sqlite_archive(in_file=False),
    "sqlite-file": sqlite_archive(in_file=True),
}
BUS_IMPLS: dict[str, Impl[NewBus]] = {
    "sqlite-memory": sqlite_buses(in_file=False),
    "sqlite-file": sqlite_buses(in_file=True),
}
PRESENCE_IMPLS: dict[str, Impl[PresenceRig]] = {
    "memory": Impl(memory_presence),
}


@pytest.fixture
async def deadline(nursery: trio.Nursery) -> None:
    """Fail a test still running after ``TEST_DEADLINE_S``: nothing hangs the suite.

    Every port fixture below depends on it, so every contract test is guarded. (Under
    pytest-trio a ``fail_after`` in a fixture would not cover the test, which runs in its own
    task; a fixture's crashing task cancels the tests that depend on that fixture.)
    """

    async def watchdog() -> None:
        await trio.sleep(TEST_DEADLINE_S)
        raise TimeoutError(f"the test ran longer than {TEST_DEADLINE_S} s")

    nursery.start_soon(watchdog)


_REGISTRIES: dict[str, dict[str, Any]] = {
    "directory_impl": DIRECTORY_IMPLS,
    "archive_impl": ARCHIVE_IMPLS,
    "bus_impl": BUS_IMPLS,
    "presence_impl": PRESENCE_IMPLS,
}


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Run each test once per registered implementation of the port it uses.

    Read at collection time, so an entry added to a registry anywhere before collection counts.
    """
    for argname, registry in _REGISTRIES.items():
        if argname in metafunc.fixturenames:
            metafunc.parametrize(argname, impl_params(registry))


@pytest.fixture
async def directory(directory_impl: str, deadline: None) -> AsyncIterator[Directory]:
    async with open_impl(DIRECTORY_IMPLS[directory_impl]) as instance:
        yield instance


@pytest.fixture
async def archive(archive_impl: str, deadline: None) -> AsyncIterator[Archive]:
    async with open_impl(ARCHIVE_IMPLS[archive_impl]) as instance:
        yield instance


@pytest.fixture
async def new_bus(bus_impl: str, deadline: None) -> AsyncIterator[NewBus]:
    async with open_impl(BUS_IMPLS[bus_impl]) as instance:
        yield instance


@pytest.fixture
async def presence_rig(presence_impl: str, deadline: None) -> AsyncIterator[PresenceRig]:
    async with open_impl(PRESENCE_IMPLS[presence_impl]) as instance:
        yield instance
