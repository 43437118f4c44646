"""``chatnode migrate``: MySQL files applied once, in order, under a lock; the Elasticsearch
template and index put idempotently; the exit code. File parsing tests need no service."""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import pytest
import trio

pytest.importorskip("MySQLdb", reason="needs the cluster extra: pip install -e '.[cluster]'")
pytest.importorskip("elasticsearch", reason="needs the cluster extra: pip install -e '.[cluster]'")

import MySQLdb

from chatnode.adapters.elasticsearch import dead_letters_index, es_client, messages_index
from chatnode.adapters.elasticsearch.migrations import (
    dead_letters_template,
    messages_template,
    migrate_elasticsearch,
)
from chatnode.adapters.migration import MigrationError
from chatnode.adapters.mysql import Connection, MysqlDirectory, MysqlPool, MysqlUrl, close_quietly
from chatnode.adapters.mysql.migrations import (
    SCHEMA_DIR,
    migrate_mysql,
    mysql_migrations,
    shipped_mysql_version,
    split_sql,
)
from chatnode.config import Config
from chatnode.core import errors
from chatnode.core.models import ChatMessage, Cursor, Member, Room, SearchQuery
from chatnode.core.ports import ArchiveRefused
from chatnode.wiring import migrate
from tests.contracts.conftest import es_test_prefix, mysql_test_database
from tests.contracts.harness import require_service
from tests.es_cleanup import drop_es_prefix

integration = pytest.mark.integration
T0 = 1_700_000_000_000


@pytest.fixture
def mysql_url() -> str:
    return require_service("CHATNODE_TEST_MYSQL_URL")


@pytest.fixture
def es_url() -> str:
    return require_service("CHATNODE_TEST_ES_URL")


@asynccontextmanager
async def new_database_url(mysql_url: str) -> AsyncIterator[str]:
    """The URL of a database that does not exist yet (migrate creates it); dropped on exit."""
    name = f"chatnode_test_{secrets.token_hex(6)}"

    def drop() -> None:
        conn = MysqlUrl.parse(mysql_url).connect(
            connect_timeout_s=5, io_timeout_s=30, database=False
        )
        try:
            conn.cursor().execute(f"DROP DATABASE IF EXISTS `{name}`")
        finally:
            close_quietly(conn)

    try:
        yield urlunsplit(urlsplit(mysql_url)._replace(path="/" + name))
    finally:
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(drop)


async def applied_versions(url: str) -> list[int]:
    def select(conn: Connection) -> list[int]:
        cursor = conn.cursor()
        cursor.execute("SELECT version FROM schema_migrations ORDER BY version")
        return [int(v) for (v,) in cursor.fetchall()]

    async with MysqlPool.from_url(url, size=1) as pool:
        return await pool.run(select)


async def tables(url: str) -> set[str]:
    def select(conn: Connection) -> set[str]:
        cursor = conn.cursor()
        cursor.execute("SHOW TABLES")
        return {name for (name,) in cursor.fetchall()}

    async with MysqlPool.from_url(url, size=1) as pool:
        return await pool.run(select)


# --- files (no service) --------------------------------------------------------------------------


def test_split_sql_drops_comments_and_splits_at_line_ending_semicolons() -> None:
    text = (
        "-- a comment; with a semicolon;\n"
        "CREATE TABLE a (x INT);\n"
        "  -- indented comment\n"
        "INSERT INTO a VALUES (';');  \n"
        "CREATE TABLE b (\n  y INT\n)\n;\n\n"
    )

    assert split_sql(text) == [
        "CREATE TABLE a (x INT)",
        "INSERT INTO a VALUES (';')",
        "CREATE TABLE b (\n  y INT\n)",
    ]


def test_the_shipped_migrations_are_numbered_from_1() -> None:
    migrations = mysql_migrations(SCHEMA_DIR)

    assert [m.version for m in migrations] == list(range(1, len(migrations) + 1))
    assert shipped_mysql_version() == len(migrations)
    assert all(m.statements for m in migrations)


