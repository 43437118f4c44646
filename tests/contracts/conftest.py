"""The implementation registries of the contract suites, and their fixtures.

Each registry maps a test id to an :class:`~tests.contracts.harness.Impl`; every test of a
suite runs once per entry (``pytest_generate_tests`` reads the registries at collection). What
an implementation's ``open(url)`` yields, per port:

    DIRECTORY_IMPLS   a Directory            ARCHIVE_IMPLS    an Archive
    BUS_IMPLS         NewBus: makes buses ("nodes") sharing one backend
    PRESENCE_IMPLS    PresenceRig: a Presence and an ``advance(seconds)`` for its clock
    ARCHIVE_FEED_IMPLS  FeedRig: feeds per consumer, the bus filling them, ``advance``
    REVOCATIONS_IMPLS NewRevocations: makes Revocations ("nodes") sharing one store
    TICKETS_IMPLS     TicketsRig: makes Tickets ("nodes") sharing one store, ``advance``
    RATE_LIMITS_IMPLS RateLimitsRig: makes RateLimits ("nodes") sharing one store, ``advance``

Add a real-service implementation with ``service_env`` set (see ``harness.py``): it is marked
``integration`` and gated on that environment variable (``CHATNODE_TEST_MYSQL_URL``,
``CHATNODE_TEST_REDIS_URL``, ``CHATNODE_TEST_ES_URL``), with a unique database / key prefix /
index per test so runs never see each other's data.
"""

from __future__ import annotations

import secrets
import tempfile
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import pytest
import trio

from chatnode.adapters.memory import MemoryPresence
from chatnode.adapters.sqlite import (
    LocalBroker,
    SqliteArchive,
    SqliteBus,
    SqliteDatabase,
    SqliteDirectory,
    SqliteRevocations,
)
from chatnode.core.ports import (
    Archive,
    ArchiveFeed,
    Bus,
    Directory,
    RateLimits,
    Revocations,
    Tickets,
)

from .harness import (
    FakeClock,
    FeedRig,
    Impl,
    NewBus,
    NewRevocations,
    PresenceRig,
    RateLimitsRig,
    TicketsRig,
    impl_params,
    open_impl,
)

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
            broker = LocalBroker()  # the nodes share the database, so its order too

            async def new_bus() -> Bus:
                await trio.lowlevel.checkpoint()
                return SqliteBus(db, broker)

            yield new_bus

    return Impl(open_buses)


# --- MySQL and Elasticsearch (integration: imported lazily, the client may be absent) ------


@asynccontextmanager
async def mysql_test_database(url: str) -> AsyncIterator[str]:
    """A new, migrated database ``chatnode_test_<hex>`` on the server of ``url`` (whose user
    may create it); yields its URL; dropped on exit."""
    from chatnode.adapters.mysql import MysqlUrl, close_quietly
    from chatnode.adapters.mysql.migrations import migrate_mysql

    server = MysqlUrl.parse(url)
    name = f"chatnode_test_{secrets.token_hex(6)}"
    test_url = urlunsplit(urlsplit(url)._replace(path="/" + name))

    def drop() -> None:
        conn = server.connect(connect_timeout_s=5, io_timeout_s=30, database=False)
        try:
            conn.cursor().execute(f"DROP DATABASE IF EXISTS `{name}`")
        finally:
            close_quietly(conn)

    try:
        await migrate_mysql(test_url)
        yield test_url
    finally:
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(drop)


@asynccontextmanager
async def open_mysql_directory(url: str) -> AsyncIterator[Directory]:
    from chatnode.adapters.mysql import MysqlDirectory

    async with (
        mysql_test_database(url) as test_url,
        MysqlDirectory.from_url(test_url, pool_size=4, statement_timeout_s=5.0) as directory,
    ):
        yield directory


@asynccontextmanager
async def es_test_prefix(url: str) -> AsyncIterator[str]:
    """A migrated archive index under a new prefix ``chatnode-test-<hex>``; yields the
    prefix; the index and its template are deleted on exit."""
    from chatnode.adapters.elasticsearch.migrations import migrate_elasticsearch
    from tests.es_cleanup import drop_es_prefix

    prefix = f"chatnode-test-{secrets.token_hex(6)}"
    try:
        await migrate_elasticsearch(url, prefix)
        yield prefix
    finally:
        await drop_es_prefix(url, prefix)


