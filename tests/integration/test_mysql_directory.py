"""MysqlDirectory and its pool against a real MySQL/MariaDB, beyond the Directory contract:
server-side statement bounds, cancellation, pool exhaustion, dropped connections, utf8mb4,
and what a missing schema or server looks like. Each test gets its own database."""

from __future__ import annotations

import threading
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import contextmanager

import pytest
import trio

pytest.importorskip("MySQLdb", reason="needs the cluster extra: pip install -e '.[cluster]'")

from chatnode.adapters.mysql import Connection, MysqlDirectory, MysqlPool, MysqlUrl, close_quietly
from chatnode.core import errors
from tests.contracts.conftest import mysql_test_database
from tests.contracts.harness import require_service

pytestmark = pytest.mark.integration

T0 = 1_700_000_000_000
# Portable "hold the statement for 5 s": MySQL's SLEEP() alone returns 1 when interrupted by
# max_execution_time instead of failing; as part of a WHERE clause it fails on both servers.
SLOW_SELECT = "SELECT 1 FROM (SELECT 1 AS x) AS t WHERE SLEEP(5) = 0"


@pytest.fixture
def mysql_url() -> str:
    return require_service("CHATNODE_TEST_MYSQL_URL")


@pytest.fixture
async def db_url(mysql_url: str) -> AsyncIterator[str]:
    async with mysql_test_database(mysql_url) as url:
        yield url


def connection_id(conn: Connection) -> int:
    cursor = conn.cursor()
    cursor.execute("SELECT CONNECTION_ID()")
    return int(cursor.fetchone()[0])


def run_sql(sql: str) -> Callable[[Connection], list[tuple[object, ...]]]:
    def run(conn: Connection) -> list[tuple[object, ...]]:
        cursor = conn.cursor()
        cursor.execute(sql)
        return list(cursor.fetchall())

    return run


@contextmanager
def admin_connection(url: str) -> Iterator[Connection]:
    conn = MysqlUrl.parse(url).connect(connect_timeout_s=5, io_timeout_s=30)
    try:
        yield conn
    finally:
        close_quietly(conn)


async def kill_connection(url: str, thread_id: int) -> None:
    def kill() -> None:
        with admin_connection(url) as conn:
            conn.cursor().execute(f"KILL {int(thread_id)}")

    await trio.to_thread.run_sync(kill)


async def server_is_mariadb(url: str) -> bool:
    def version() -> str:
        with admin_connection(url) as conn:
            return str(run_sql("SELECT VERSION()")(conn)[0][0])

    return "mariadb" in (await trio.to_thread.run_sync(version)).lower()


# --- statement bounds and cancellation ---------------------------------------------------------


async def test_a_statement_over_the_limit_is_unavailable_and_the_connection_survives(
    db_url: str,
) -> None:
    async with MysqlPool.from_url(db_url, size=1, statement_timeout_s=0.5) as pool:
        before = await pool.run(connection_id)
        start = trio.current_time()

        with pytest.raises(errors.Unavailable, match="did not finish in time"):
            await pool.run(run_sql(SLOW_SELECT))

        assert trio.current_time() - start < 3.0  # the server stopped it, not the 5 s sleep
        assert await pool.run(connection_id) == before
        assert pool.mariadb is (await server_is_mariadb(db_url))


async def test_a_cancelled_call_waits_for_the_server_bound_then_reuses_the_connection(
    db_url: str,
) -> None:
    async with MysqlPool.from_url(db_url, size=1, statement_timeout_s=0.5) as pool:
        before = await pool.run(connection_id)
        start = trio.current_time()

        with trio.move_on_after(0.05) as scope:
            try:
                await pool.run(run_sql(SLOW_SELECT))
            except errors.Unavailable:
                # The thread's outcome arrives first; the cancellation at the next checkpoint.
                await trio.lowlevel.checkpoint()
        elapsed = trio.current_time() - start

        assert scope.cancelled_caught
        assert 0.4 <= elapsed < 3.0  # Trio waited for the thread; the server bounded it
        assert await pool.run(connection_id) == before


async def test_a_busy_pool_is_unavailable_after_the_acquire_timeout(db_url: str) -> None:
    holding = trio.Event()
    release = threading.Event()

    def hold(conn: Connection) -> None:
        trio.from_thread.run_sync(holding.set)
        release.wait(10)

    async with MysqlPool.from_url(
        db_url, size=1, statement_timeout_s=5.0, acquire_timeout_s=0.2
    ) as pool:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(pool.run, hold)
            await holding.wait()
            try:
                with pytest.raises(errors.Unavailable, match="busy"):
                    await pool.run(connection_id)
            finally:
                release.set()
        assert await pool.run(connection_id) > 0