def test_badly_named_or_duplicate_files_are_refused(tmp_path: Path) -> None:
    (tmp_path / "0001_init.sql").write_text("SELECT 1;\n")
    (tmp_path / "init.sql").write_text("SELECT 1;\n")
    with pytest.raises(MigrationError, match="NNNN_name"):
        mysql_migrations(tmp_path)

    (tmp_path / "init.sql").unlink()
    (tmp_path / "01_again.sql").write_text("SELECT 1;\n")
    with pytest.raises(MigrationError, match="used by two files"):
        mysql_migrations(tmp_path)


def test_the_template_matches_the_prefix_and_the_message_fields() -> None:
    template = messages_template("acme")

    assert template["index_patterns"] == ["acme-messages*"]
    fields = template["template"]["mappings"]["properties"]
    assert fields == {
        "chatroom": {"type": "integer"},
        "offset": {"type": "long"},
        "user": {"type": "keyword"},
        "message": {"type": "text", "analyzer": "standard"},
        "timestamp": {"type": "date", "format": "epoch_millis"},
        "event": {"type": "keyword"},
        "by": {"type": "keyword"},
    }
    with pytest.raises(ValueError, match="lowercase"):
        messages_template("Acme")


def test_the_dead_letters_template_is_strict_and_keeps_documents_as_bytes() -> None:
    template = dead_letters_template("acme")

    assert template["index_patterns"] == ["acme-dead-letters*"]
    mappings = template["template"]["mappings"]
    assert mappings["dynamic"] == "strict"
    assert mappings["properties"]["document"] == {"type": "binary"}
    assert mappings["properties"]["stored"] == {"type": "binary"}


# --- MySQL ---------------------------------------------------------------------------------------


@integration
async def test_migrate_mysql_creates_the_database_and_applies_once(mysql_url: str) -> None:
    async with new_database_url(mysql_url) as url:
        assert await migrate_mysql(url) == [1, 2, 3, 4]
        assert await migrate_mysql(url) == []

        assert await applied_versions(url) == [1, 2, 3, 4]
        assert {"users", "rooms", "memberships", "schema_migrations"} <= await tables(url)
        async with MysqlDirectory.from_url(url) as directory:
            await directory.check()


@integration
async def test_concurrent_migrations_apply_each_file_once(mysql_url: str) -> None:
    async with new_database_url(mysql_url) as url:
        results: list[list[int]] = []

        async def run() -> None:
            results.append(await migrate_mysql(url))

        async with trio.open_nursery() as nursery:
            for _ in range(4):
                nursery.start_soon(run)

        assert sorted(results) == [[], [], [], [1, 2, 3, 4]]
        assert await applied_versions(url) == [1, 2, 3, 4]


@integration
async def test_an_interrupted_migration_runs_again_from_its_first_statement(
    mysql_url: str, tmp_path: Path
) -> None:
    (tmp_path / "0001_a.sql").write_text("CREATE TABLE IF NOT EXISTS a (x INT);\n")
    second = tmp_path / "0002_b.sql"
    second.write_text("CREATE TABLE IF NOT EXISTS b (y INT);\nTHIS IS NOT SQL;\n")

    async with new_database_url(mysql_url) as url:
        with pytest.raises(MigrationError, match="MySQL refused a migration") as failed:
            await migrate_mysql(url, directory=tmp_path)
        assert isinstance(failed.value.__cause__, MySQLdb.ProgrammingError)
        assert await applied_versions(url) == [1]
        assert {"a", "b"} <= await tables(url)  # DDL committed before the failure

        second.write_text("CREATE TABLE IF NOT EXISTS b (y INT);\nCREATE TABLE c (z INT);\n")
        assert await migrate_mysql(url, directory=tmp_path) == [2]
        assert await applied_versions(url) == [1, 2]
        assert {"a", "b", "c"} <= await tables(url)