@asynccontextmanager
async def open_es_archive(url: str) -> AsyncIterator[Archive]:
    from chatnode.adapters.elasticsearch import EsArchive

    async with es_test_prefix(url) as prefix, EsArchive.from_url(url, prefix=prefix) as archive:
        yield archive


# --- Redis (integration: imported lazily, the client may be absent) -------------------------

REDIS_TEST_TIMEOUT_S = 5.0


@asynccontextmanager
async def redis_test_clients(url: str, count: int = 1) -> AsyncIterator[tuple[list[Any], str]]:
    """``count`` clients (:class:`~tests.redis_support.RedisAdmin`) of the Redis at ``url``
    (one per "node") and a new key prefix ``chatnode-test-<hex>``; every key under the
    prefix is deleted on exit."""
    from tests.redis_support import RedisAdmin

    prefix = f"chatnode-test-{secrets.token_hex(6)}"
    async with AsyncExitStack() as stack:
        clients = [
            await stack.enter_async_context(
                RedisAdmin.from_url(url, timeout_s=REDIS_TEST_TIMEOUT_S)
            )
            for _ in range(count)
        ]
        try:
            yield clients, prefix
        finally:
            with trio.CancelScope(shield=True), trio.move_on_after(REDIS_TEST_TIMEOUT_S):
                await clients[0].delete_prefix(prefix)


@asynccontextmanager
async def open_redis_buses(url: str) -> AsyncIterator[NewBus]:
    """Buses on one Redis and prefix, each "node" on its own client (three, in turn: a client
    enters its task group here, in the fixture's task)."""
    from chatnode.adapters.redis import RespClient
    from tests.redis_support import OpeningRedisBus

    async with redis_test_clients(url) as (_, prefix):
        clients = [RespClient.from_url(url, timeout_s=REDIS_TEST_TIMEOUT_S) for _ in range(3)]
        made = 0

        async def new_bus() -> Bus:
            nonlocal made
            made += 1
            await trio.lowlevel.checkpoint()
            return OpeningRedisBus(clients[made % len(clients)], prefix, room_log_length=100)

        try:
            yield new_bus
        finally:
            for client in clients:
                await client.aclose()


@asynccontextmanager
async def open_redis_cached_directory(url: str) -> AsyncIterator[Directory]:
    """The cache in front of an in-memory SQLite directory: it must be invisible."""
    from chatnode.adapters.redis import RedisCachedDirectory

    async with redis_test_clients(url) as (clients, prefix), sqlite_database(False) as db:
        yield RedisCachedDirectory(SqliteDirectory(db), clients[0], prefix, ttl_s=60.0)


@asynccontextmanager
async def redis_presence(url: str) -> AsyncIterator[PresenceRig]:
    from chatnode.adapters.redis import RedisPresence

    async with redis_test_clients(url) as (clients, prefix):
        presence = RedisPresence(clients[0], prefix)
        yield PresenceRig(presence, trio.sleep)
        await presence.aclose()


@asynccontextmanager
async def redis_feeds(url: str) -> AsyncIterator[FeedRig]:
    from chatnode.adapters.redis import RedisArchiveFeed, RespClient
    from tests.redis_support import OpeningRedisBus

    claim_idle_ms = 400
    async with redis_test_clients(url) as (_, prefix):
        publisher = RespClient.from_url(url, timeout_s=REDIS_TEST_TIMEOUT_S)
        bus = OpeningRedisBus(publisher, prefix)
        feed_clients: list[RespClient] = []

        def new_feed(consumer: str) -> ArchiveFeed:
            commands, reads = (
                RespClient.from_url(url, timeout_s=REDIS_TEST_TIMEOUT_S) for _ in range(2)
            )
            feed_clients.extend([commands, reads])
            return RedisArchiveFeed(
                commands, prefix, consumer=consumer, lease_ms=claim_idle_ms, reads=reads
            )

        try:
            yield FeedRig(bus.publish, new_feed, claim_idle_ms, trio.sleep)
        finally:
            for client in [publisher, *feed_clients]:
                await client.aclose()


@asynccontextmanager
async def memory_revocations(_url: str) -> AsyncIterator[NewRevocations]:
    """One node: every call hands out the same store."""
    from chatnode.adapters.memory import MemoryRevocations

    revocations = MemoryRevocations()

    async def new_revocations() -> Revocations:
        await trio.lowlevel.checkpoint()
        return revocations

    yield new_revocations


