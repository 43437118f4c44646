"""The SQLite backend beyond the port contracts: schema, error mapping, the embedded bus."""

from __future__ import annotations

import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path

import attrs
import pytest
import trio
import trio.testing
from hypothesis import given, settings
from hypothesis import strategies as st

from chatnode.adapters.sqlite import (
    MIGRATIONS,
    SCHEMA_VERSION,
    LocalBroker,
    SqliteArchive,
    SqliteBus,
    SqliteDatabase,
    SqliteDirectory,
    fts_match_expression,
)
from chatnode.core import errors
from chatnode.core.models import ChatMessage, Draft, Room, RoomEvent, SearchQuery
from chatnode.core.validation import name_key
from tests.contracts.harness import Recorder, documents

T0 = 1_700_000_000_000


@pytest.fixture
async def db() -> AsyncIterator[SqliteDatabase]:
    async with await SqliteDatabase.open(":memory:") as database:
        yield database


# --- schema and lifecycle --------------------------------------------------------------------


async def test_data_and_schema_survive_reopening(tmp_path: Path) -> None:
    path = tmp_path / "chatnode.db"
    async with await SqliteDatabase.open(path) as first:
        await SqliteDirectory(first).create_user("bob", "h", created_at_ms=T0)
        await SqliteBus(first, LocalBroker()).publish(Draft(1, "bob", "kept", T0))

    async with await SqliteDatabase.open(path) as second:
        assert await second.schema_version() == SCHEMA_VERSION
        assert await SqliteDirectory(second).get_user("bob") is not None
        assert await SqliteBus(second, LocalBroker()).last_offset(1) == 1


async def test_a_newer_schema_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "chatnode.db"
    async with await SqliteDatabase.open(path):
        pass
    with sqlite3.connect(path) as conn:
        conn.execute("UPDATE schema_version SET version = ?", (SCHEMA_VERSION + 1,))
    conn.close()

    with pytest.raises(RuntimeError, match="newer"):
        await SqliteDatabase.open(path)


async def test_file_database_uses_wal_and_foreign_keys(tmp_path: Path) -> None:
    async with await SqliteDatabase.open(tmp_path / "chatnode.db") as database:
        mode = await database.run(lambda c: c.execute("PRAGMA journal_mode").fetchone()[0])
        keys = await database.run(lambda c: c.execute("PRAGMA foreign_keys").fetchone()[0])
    assert (mode, keys) == ("wal", 1)


async def test_an_unopenable_file_is_unavailable(tmp_path: Path) -> None:
    with pytest.raises(errors.Unavailable):
        await SqliteDatabase.open(tmp_path / "missing-dir" / "chatnode.db")


async def test_a_closed_database_is_unavailable(db: SqliteDatabase) -> None:
    await db.aclose()
    await db.aclose()

    with pytest.raises(errors.Unavailable):
        await db.check()
    with pytest.raises(errors.Unavailable):
        await SqliteDirectory(db).get_user("bob")
    with pytest.raises(errors.Unavailable):
        await SqliteBus(db, LocalBroker()).publish(Draft(1, "bob", "appended on the loop", T0))


async def test_an_append_failing_on_the_loop_is_unavailable(db: SqliteDatabase) -> None:
    await db.run(lambda c: c.execute("PRAGMA query_only=1"))  # every write: SQLITE_READONLY

    with pytest.raises(errors.Unavailable):
        await SqliteBus(db, LocalBroker()).publish(Draft(1, "bob", "refused", T0))

    await db.run(lambda c: c.execute("PRAGMA query_only=0"))
    assert (await SqliteBus(db, LocalBroker()).publish(Draft(1, "bob", "accepted", T0))).offset == 1