@integration
async def test_accounts_migration_keeps_every_user_and_membership(
    mysql_url: str, tmp_path: Path
) -> None:
    """0002 on a database of version 1 with users, rooms and memberships: every user stays
    (names colliding ignoring case too: the oldest keeps the name's key, the others are
    reached by their exact name), each gets an id, memberships stay; the file runs again
    from its first statement as an interrupted migration would; new names collide ignoring
    case."""
    (tmp_path / "0001_init.sql").write_text((SCHEMA_DIR / "0001_init.sql").read_text())
    async with new_database_url(mysql_url) as url:
        assert await migrate_mysql(url, directory=tmp_path) == [1]

        def seed(conn: Connection) -> None:
            cursor = conn.cursor()
            cursor.executemany(
                "INSERT INTO users (name, password_hash, is_admin, created_at_ms)"
                " VALUES (%s, %s, %s, %s)",
                [
                    ("ann", "h-ann", 0, 3),
                    ("ANN", "h-ANN", 1, 1),
                    ("Ann", "h-Ann", 0, 2),
                    ("bob", "h-bob", 0, 4),
                ],
            )
            cursor.execute("INSERT INTO rooms (name, created_at_ms) VALUES ('lobby', 1)")
            cursor.executemany(
                "INSERT INTO memberships (room_id, user, joined_at_ms) VALUES (1, %s, 5)",
                [("ann",), ("ANN",), ("bob",)],
            )

        async with MysqlPool.from_url(url, size=1) as pool:
            await pool.run(seed)
        assert await migrate_mysql(url) == [2, 3, 4]

        def again(conn: Connection) -> None:  # an interrupted run starts over
            cursor = conn.cursor()
            for statement in mysql_migrations()[1].statements:
                cursor.execute(statement)

        async with MysqlPool.from_url(url, size=1) as pool:
            await pool.run(again)

        async with MysqlDirectory.from_url(url) as directory:
            await directory.check()
            found = {name: await directory.get_user(name) for name in ("ann", "ANN", "Ann")}
            assert {name: u.password_hash for name, u in found.items() if u} == {
                "ann": "h-ann",
                "ANN": "h-ANN",
                "Ann": "h-Ann",
            }
            ids = {u.id for u in found.values() if u}
            assert len(ids) == 3 and 0 not in ids
            oldest = await directory.get_user("aNN")  # another case: the oldest account
            assert oldest is not None and oldest.name == "ANN" and oldest.is_admin
            assert await directory.list_members(1) == ["ANN", "ann", "bob"]
            for taken in ("aNn", "BOB"):
                with pytest.raises(errors.Conflict):
                    await directory.create_user(taken, "h", created_at_ms=9)
            carol = await directory.create_user("carol", "h", created_at_ms=9)
            assert carol.id > max(ids)


@integration
async def test_0003_keeps_rooms_public_and_members_members_and_runs_again(
    mysql_url: str, tmp_path: Path
) -> None:
    """0003 on a database of version 2 in use (users, rooms, memberships): every room
    becomes public with no owner (none was recorded), every member a member, joined when
    they joined; the file runs again from its first statement as an interrupted migration
    would; then a direct room is one per pair (the unique key) and bans keep users out."""
    for name in ("0001_init.sql", "0002_accounts.sql"):
        (tmp_path / name).write_text((SCHEMA_DIR / name).read_text())
    async with new_database_url(mysql_url) as url:
        assert await migrate_mysql(url, directory=tmp_path) == [1, 2]

        def seed(conn: Connection) -> None:
            cursor = conn.cursor()
            cursor.executemany(
                "INSERT INTO users (name, password_hash, is_admin, created_at_ms)"
                " VALUES (%s, 'h', 0, 1)",
                [("ann",), ("bob",)],
            )
            cursor.execute("INSERT INTO rooms (name, created_at_ms) VALUES ('lobby', 1)")
            cursor.executemany(
                "INSERT INTO memberships (room_id, user, joined_at_ms) VALUES (1, %s, 5)",
                [("ann",), ("bob",)],
            )

        async with MysqlPool.from_url(url, size=1) as pool:
            await pool.run(seed)
        assert await migrate_mysql(url) == [3, 4]

        def again(conn: Connection) -> None:  # an interrupted run starts over
            cursor = conn.cursor()
            for statement in mysql_migrations()[2].statements:
                cursor.execute(statement)

        async with MysqlPool.from_url(url, size=1) as pool:
            await pool.run(again)

        async with MysqlDirectory.from_url(url) as directory:
            await directory.check()
            assert await directory.get_room(1) == Room(1, "lobby", 1, "public", None)
            assert await directory.list_roles(1) == [
                Member("ann", "member", 5),
                Member("bob", "member", 5),
            ]
            room, made = await directory.direct_room("ann", "bob", created_at_ms=9)
            assert made and room.visibility == "direct"
            assert await directory.direct_room("bob", "ann", created_at_ms=9) == (room, False)
            assert await directory.ban(1, "bob", by="ann", at_ms=9)
            with pytest.raises(errors.Forbidden):
                await directory.add_member(1, "bob", max_members=10)