# --- dropped connections -----------------------------------------------------------------------


async def test_a_killed_connection_fails_one_call_then_is_replaced(db_url: str) -> None:
    async with MysqlPool.from_url(db_url, size=2, idle_ping_s=3600) as pool:
        first = await pool.run(connection_id)
        await kill_connection(db_url, first)

        with pytest.raises(errors.Unavailable):
            await pool.run(connection_id)

        assert await pool.run(connection_id) != first


async def test_an_idle_connection_is_pinged_and_replaced_without_a_failed_call(
    db_url: str,
) -> None:
    async with MysqlPool.from_url(db_url, size=1, idle_ping_s=0) as pool:
        first = await pool.run(connection_id)
        await kill_connection(db_url, first)

        assert await pool.run(connection_id) != first


async def test_an_unreachable_server_is_unavailable() -> None:
    async with MysqlDirectory.from_url(
        "mysql://chatnode:chatnode@127.0.0.1:1/chatnode", statement_timeout_s=1.0
    ) as directory:
        with pytest.raises(errors.Unavailable):
            await directory.get_user("bob")
        with pytest.raises(errors.Unavailable):
            await directory.check()


async def test_a_closed_directory_is_unavailable(db_url: str) -> None:
    directory = MysqlDirectory.from_url(db_url)
    await directory.check()
    await directory.aclose()

    with pytest.raises(errors.Unavailable, match="closed"):
        await directory.get_user("bob")


async def test_an_unmigrated_database_says_to_run_migrate(mysql_url: str) -> None:
    async with mysql_test_database(mysql_url) as url:

        def drop_schema(conn: Connection) -> None:
            for table in ("bans", "memberships", "rooms", "users", "schema_migrations"):
                conn.cursor().execute(f"DROP TABLE {table}")

        async with MysqlDirectory.from_url(url) as directory:
            await directory.pool.run(drop_schema)

            with pytest.raises(errors.Unavailable, match="chatnode migrate"):
                await directory.check()
            with pytest.raises(errors.Unavailable, match="chatnode migrate"):
                await directory.get_user("bob")


# --- data ----------------------------------------------------------------------------------------


async def test_utf8mb4_round_trips(db_url: str) -> None:
    async with MysqlDirectory.from_url(db_url) as directory:
        user = await directory.create_user("Zoë🎉", "h", created_at_ms=T0)
        room = await directory.create_room("☕ 𝄞 party 🎉", created_at_ms=T0)
        await directory.add_member(room.id, user.name, max_members=5)

        assert await directory.get_user("Zoë🎉") == user
        assert await directory.get_user("Zoe🎉") is None
        assert await directory.get_room(room.id) == room
        assert await directory.list_members(room.id) == ["Zoë🎉"]


async def test_a_value_too_long_for_its_column_is_a_bad_request(db_url: str) -> None:
    async with MysqlDirectory.from_url(db_url) as directory:
        with pytest.raises(errors.BadRequest):
            await directory.create_room("x" * 1001, created_at_ms=T0)
        with pytest.raises(errors.BadRequest):
            await directory.create_user("u" * 65, "h", created_at_ms=T0)


async def test_two_nodes_never_overfill_a_room(db_url: str) -> None:
    names = [f"user{n:02}" for n in range(30)]
    async with (
        MysqlDirectory.from_url(db_url, pool_size=4) as node_a,
        MysqlDirectory.from_url(db_url, pool_size=4) as node_b,
    ):
        for name in names:
            await node_a.create_user(name, "h", created_at_ms=T0)
        room = await node_a.create_room("hot", created_at_ms=T0)
        outcomes: list[bool | str] = []

        async def join(directory: MysqlDirectory, name: str) -> None:
            try:
                outcomes.append(await directory.add_member(room.id, name, max_members=7))
            except errors.RoomFull:
                outcomes.append("full")

        async with trio.open_nursery() as nursery:
            for n, name in enumerate(names):
                nursery.start_soon(join, node_a if n % 2 else node_b, name)

        assert outcomes.count(True) == 7
        assert outcomes.count("full") == 23
        assert len(await node_b.list_members(room.id)) == 7


async def test_deleting_users_cascades_to_memberships(db_url: str) -> None:
    async with MysqlDirectory.from_url(db_url) as directory:
        await directory.create_user("a", "h", created_at_ms=T0)
        room = await directory.create_room("r", created_at_ms=T0)
        await directory.add_member(room.id, "a", max_members=5)

        def delete_user(conn: Connection) -> None:
            conn.cursor().execute("DELETE FROM users WHERE name = 'a'")

        await directory.pool.run(delete_user)

        assert await directory.list_members(room.id) == []