async def test_a_locked_database_is_unavailable_then_recovers(tmp_path: Path) -> None:
    path = tmp_path / "chatnode.db"
    async with await SqliteDatabase.open(path, busy_timeout_ms=50) as database:
        directory = SqliteDirectory(database)
        other = sqlite3.connect(path, isolation_level=None)
        other.execute("BEGIN IMMEDIATE")  # another process holds the write lock

        with pytest.raises(errors.Unavailable):
            await directory.create_user("bob", "h", created_at_ms=T0)

        other.execute("ROLLBACK")
        other.close()
        await directory.create_user("bob", "h", created_at_ms=T0)


async def test_sql_errors_are_bugs_not_unavailability(db: SqliteDatabase) -> None:
    with pytest.raises(sqlite3.OperationalError):
        await db.run(lambda c: c.execute("SELECT nope FROM nowhere"))


# --- the embedded room log is the archive ----------------------------------------------------


async def test_a_published_message_is_archived_and_searchable_at_once(db: SqliteDatabase) -> None:
    bus, archive = SqliteBus(db, LocalBroker()), SqliteArchive(db)

    message = await bus.publish(Draft(1, "bob", "embedded durability", T0))
    await archive.store(documents([message]))  # an archiver re-storing it changes nothing

    assert await archive.read(1, after_offset=0, up_to_offset=10, limit=10) == [message]
    hits = await archive.search(SearchQuery("durability"))
    assert [hit.message for hit in hits] == [message]


async def test_offsets_continue_after_archived_messages(db: SqliteDatabase) -> None:
    await SqliteArchive(db).store(documents([ChatMessage(1, 41, "bob", "imported", T0)]))

    message = await SqliteBus(db, LocalBroker()).publish(Draft(1, "bob", "next", T0))

    assert message.offset == 42


async def test_a_publish_cancelled_before_it_starts_publishes_nothing(db: SqliteDatabase) -> None:
    bus = SqliteBus(db, LocalBroker())
    with trio.CancelScope() as scope:
        scope.cancel()
        await bus.publish(Draft(1, "bob", "never", T0))

    assert await bus.last_offset(1) == 0


def fts_integrity_check(conn: sqlite3.Connection) -> None:
    """Raise if the FTS5 index disagrees with the messages table."""
    conn.execute("INSERT INTO messages_fts(messages_fts, rank) VALUES ('integrity-check', 1)")


async def test_a_version_1_database_keeps_its_index_and_indexes_new_messages(
    tmp_path: Path,
) -> None:
    path = tmp_path / "chatnode.db"
    with sqlite3.connect(path, isolation_level=None) as conn:  # schema 1: an FTS5 insert trigger
        for statement in MIGRATIONS[0]:
            conn.execute(statement)
        conn.execute("CREATE TABLE schema_version (id INTEGER PRIMARY KEY, version INTEGER)")
        conn.execute("INSERT INTO schema_version VALUES (1, 1)")
        conn.execute(
            'INSERT INTO messages (room_id, "offset", user, text, timestamp_ms)'
            " VALUES (1, 1, 'bob', 'old news', ?)",
            (T0,),
        )
    conn.close()

    async with await SqliteDatabase.open(path) as database:
        new = await SqliteBus(database, LocalBroker()).publish(Draft(1, "bob", "new news", T0))
        hits = await SqliteArchive(database).search(SearchQuery("news"))
        await database.run(fts_integrity_check)

    assert new.offset == 2
    assert sorted(hit.message.text for hit in hits) == ["new news", "old news"]