def sqlite_revocations(in_file: bool) -> Impl[NewRevocations]:
    """Each "node" (or ``chatnode users`` process) on the same database."""

    @asynccontextmanager
    async def open_revocations(_url: str) -> AsyncIterator[NewRevocations]:
        async with sqlite_database(in_file) as db:

            async def new_revocations() -> Revocations:
                await trio.lowlevel.checkpoint()
                return SqliteRevocations(db)

            yield new_revocations

    return Impl(open_revocations)


@asynccontextmanager
async def memory_tickets(_url: str) -> AsyncIterator[TicketsRig]:
    """One node: every call hands out the same store, on a fake clock."""
    from chatnode.adapters.memory import MemoryTickets

    clock = FakeClock()
    tickets = MemoryTickets(clock=clock)

    async def new_tickets() -> Tickets:
        await trio.lowlevel.checkpoint()
        return tickets

    yield TicketsRig(new_tickets, clock.advance)


@asynccontextmanager
async def redis_tickets(url: str) -> AsyncIterator[TicketsRig]:
    """Each "node" on a client of its own, under one key prefix; real time passes."""
    from chatnode.adapters.redis import RedisTickets

    async with redis_test_clients(url, count=2) as (clients, prefix):
        made = 0

        async def new_tickets() -> Tickets:
            nonlocal made
            made += 1
            await trio.lowlevel.checkpoint()
            return RedisTickets(clients[made % len(clients)], prefix)

        yield TicketsRig(new_tickets, trio.sleep)


@asynccontextmanager
async def redis_revocations(url: str) -> AsyncIterator[NewRevocations]:
    """Each "node" on a client of its own, under one key prefix."""
    from chatnode.adapters.redis import RedisRevocations

    async with redis_test_clients(url, count=2) as (clients, prefix):
        made = 0

        async def new_revocations() -> Revocations:
            nonlocal made
            made += 1
            await trio.lowlevel.checkpoint()
            return RedisRevocations(clients[made % len(clients)], prefix)

        yield new_revocations


@asynccontextmanager
async def memory_rate_limits(_url: str) -> AsyncIterator[RateLimitsRig]:
    """One node on a fake clock: every call hands out the same store."""
    from chatnode.adapters.memory import MemoryRateLimits

    clock = FakeClock()
    limits = MemoryRateLimits(clock=clock)

    async def new_limits() -> RateLimits:
        await trio.lowlevel.checkpoint()
        return limits

    yield RateLimitsRig(new_limits, clock.advance)


@asynccontextmanager
async def redis_rate_limits(url: str) -> AsyncIterator[RateLimitsRig]:
    """Each "node" on a RespClient of its own, under one key prefix; Redis' clock is real."""
    from chatnode.adapters.redis import RedisRateLimits, RespClient

    async with redis_test_clients(url) as (_, prefix):
        clients: list[RespClient] = []

        async def new_limits() -> RateLimits:
            client = RespClient.from_url(url, timeout_s=REDIS_TEST_TIMEOUT_S)
            clients.append(client)
            await trio.lowlevel.checkpoint()
            return RedisRateLimits(client, prefix)

        try:
            yield RateLimitsRig(new_limits, trio.sleep)
        finally:
            for client in clients:
                await client.aclose()


@asynccontextmanager
async def memory_presence(_url: str) -> AsyncIterator[PresenceRig]:
    clock = FakeClock()
    presence = MemoryPresence(clock=clock)
    yield PresenceRig(presence, clock.advance)
    await presence.aclose()