@integration
async def test_an_unreachable_mysql_is_unavailable() -> None:
    from chatnode.core.errors import Unavailable

    with pytest.raises(Unavailable):
        await migrate_mysql("mysql://chatnode:chatnode@127.0.0.1:1/chatnode")


# --- Elasticsearch -------------------------------------------------------------------------------


@asynccontextmanager
async def cleanup_prefix(es_url: str) -> AsyncIterator[str]:
    prefix = f"chatnode-test-{secrets.token_hex(6)}"
    try:
        yield prefix
    finally:
        await drop_es_prefix(es_url, prefix)


@integration
async def test_migrate_elasticsearch_twice_and_concurrently(es_url: str) -> None:
    async with cleanup_prefix(es_url) as prefix:
        results: list[bool] = []

        async def run() -> None:
            results.append(await migrate_elasticsearch(es_url, prefix))

        async with trio.open_nursery() as nursery:
            for _ in range(3):
                nursery.start_soon(run)
        assert sorted(results) == [False, False, True]
        assert await migrate_elasticsearch(es_url, prefix) is False

        es = es_client(es_url)
        try:
            index = messages_index(prefix)
            mapping = await es.indices.get_mapping(index=index)
            properties = mapping[index]["mappings"]["properties"]
            assert properties["chatroom"] == {"type": "integer"}
            assert properties["timestamp"] == {"type": "date", "format": "epoch_millis"}
            templates = await es.indices.get_index_template(name=index)
            assert templates["index_templates"][0]["index_template"]["index_patterns"] == [
                f"{prefix}-messages*"
            ]
            letters = dead_letters_index(prefix)
            mapping = await es.indices.get_mapping(index=letters)
            assert mapping[letters]["mappings"]["dynamic"] == "strict"
            assert mapping[letters]["mappings"]["properties"]["kept_at"]["type"] == "date"
        finally:
            await es.close()


@integration
async def test_migrate_elasticsearch_adds_new_fields_to_an_existing_index(es_url: str) -> None:
    async with cleanup_prefix(es_url) as prefix:
        index = messages_index(prefix)
        es = es_client(es_url)
        try:
            await es.indices.create(
                index=index, mappings={"properties": {"chatroom": {"type": "integer"}}}
            )

            assert await migrate_elasticsearch(es_url, prefix) is False

            mapping = await es.indices.get_mapping(index=index)
            assert set(mapping[index]["mappings"]["properties"]) == {
                "chatroom",
                "offset",
                "user",
                "message",
                "timestamp",
                "event",
                "by",
            }
        finally:
            await es.close()


@integration
async def test_0004_adds_cursors_to_a_database_in_use_and_runs_again(
    mysql_url: str, tmp_path: Path
) -> None:
    """0004 on a database of version 3 with rooms and members: nothing existing changes,
    members start with no cursor; the file runs again from its first statement."""
    for name in ("0001_init.sql", "0002_accounts.sql", "0003_room_access.sql"):
        (tmp_path / name).write_text((SCHEMA_DIR / name).read_text())
    async with new_database_url(mysql_url) as url:
        assert await migrate_mysql(url, directory=tmp_path) == [1, 2, 3]
        async with MysqlDirectory.from_url(url) as directory:
            await directory.create_user("ann", "h", created_at_ms=1)
            room = await directory.create_room("lobby", created_at_ms=1)
            await directory.add_member(room.id, "ann", max_members=9)
        assert await migrate_mysql(url) == [4]

        def again(conn: Connection) -> None:  # an interrupted run starts over
            cursor = conn.cursor()
            for statement in mysql_migrations()[3].statements:
                cursor.execute(statement)

        async with MysqlPool.from_url(url, size=1) as pool:
            await pool.run(again)
        async with MysqlDirectory.from_url(url) as directory:
            await directory.check()
            assert await directory.list_members(room.id) == ["ann"]
            assert await directory.room_cursors(room.id) == []
            await directory.advance_cursors([Cursor(room.id, "ann", 5, 2)])
            assert await directory.room_cursors(room.id) == [Cursor(room.id, "ann", 5, 2)]