async def test_a_version_4_database_keeps_every_user_membership_and_message(
    tmp_path: Path,
) -> None:
    """Migration 5 (accounts) on a database with users, rooms, memberships and messages:
    every user stays (names colliding ignoring case too: the oldest keeps the name's key,
    the others are reached by their exact name), each gets an id, and new ids continue above
    them."""
    path = tmp_path / "chatnode.db"
    with sqlite3.connect(path, isolation_level=None) as conn:
        for step in MIGRATIONS[:4]:
            for statement in step:
                conn.execute(statement)
        conn.execute("CREATE TABLE schema_version (id INTEGER PRIMARY KEY, version INTEGER)")
        conn.execute("INSERT INTO schema_version VALUES (1, 4)")
        conn.executemany(
            "INSERT INTO users (name, password_hash, is_admin, created_at_ms) VALUES (?, ?, ?, ?)",
            [
                ("ann", "h-ann", 0, 3),
                ("ANN", "h-ANN", 1, 1),
                ("Ann", "h-Ann", 0, 2),
                ("bob", "h-bob", 0, 4),
            ],
        )
        conn.execute("INSERT INTO rooms (name, created_at_ms) VALUES ('lobby', 1)")
        conn.executemany(
            "INSERT INTO memberships (room_id, user) VALUES (1, ?)", [("ann",), ("ANN",)]
        )
        conn.execute(
            'INSERT INTO messages (room_id, "offset", user, text, timestamp_ms)'
            " VALUES (1, 1, 'ANN', 'kept', ?)",
            (T0,),
        )
    conn.close()

    async with await SqliteDatabase.open(path) as database:
        directory = SqliteDirectory(database)
        found = {name: await directory.get_user(name) for name in ("ann", "ANN", "Ann", "bob")}
        oldest = await directory.get_user("aNN")
        members = await directory.list_members(1)
        roles = {m.role for m in await directory.list_roles(1)}
        room = await directory.get_room(1)
        history = await SqliteArchive(database).read(1, after_offset=0, up_to_offset=9, limit=9)
        with pytest.raises(errors.Conflict):
            await directory.create_user("aNn", "h", created_at_ms=9)
        carol = await directory.create_user("carol", "h", created_at_ms=9)

    assert {name: u.password_hash for name, u in found.items() if u} == {
        "ann": "h-ann",
        "ANN": "h-ANN",
        "Ann": "h-Ann",
        "bob": "h-bob",
    }
    ids = sorted(u.id for u in found.values() if u)
    assert ids == [1, 2, 3, 4] and carol.id == 5
    assert oldest is not None and oldest.name == "ANN" and oldest.is_admin
    assert members == ["ANN", "ann"]
    assert roles == {"member"}  # schema 6: existing members are members,
    assert room == Room(1, "lobby", 1, "public", None)  # existing rooms public, no owner
    assert [m.text for m in history] == ["kept"]


async def test_a_version_6_database_keeps_its_messages_and_takes_membership_changes(
    tmp_path: Path,
) -> None:
    """Migration 7 (membership changes) on a database with indexed and pending messages:
    each stays a message (no event), searchable; changes then take the next offsets."""
    path = tmp_path / "chatnode.db"
    with sqlite3.connect(path, isolation_level=None) as conn:
        conn.create_function("chatnode_name_key", 1, name_key, deterministic=True)
        for step in MIGRATIONS[:6]:
            for statement in step:
                conn.execute(statement)
        conn.execute("CREATE TABLE schema_version (id INTEGER PRIMARY KEY, version INTEGER)")
        conn.execute("INSERT INTO schema_version VALUES (1, 6)")
        conn.executemany(
            'INSERT INTO messages (room_id, "offset", user, text, timestamp_ms)'
            " VALUES (1, ?, 'bob', ?, ?)",
            [(1, "old indexed news", T0), (2, "old pending news", T0 + 1)],
        )
        conn.execute(  # the first is in the FTS index, the second still pending
            'INSERT INTO messages_fts(rowid, text) SELECT id, text FROM messages WHERE "offset" = 1'
        )
        conn.execute(
            "DELETE FROM messages_fts_pending WHERE id = (SELECT id FROM messages"
            ' WHERE "offset" = 1)'
        )
    conn.close()

    async with await SqliteDatabase.open(path) as database:
        assert await database.schema_version() == SCHEMA_VERSION
        bus, archive = SqliteBus(database, LocalBroker()), SqliteArchive(database)
        added = await bus.publish(Draft.membership(1, "news", "added", by="bob", at_ms=T0 + 2))
        hits = await archive.search(SearchQuery("news"))
        history = await archive.read(1, after_offset=0, up_to_offset=9, limit=9)
        await database.run(fts_integrity_check)

    assert added == ChatMessage(1, 3, "news", "", T0 + 2, "added", "bob")
    assert history == [
        ChatMessage(1, 1, "bob", "old indexed news", T0),
        ChatMessage(1, 2, "bob", "old pending news", T0 + 1),
        added,
    ]
    assert sorted(hit.message.offset for hit in hits) == [1, 2]