DIRECTORY_IMPLS: dict[str, Impl[Directory]] = {
    "sqlite-memory": sqlite_directory(in_file=False),
    "sqlite-file": sqlite_directory(in_file=True),
    "mysql": Impl(open_mysql_directory, service_env="CHATNODE_TEST_MYSQL_URL"),
    "redis-cached": Impl(open_redis_cached_directory, service_env="CHATNODE_TEST_REDIS_URL"),
}
ARCHIVE_IMPLS: dict[str, Impl[Archive]] = {
    "sqlite-memory": sqlite_archive(in_file=False),
    "sqlite-file": sqlite_archive(in_file=True),
    "elasticsearch": Impl(open_es_archive, service_env="CHATNODE_TEST_ES_URL"),
}
BUS_IMPLS: dict[str, Impl[NewBus]] = {
    "sqlite-memory": sqlite_buses(in_file=False),
    "sqlite-file": sqlite_buses(in_file=True),
    "redis": Impl(open_redis_buses, service_env="CHATNODE_TEST_REDIS_URL"),
}
PRESENCE_IMPLS: dict[str, Impl[PresenceRig]] = {
    "memory": Impl(memory_presence),
    "redis": Impl(redis_presence, service_env="CHATNODE_TEST_REDIS_URL"),
}
ARCHIVE_FEED_IMPLS: dict[str, Impl[FeedRig]] = {
    "redis": Impl(redis_feeds, service_env="CHATNODE_TEST_REDIS_URL"),
}
REVOCATIONS_IMPLS: dict[str, Impl[NewRevocations]] = {
    "memory": Impl(memory_revocations),
    "sqlite-memory": sqlite_revocations(in_file=False),
    "sqlite-file": sqlite_revocations(in_file=True),
    "redis": Impl(redis_revocations, service_env="CHATNODE_TEST_REDIS_URL"),
}
TICKETS_IMPLS: dict[str, Impl[TicketsRig]] = {
    "memory": Impl(memory_tickets),
    "redis": Impl(redis_tickets, service_env="CHATNODE_TEST_REDIS_URL"),
}
RATE_LIMITS_IMPLS: dict[str, Impl[RateLimitsRig]] = {
    "memory": Impl(memory_rate_limits),
    "redis": Impl(redis_rate_limits, service_env="CHATNODE_TEST_REDIS_URL"),
}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Every contract test here is bounded by ``TEST_DEADLINE_S`` (the root conftest's
    stopper: the test and its fixtures, setup and teardown)."""
    here = Path(__file__).parent
    for item in items:
        if item.path.is_relative_to(here):
            item.add_marker(pytest.mark.deadline(TEST_DEADLINE_S))


_REGISTRIES: dict[str, dict[str, Any]] = {
    "directory_impl": DIRECTORY_IMPLS,
    "archive_impl": ARCHIVE_IMPLS,
    "bus_impl": BUS_IMPLS,
    "presence_impl": PRESENCE_IMPLS,
    "feed_impl": ARCHIVE_FEED_IMPLS,
    "revocations_impl": REVOCATIONS_IMPLS,
    "tickets_impl": TICKETS_IMPLS,
    "rate_limits_impl": RATE_LIMITS_IMPLS,
}


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Run each test once per registered implementation of the port it uses.

    Read at collection time, so an entry added to a registry anywhere before collection counts.
    """
    for argname, registry in _REGISTRIES.items():
        if argname in metafunc.fixturenames:
            metafunc.parametrize(argname, impl_params(registry))


@pytest.fixture
async def directory(directory_impl: str) -> AsyncIterator[Directory]:
    async with open_impl(DIRECTORY_IMPLS[directory_impl]) as instance:
        yield instance


@pytest.fixture
async def archive(archive_impl: str) -> AsyncIterator[Archive]:
    async with open_impl(ARCHIVE_IMPLS[archive_impl]) as instance:
        yield instance


@pytest.fixture
async def new_bus(bus_impl: str) -> AsyncIterator[NewBus]:
    async with open_impl(BUS_IMPLS[bus_impl]) as instance:
        yield instance


@pytest.fixture
async def presence_rig(presence_impl: str) -> AsyncIterator[PresenceRig]:
    async with open_impl(PRESENCE_IMPLS[presence_impl]) as instance:
        yield instance


@pytest.fixture
async def feed_rig(feed_impl: str) -> AsyncIterator[FeedRig]:
    async with open_impl(ARCHIVE_FEED_IMPLS[feed_impl]) as instance:
        yield instance


@pytest.fixture
async def new_revocations(revocations_impl: str) -> AsyncIterator[NewRevocations]:
    async with open_impl(REVOCATIONS_IMPLS[revocations_impl]) as instance:
        yield instance


@pytest.fixture
async def tickets_rig(tickets_impl: str) -> AsyncIterator[TicketsRig]:
    async with open_impl(TICKETS_IMPLS[tickets_impl]) as instance:
        yield instance


@pytest.fixture
async def rate_limits_rig(rate_limits_impl: str) -> AsyncIterator[RateLimitsRig]:
    async with open_impl(RATE_LIMITS_IMPLS[rate_limits_impl]) as instance:
        yield instance