OLD_MESSAGES_MAPPING = {  # version 1 of schema/messages_template.json: no membership changes
    "dynamic": "strict",
    "properties": {
        "chatroom": {"type": "integer"},
        "offset": {"type": "long"},
        "user": {"type": "keyword"},
        "message": {"type": "text", "analyzer": "standard"},
        "timestamp": {"type": "date", "format": "epoch_millis"},
    },
}


@integration
async def test_migrate_elasticsearch_lets_an_index_with_messages_keep_membership_changes(
    es_url: str,
) -> None:
    """An index made with the mapping of before membership changes, holding messages: the
    migration adds ``event`` and ``by`` (again: nothing changes); its messages stay, changes
    are then stored and read back, and search still finds the messages only."""
    from chatnode.adapters.elasticsearch import EsArchive

    old = [ChatMessage(1, 1, "bob", "old apple", T0), ChatMessage(1, 2, "ann", "apple", T0 + 1)]
    change = ChatMessage(1, 3, "apple", "", T0 + 2, "added", "bob")
    async with cleanup_prefix(es_url) as prefix:
        index = messages_index(prefix)
        es = es_client(es_url)
        try:
            await es.indices.create(index=index, mappings=OLD_MESSAGES_MAPPING)
            async with EsArchive.from_url(es_url, prefix=prefix) as archive:
                with pytest.raises(ArchiveRefused):  # the old mapping is strict
                    await archive.store([change.document])
                await archive.store([m.document for m in old])

            assert await migrate_elasticsearch(es_url, prefix) is False
            assert await migrate_elasticsearch(es_url, prefix) is False

            mapping = await es.indices.get_mapping(index=index)
            properties = mapping[index]["mappings"]["properties"]
            assert properties["event"] == properties["by"] == {"type": "keyword"}
            assert mapping[index]["mappings"]["dynamic"] == "strict"
            async with EsArchive.from_url(es_url, prefix=prefix) as archive:
                await archive.store([change.document, old[0].document])
                await archive.refresh()
                read = await archive.read(1, after_offset=0, up_to_offset=9, limit=9)
                hits = await archive.search(SearchQuery("apple"))
                last = await archive.last_offset(1)
            assert read == [*old, change]
            assert sorted(hit.message.key for hit in hits) == ["1:1", "1:2"]
            assert last == 3
        finally:
            await es.close()


@integration
async def test_migrate_elasticsearch_refuses_a_conflicting_mapping(es_url: str) -> None:
    async with cleanup_prefix(es_url) as prefix:
        es = es_client(es_url)
        try:
            await es.indices.create(
                index=messages_index(prefix),
                mappings={"properties": {"user": {"type": "text"}}},
            )
        finally:
            await es.close()

        with pytest.raises(MigrationError, match="cannot update in place"):
            await migrate_elasticsearch(es_url, prefix)


# --- chatnode migrate ----------------------------------------------------------------------------


@integration
async def test_migrate_exit_codes(mysql_url: str, es_url: str) -> None:
    async with mysql_test_database(mysql_url) as db_url, es_test_prefix(es_url) as prefix:
        assert await migrate(Config()) == 0  # embedded: nothing to do
        assert (
            await migrate(Config(mysql_url=db_url, elasticsearch_url=es_url, key_prefix=prefix))
            == 0
        )
        assert (
            await migrate(Config(mysql_url="mysql://chatnode:chatnode@127.0.0.1:1/chatnode")) == 1
        )
        assert await migrate(Config(elasticsearch_url="http://127.0.0.1:1", key_prefix=prefix)) == 1
        assert await migrate(Config(elasticsearch_url=es_url, key_prefix="Not-Lowercase")) == 1