async def test_a_membership_change_sent_again_with_its_client_id_keeps_its_event(
    db: SqliteDatabase,
) -> None:
    bus = SqliteBus(db, LocalBroker())
    change = Draft(1, "eve", "", T0, client_id="m1", event="removed", by="bob")

    first = await bus.publish(change)
    again = await bus.publish(attrs.evolve(change, timestamp_ms=T0 + 1))

    assert first == again == ChatMessage(1, 1, "eve", "", T0, "removed", "bob")
    assert await bus.read_log(1, after_offset=0, limit=5) == [first]


async def test_deleting_or_editing_messages_keeps_the_index_exact(db: SqliteDatabase) -> None:
    bus, archive = SqliteBus(db, LocalBroker()), SqliteArchive(db)
    for n in range(4):
        await bus.publish(Draft(1, "bob", f"word{n} common", T0))
    await archive.search(SearchQuery("common"))  # offsets 1-4 indexed
    for n in range(4, 8):
        await bus.publish(Draft(1, "bob", f"word{n} common", T0))  # offsets 5-8 waiting

    def edit(conn: sqlite3.Connection) -> None:
        conn.execute('DELETE FROM messages WHERE "offset" IN (1, 5)')
        conn.execute("UPDATE messages SET text = 'edited common' WHERE \"offset\" IN (2, 6)")
        conn.execute('UPDATE messages SET id = id + 100 WHERE "offset" IN (3, 7)')

    await db.run(edit)
    hits = await archive.search(SearchQuery("common", limit=20))
    await db.run(fts_integrity_check)

    assert sorted(hit.message.offset for hit in hits) == [2, 3, 4, 6, 7, 8]
    assert [h.message.offset for h in await archive.search(SearchQuery("edited"))] == [6, 2]
    for gone in ("word0", "word4", "word1", "word5"):  # offsets 1, 5 deleted; 2, 6 edited
        assert await archive.search(SearchQuery(gone)) == []


# --- publish on the event loop: never waits on a lock or a checkpoint -------------------------


async def test_a_publish_meeting_another_connections_lock_waits_in_the_worker(
    tmp_path: Path,
) -> None:
    path = tmp_path / "chatnode.db"
    async with await SqliteDatabase.open(path, busy_timeout_ms=10_000) as database:
        bus = SqliteBus(database, LocalBroker())
        await bus.publish(Draft(1, "bob", "m1", T0))
        other = sqlite3.connect(path, isolation_level=None)
        other.execute("BEGIN IMMEDIATE")  # another process holds the write lock
        published: list[ChatMessage] = []

        async def publish() -> None:
            published.append(await bus.publish(Draft(1, "bob", "m2", T0)))

        with trio.fail_after(20):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(publish)
                # The loop runs on while the publish waits for the lock in the worker thread.
                await trio.testing.wait_all_tasks_blocked()
                assert published == []
                other.execute("ROLLBACK")
        other.close()

    assert [m.offset for m in published] == [2]


async def test_a_publish_cancelled_while_it_waits_in_the_worker_completes(
    tmp_path: Path,
) -> None:
    path = tmp_path / "chatnode.db"
    async with await SqliteDatabase.open(path, busy_timeout_ms=10_000) as database:
        bus, recorder = SqliteBus(database, LocalBroker()), Recorder()
        other = sqlite3.connect(path, isolation_level=None)
        other.execute("BEGIN IMMEDIATE")  # the append waits for this lock in the worker
        published: list[ChatMessage] = []

        async def publish(*, task_status: trio.TaskStatus[trio.CancelScope]) -> None:
            with trio.CancelScope() as scope:
                task_status.started(scope)
                published.append(await bus.publish(Draft(1, "bob", "completes", T0)))
                await trio.lowlevel.checkpoint()  # the cancellation arrives here
                published.append(ChatMessage(0, 0, "never", "reached", 0))

        with trio.fail_after(20):
            async with trio.open_nursery() as nursery:
                await nursery.start(bus.serve, recorder)
                await bus.subscribe(1)
                publisher = await nursery.start(publish)
                await trio.testing.wait_all_tasks_blocked()
                publisher.cancel()
                other.execute("ROLLBACK")
                await recorder.wait_for_messages(1, 1)
                nursery.cancel_scope.cancel()
        other.close()

        assert [m.offset for m in published] == [1]
        assert recorder.messages == published
        assert await bus.last_offset(1) == 1


async def test_upkeep_indexes_and_checkpoints_in_batches(tmp_path: Path) -> None:
    path = tmp_path / "chatnode.db"
    async with await SqliteDatabase.open(path) as database:
        bus = SqliteBus(database, LocalBroker())
        for n in range(1500):  # about 6,000 WAL pages without checkpoints
            await bus.publish(Draft(1 + n % 3, "bob", f"message {n}", T0))
        other = sqlite3.connect(path, isolation_level=None)
        (pending,) = other.execute("SELECT COUNT(*) FROM messages_fts_pending").fetchone()
        _, wal_pages, _ = other.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
        other.close()

        assert 0 < pending < 500  # indexed in batches, the last batch still waiting
        assert 0 < wal_pages < 2000  # near SQLite's own automatic checkpoint (1,000 pages)
        hits = await SqliteArchive(database).search(SearchQuery("message", limit=2000))
        assert len(hits) == 1500


# --- the embedded bus's inbox ------------------------------------------------------------------


class GatedRecorder(Recorder):
    """Blocks inside the first delivery until ``gate`` is set; logs calls in order."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = trio.Event()
        self.entered = trio.Event()
        self.calls: list[str] = []

    async def deliver(self, message: ChatMessage) -> None:
        self.calls.append(f"deliver {message.offset}")
        self.entered.set()
        await self.gate.wait()
        await super().deliver(message)

    async def resubscribed(self) -> None:
        self.calls.append("resubscribed")
        await super().resubscribed()


async def test_a_full_inbox_drops_then_reports_resubscribed(db: SqliteDatabase) -> None:
    bus = SqliteBus(db, LocalBroker(), inbox_size=2)
    recorder = GatedRecorder()
    async with trio.open_nursery() as nursery:
        await nursery.start(bus.serve, recorder)
        await bus.subscribe(1)
        await bus.publish(Draft(1, "bob", "m1", T0))
        await recorder.entered.wait()  # the serve task holds m1; the inbox is empty

        for n in range(2, 6):  # m2, m3 fill the inbox; m4, m5 are dropped
            await bus.publish(Draft(1, "bob", f"m{n}", T0))
        recorder.gate.set()
        await recorder.wait_until(lambda: recorder.resubscribes == 1)
        await bus.publish(Draft(1, "bob", "m6", T0))
        await recorder.wait_for_messages(1, 4)

        assert recorder.calls == [
            "deliver 1",
            "deliver 2",
            "deliver 3",
            "resubscribed",
            "deliver 6",
        ]
        assert [m.offset for m in await bus.read_log(1, after_offset=3, limit=10)] == [4, 5, 6]
        nursery.cancel_scope.cancel()


async def test_a_bus_serves_once_at_a_time(db: SqliteDatabase) -> None:
    bus = SqliteBus(db, LocalBroker())
    async with trio.open_nursery() as nursery:
        await nursery.start(bus.serve, Recorder())
        with pytest.raises(RuntimeError, match="already serving"):
            await bus.serve(Recorder(), task_status=trio.TASK_STATUS_IGNORED)
        nursery.cancel_scope.cancel()


async def test_a_bus_can_serve_again_after_stopping(db: SqliteDatabase) -> None:
    bus = SqliteBus(db, LocalBroker())
    for attempt in range(2):
        recorder = Recorder()
        async with trio.open_nursery() as nursery:
            await nursery.start(bus.serve, recorder)
            await bus.subscribe(1)
            await bus.publish(Draft(1, "bob", f"try {attempt}", T0))
            await recorder.wait_for_messages(1, 1)
            nursery.cancel_scope.cancel()


async def test_signals_must_be_json_and_no_handler_can_change_another_s(
    db: SqliteDatabase,
) -> None:
    broker = LocalBroker()
    bus_a, bus_b = SqliteBus(db, broker), SqliteBus(db, broker)
    seen_a, seen_b = Recorder(), Recorder()
    with pytest.raises(ValueError, match="must be JSON"):
        RoomEvent.of(type="typing", user=object())
    event = RoomEvent.of(type="typing", users=["bob"])
    async with trio.open_nursery() as nursery:
        await nursery.start(bus_a.serve, seen_a)
        await nursery.start(bus_b.serve, seen_b)
        await bus_a.subscribe(1)
        await bus_b.subscribe(1)

        await bus_a.signal(1, event)
        await seen_a.wait_until(lambda: bool(seen_a.signals))
        await seen_b.wait_until(lambda: bool(seen_b.signals))

        with pytest.raises(TypeError):
            seen_a.signals[0][1].fields["type"] = "mallory"  # type: ignore[index]
        assert seen_b.signals == [(1, event)]
        assert dict(seen_b.signals[0][1].fields) == {"type": "typing", "users": ["bob"]}
        nursery.cancel_scope.cancel()


# --- search query safety -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("hello", '"hello"'),
        ("Hello, World!", '"Hello" "World"'),
        ('say "hi" AND (bye', '"say" "hi" "AND" "bye"'),
        ("snake_case text:x", '"snake" "case" "text" "x"'),
        ("café", '"café"'),
        ('"', None),
        ("  *^-:() ", None),
        ("", None),
    ],
)
def test_fts_match_expression(text: str, expected: str | None) -> None:
    assert fts_match_expression(text) == expected


@given(st.text(max_size=60))
@settings(max_examples=300, deadline=None)
def test_any_query_is_a_valid_fts5_expression(text: str) -> None:
    expression = fts_match_expression(text)
    if expression is None:
        return
    conn = sqlite3.connect(":memory:")
    try:
        conn.execute("CREATE VIRTUAL TABLE t USING fts5(text, tokenize='unicode61')")
        conn.execute("INSERT INTO t VALUES (?)", (text,))
        conn.execute("SELECT rowid FROM t WHERE t MATCH ?", (expression,)).fetchall()
    finally:
        conn.close()


async def test_a_client_id_is_forgotten_after_the_dedup_window(tmp_path: Path) -> None:
    db = await SqliteDatabase.open(tmp_path / "dedup.sqlite3")
    try:
        bus = SqliteBus(db, LocalBroker(), dedup_window_s=60)
        first = await bus.publish(Draft(1, "bob", "hi", 1_000_000, client_id="c1"))
        within = await bus.publish(Draft(1, "bob", "hi", 1_059_999, client_id="c1"))
        after = await bus.publish(Draft(1, "bob", "hi", 1_060_000, client_id="c1"))
        again = await bus.publish(Draft(1, "bob", "hi", 1_060_001, client_id="c1"))

        assert (first.offset, within.offset, after.offset, again.offset) == (1, 1, 2, 2)
        assert within == first  # the stored message, its timestamp included
    finally:
        await db.aclose()
