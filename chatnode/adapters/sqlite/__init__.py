"""The embedded backend: Directory, Archive, Bus and Revocations on one SQLite database.

One :class:`SqliteDatabase` owns one ``sqlite3`` connection. The ports built on it
(:class:`SqliteDirectory`, :class:`SqliteArchive`, :class:`SqliteBus`,
:class:`SqliteRevocations`) share it; their ``aclose()`` releases nothing, the code that
opened the database closes it.

Rules that make it correct:

1. **One user of the connection at a time, and the loop never waits.** A call runs in a worker
   thread via ``trio.to_thread.run_sync`` under a ``CapacityLimiter(1)``, so the connection is
   never used by two threads at once. A call is not abandoned when cancelled: cancelled before
   its function started, it raises ``Cancelled`` and the function never runs; once started,
   the function finishes (and its transaction commits or rolls back) and the call returns its
   result, the cancellation coming at the caller's next checkpoint.
2. **The append of a message runs on the loop when it cannot wait** (``run(fn, inline=True)``).
   The thread hop costs more than the append. Node CPU per delivery in the single-node
   benchmark (3 rooms x 100 members, interleaved runs of one code snapshot, 2026-11-22): at 5k
   deliveries/s 23.4 us with the append in a ``to_thread`` worker, 20.5 with it on the loop,
   18.6 on the loop with batched indexing (rule 3); at 40k 14.0 / 13.4 / 11.8 (the worker with
   batched indexing: 22.8 and 13.5; an earlier run had 18.3 at 5k and 13.9 at 40k with no SQLite
   at all, and a dedicated long-lived thread saved only a third of the hop). With WAL and
   ``synchronous=NORMAL`` a commit is a write to the page cache, no fsync. What could make it
   wait never happens on the loop: it runs there only while no worker call holds the
   connection and no upkeep is due; the connection's busy timeout is 0 except during worker
   calls, so a write lock held by another connection fails the attempt at once and the call is
   repeated in the worker thread (``fn`` must be one transaction for that); and checkpoints
   (the fsyncs of WAL mode) run only in the worker thread (rule 3). The page cache itself may
   still make a write wait for the disk (a page under writeback, the file system's journal):
   of 35,000 appends at 40k deliveries/s the median took 0.15 ms, p99 0.5 ms, p99.9 4.4 ms
   (mostly the kernel giving the core to another process), and the longest waits for the disk
   were 10 and 32 ms, with other programs' databases writing to the same disk. The node
   pauses with it, as Redis does for its AOF write; a worker thread would delay only the acks.
3. **Upkeep in the worker, in batches.** Once ``UPKEEP_AFTER_CHANGES`` rows changed since the
   last upkeep, the next call goes to the worker thread, which first indexes the messages
   waiting for the full-text index (rule 5) in one transaction, then runs a PASSIVE checkpoint.
   SQLite's automatic checkpoint would run in whichever thread commits, so it is off. A message
   changes 2 rows and writes about 4 WAL pages, so the WAL stays near SQLite's own default of
   1,000 pages. Indexing a message with the others of its batch costs ~3 us; indexing it alone
   in its own commit (an FTS5 trigger) doubled the append (8.4 WAL pages, ~80 us instead of
   ~40 us of CPU per message).
4. **One call, one transaction.** A call that writes runs inside ``BEGIN IMMEDIATE`` ...
   ``COMMIT`` in its worker function, so a check-then-write (the member limit, the next room
   offset) is atomic against this process and against other processes on the same file.
5. **The room log is the archive.** ``messages`` holds every published message;
   ``SqliteBus.publish`` inserts there, ``SqliteArchive.store`` inserts there with
   ``INSERT OR IGNORE``. A message is durable (against a process crash; with
   ``synchronous=NORMAL`` a power loss may drop the last commits) the moment ``publish``
   returns, so the embedded node needs no archive feed. It is searchable at once too: an
   insert trigger lists the message in ``messages_fts_pending``, and ``search`` first indexes
   whatever is listed there (upkeep does it in between). The delete and update triggers keep
   the FTS5 index exact for listed and indexed rows alike.
6. **One order for every bus.** All buses on one database (several "nodes" in one process) share
   a :class:`_LocalBroker`. ``publish`` holds its FIFO lock across "insert, then hand the message
   to every subscribed bus's inbox", so every bus sees a room's messages in offset order.
7. **A bus never waits on a slow node.** Each serving bus has a bounded inbox drained by its own
   ``serve`` task, which alone calls the handler. When an inbox is full the bus drops messages
   until it has drained, then calls ``handler.resubscribed()`` -- what a Redis subscriber
   disconnected for a full output buffer sees -- and the node catches up with ``read_log``.
8. **The files are private.** The database holds password hashes and every message. A database
   file that does not exist is created empty, mode 0600, before SQLite opens it: SQLite gives
   the -wal and -shm files the database file's mode, so all three are this user's alone from
   their first byte. An existing database, -wal or -shm that others may read is made 0600,
   with a warning.

Errors: ``sqlite3.OperationalError`` for a busy, locked, unopenable, read-only, full or failing
disk maps to :class:`~chatnode.core.errors.Unavailable`, as does any use after ``aclose()``.
Other SQLite errors are bugs and propagate.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sqlite3
import stat
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from functools import partial
from typing import TYPE_CHECKING, Any, Final, NamedTuple, TypeVar

import attrs
import trio

from chatnode.adapters.lifecycle import ClosesOnExit
from chatnode.core import errors, ports, validation
from chatnode.core.models import (
    ChatMessage,
    DeadLetter,
    Draft,
    Refusal,
    RefusalKind,
    Revocation,
    RevocationChanges,
    RevocationKind,
    RevocationState,
    Room,
    SearchHit,
    SearchQuery,
    User,
)

T = TypeVar("T")
log = logging.getLogger(__name__)

# Each step moves the schema one version up; a step is never edited once released.
# ``messages`` has its own INTEGER PRIMARY KEY because the FTS5 index refers to rows by rowid,
# and VACUUM may renumber an implicit rowid; ``(room_id, offset)`` is its unique key.
_MIGRATIONS: Final[tuple[tuple[str, ...], ...]] = (
    (
        """CREATE TABLE users (
            name TEXT PRIMARY KEY,
            password_hash TEXT NOT NULL,
            is_admin INTEGER NOT NULL DEFAULT 0,
            created_at_ms INTEGER NOT NULL
        )""",
        """CREATE TABLE rooms (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            name TEXT NOT NULL,
            created_at_ms INTEGER NOT NULL
        )""",
        """CREATE TABLE memberships (
            room_id INTEGER NOT NULL REFERENCES rooms(id) ON DELETE CASCADE,
            user TEXT NOT NULL REFERENCES users(name) ON DELETE CASCADE,
            PRIMARY KEY (room_id, user)
        ) WITHOUT ROWID""",
        "CREATE INDEX memberships_by_user ON memberships(user)",
        """CREATE TABLE messages (
            id INTEGER PRIMARY KEY,
            room_id INTEGER NOT NULL,
            "offset" INTEGER NOT NULL,
            user TEXT NOT NULL,
            text TEXT NOT NULL,
            timestamp_ms INTEGER NOT NULL,
            UNIQUE (room_id, "offset")
        )""",
        "CREATE INDEX messages_by_user ON messages(user, timestamp_ms)",
        """CREATE VIRTUAL TABLE messages_fts USING fts5(
            text, content='messages', content_rowid='id',
            tokenize='unicode61 remove_diacritics 2'
        )""",
        """CREATE TRIGGER messages_fts_insert AFTER INSERT ON messages BEGIN
            INSERT INTO messages_fts(rowid, text) VALUES (new.id, new.text);
        END""",
        """CREATE TRIGGER messages_fts_delete AFTER DELETE ON messages BEGIN
            INSERT INTO messages_fts(messages_fts, rowid, text) VALUES ('delete', old.id, old.text);
        END""",
        """CREATE TRIGGER messages_fts_update AFTER UPDATE ON messages BEGIN
            INSERT INTO messages_fts(messages_fts, rowid, text) VALUES ('delete', old.id, old.text);
            INSERT INTO messages_fts(rowid, text) VALUES (new.id, new.text);
        END""",
    ),
    # 2: the FTS5 index is brought up to date in batches (module rule 3), not per insert.
    (
        "DROP TRIGGER messages_fts_insert",
        "DROP TRIGGER messages_fts_delete",
        "DROP TRIGGER messages_fts_update",
        "CREATE TABLE messages_fts_pending (id INTEGER PRIMARY KEY)",
        """CREATE TRIGGER messages_fts_pending_insert AFTER INSERT ON messages BEGIN
            INSERT INTO messages_fts_pending(id) VALUES (new.id);
        END""",
        """CREATE TRIGGER messages_fts_delete AFTER DELETE ON messages BEGIN
            INSERT INTO messages_fts(messages_fts, rowid, text) SELECT 'delete', old.id, old.text
                WHERE NOT EXISTS (SELECT 1 FROM messages_fts_pending WHERE id = old.id);
            DELETE FROM messages_fts_pending WHERE id = old.id;
        END""",
        """CREATE TRIGGER messages_fts_update AFTER UPDATE ON messages BEGIN
            INSERT INTO messages_fts(messages_fts, rowid, text) SELECT 'delete', old.id, old.text
                WHERE NOT EXISTS (SELECT 1 FROM messages_fts_pending WHERE id = old.id);
            INSERT INTO messages_fts(rowid, text) SELECT new.id, new.text
                WHERE NOT EXISTS (SELECT 1 FROM messages_fts_pending WHERE id = old.id);
            UPDATE messages_fts_pending SET id = new.id WHERE id = old.id;
        END""",
    ),
    # 3: the client ids of recent sends (idempotent send: ``SqliteBus``, dedup window).
    (
        """CREATE TABLE sent_ids (
            room_id INTEGER NOT NULL,
            user TEXT NOT NULL,
            client_id TEXT NOT NULL,
            "offset" INTEGER NOT NULL,
            expires_at_ms INTEGER NOT NULL,
            PRIMARY KEY (room_id, user, client_id)
        ) WITHOUT ROWID""",
        "CREATE INDEX sent_ids_by_expiry ON sent_ids(expires_at_ms)",
    ),
    # 4: documents the archive refused, kept for repair (``SqliteArchive.keep_dead_letters``).
    (
        """CREATE TABLE dead_letters (
            id INTEGER PRIMARY KEY,
            digest TEXT NOT NULL UNIQUE,
            kind TEXT NOT NULL,
            document BLOB NOT NULL,
            reason TEXT NOT NULL,
            stored BLOB,
            kept_at_ms INTEGER NOT NULL
        )""",
    ),
    # 5: accounts and revocations (``SqliteDirectory`` rule 1, ``SqliteRevocations``).
    # Existing users get ids in row order, and keys: where names collide by key, the oldest
    # account keeps the plain key, the others get "<key>#<name>" ('#' is in no valid name),
    # so every account stays, reached by its exact name.
    (
        "ALTER TABLE users ADD COLUMN id INTEGER",
        "ALTER TABLE users ADD COLUMN name_key TEXT",
        "ALTER TABLE users ADD COLUMN revoked_before_ms INTEGER NOT NULL DEFAULT 0",
        "UPDATE users SET id = rowid",
        "CREATE TABLE counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL) WITHOUT ROWID",
        "INSERT INTO counters (name, value) SELECT 'account_id', COALESCE(MAX(id), 0) FROM users",
        """UPDATE users SET name_key = ranked.name_key FROM (
            SELECT name, CASE
                WHEN ROW_NUMBER() OVER (
                    PARTITION BY chatnode_name_key(name) ORDER BY created_at_ms, name
                ) = 1 THEN chatnode_name_key(name)
                ELSE chatnode_name_key(name) || '#' || name
            END AS name_key FROM users
        ) AS ranked WHERE users.name = ranked.name""",
        "CREATE UNIQUE INDEX users_by_id ON users(id)",
        "CREATE UNIQUE INDEX users_by_name_key ON users(name_key)",
        """CREATE TABLE revocations (
            seq INTEGER PRIMARY KEY AUTOINCREMENT,
            kind TEXT NOT NULL,
            at_ms INTEGER NOT NULL,
            expires_at_ms INTEGER NOT NULL,
            account_id INTEGER NOT NULL,
            token_id TEXT NOT NULL
        )""",
        "CREATE INDEX revocations_by_token ON revocations(token_id)",
        "CREATE INDEX revocations_by_account ON revocations(account_id, at_ms)",
        "CREATE INDEX revocations_by_kind ON revocations(kind, at_ms)",
        "CREATE INDEX revocations_by_expiry ON revocations(expires_at_ms)",
    ),
)

SCHEMA_VERSION: Final = len(_MIGRATIONS)

UPKEEP_AFTER_CHANGES: Final = 500

# Primary result codes meaning "the database cannot be used right now", not "the SQL is wrong".
_UNAVAILABLE_CODES: Final = frozenset(
    {
        sqlite3.SQLITE_BUSY,
        sqlite3.SQLITE_LOCKED,
        sqlite3.SQLITE_NOMEM,
        sqlite3.SQLITE_READONLY,
        sqlite3.SQLITE_IOERR,
        sqlite3.SQLITE_FULL,
        sqlite3.SQLITE_CANTOPEN,
        sqlite3.SQLITE_PROTOCOL,
    }
)


def _primary_code(exc: sqlite3.OperationalError) -> int | None:
    code = getattr(exc, "sqlite_errorcode", None)
    return None if code is None else int(code) & 0xFF


def _raise_if_down(exc: sqlite3.OperationalError) -> None:
    """Raise ``Unavailable`` if ``exc`` means "the database is down"; return otherwise."""
    code = _primary_code(exc)
    if code is None or code in _UNAVAILABLE_CODES:
        raise errors.Unavailable(f"the SQLite database is unavailable: {exc}") from exc


@contextmanager
def _unavailable_when_down() -> Iterator[None]:
    try:
        yield
    except sqlite3.OperationalError as exc:
        _raise_if_down(exc)
        raise


class _Transaction:
    """``with _Transaction(conn):`` a write transaction; the write lock is taken at BEGIN, so
    reads inside it are current. A class rather than ``@contextmanager``: it is on the path of
    every message."""

    __slots__ = ("_conn",)

    def __init__(self, conn: sqlite3.Connection) -> None:
        self._conn = conn

    def __enter__(self) -> None:
        self._conn.execute("BEGIN IMMEDIATE")

    def __exit__(self, exc_type: type[BaseException] | None, *_: object) -> None:
        if exc_type is None:
            try:
                self._conn.execute("COMMIT")
                return
            except BaseException:
                self._rollback()
                raise
        self._rollback()

    def _rollback(self) -> None:
        if self._conn.in_transaction:
            self._conn.execute("ROLLBACK")


PRIVATE_FILE_MODE: Final = 0o600


def _make_files_private(path: str) -> None:
    """Module rule 8 for the database file ``path`` (a name, not ``:memory:`` or a URI). What
    cannot be created or changed is left to ``sqlite3.connect``, which reports it."""
    try:
        os.close(os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, PRIVATE_FILE_MODE))
    except OSError:
        return
    for name in (path, path + "-wal", path + "-shm"):
        try:
            mode = stat.S_IMODE(os.stat(name).st_mode)
            if mode & 0o077:
                os.chmod(name, PRIVATE_FILE_MODE)
                log.warning("%s had mode %03o: made it %03o", name, mode, PRIVATE_FILE_MODE)
        except FileNotFoundError:
            continue
        except OSError as exc:
            log.warning("%s may be readable by other users: %s", name, exc.strerror)


def _connect(path: str, busy_timeout_ms: int) -> sqlite3.Connection:
    """Open, migrate, and leave the connection as calls expect it: busy timeout 0, no automatic
    checkpoint (module rules 2 and 3); the files private (rule 8)."""
    if path != ":memory:" and path and not path.startswith("file:"):
        _make_files_private(path)
    conn = sqlite3.connect(
        path, timeout=busy_timeout_ms / 1000, isolation_level=None, check_same_thread=False
    )
    try:
        conn.execute("PRAGMA journal_mode=WAL").fetchone()
        conn.execute("PRAGMA synchronous=NORMAL")
        conn.execute("PRAGMA foreign_keys=ON")
        conn.execute("PRAGMA wal_autocheckpoint=0")
        conn.create_function("chatnode_name_key", 1, validation.name_key, deterministic=True)
        _migrate(conn)
        conn.execute("PRAGMA busy_timeout=0")
    except BaseException:
        conn.close()
        raise
    return conn


def _index_pending(conn: sqlite3.Connection) -> None:
    """Add the messages listed in ``messages_fts_pending`` to the FTS5 index, one transaction."""
    if conn.execute("SELECT 1 FROM messages_fts_pending LIMIT 1").fetchone() is None:
        return
    with _Transaction(conn):
        conn.execute(
            "INSERT INTO messages_fts(rowid, text) SELECT m.id, m.text"
            " FROM messages_fts_pending AS p JOIN messages AS m ON m.id = p.id ORDER BY p.id"
        )
        conn.execute("DELETE FROM messages_fts_pending")


def _forget_expired_sends(conn: sqlite3.Connection) -> None:
    """Drop the client ids whose dedup window ended (upkeep, module rule 3)."""
    with _Transaction(conn):
        conn.execute(
            "DELETE FROM sent_ids WHERE expires_at_ms <= ?", (time.time_ns() // 1_000_000,)
        )


def _migrate(conn: sqlite3.Connection) -> None:
    """Bring the schema to ``SCHEMA_VERSION`` in one transaction; a no-op when it is there."""
    with _Transaction(conn):
        conn.execute(
            "CREATE TABLE IF NOT EXISTS schema_version ("
            " id INTEGER PRIMARY KEY CHECK (id = 1), version INTEGER NOT NULL)"
        )
        row = conn.execute("SELECT version FROM schema_version").fetchone()
        current = 0 if row is None else int(row[0])
        if current > SCHEMA_VERSION:
            raise RuntimeError(
                f"the database has schema version {current}, newer than this chatnode's "
                f"{SCHEMA_VERSION}: upgrade chatnode"
            )
        for step in _MIGRATIONS[current:]:
            for statement in step:
                conn.execute(statement)
        conn.execute(
            "INSERT OR REPLACE INTO schema_version (id, version) VALUES (1, ?)", (SCHEMA_VERSION,)
        )


@attrs.define(eq=False)
class SqliteDatabase(ClosesOnExit):
    """One SQLite connection, serialized through a one-thread limiter (see the module rules).

    Open with ``await SqliteDatabase.open(path)`` (``":memory:"`` for a private in-memory
    database); the schema is created or upgraded on open. Close with ``aclose()``, or use it as
    ``async with``. The caller that opened it owns it.
    """

    _conn: sqlite3.Connection | None
    _limiter: trio.CapacityLimiter
    _busy_timeout_ms: int
    broker: _LocalBroker = attrs.field(factory=lambda: _LocalBroker(), init=False)
    # Rows changed since the last upkeep; touched only by the connection's current user.
    _unchecked_changes: int = attrs.field(default=0, init=False)

    @classmethod
    async def open(
        cls, path: str | os.PathLike[str], *, busy_timeout_ms: int = 5000
    ) -> SqliteDatabase:
        """Connect, set WAL / ``synchronous=NORMAL`` / foreign keys, migrate the schema.

        Raise ``Unavailable`` if the file cannot be opened or stays locked past
        ``busy_timeout_ms``.
        """
        limiter = trio.CapacityLimiter(1)
        connect = partial(_connect, os.fspath(path), busy_timeout_ms)
        with _unavailable_when_down():
            conn = await trio.to_thread.run_sync(connect, limiter=limiter)
        return cls(conn, limiter, busy_timeout_ms)

    async def run(self, fn: Callable[[sqlite3.Connection], T], *, inline: bool = False) -> T:
        """Run ``fn(connection)`` alone on the connection and return its result.

        ``fn`` runs in the database's worker thread; it is one transaction if it opens one.
        ``inline=True`` (module rule 2): run it right here on the event loop when the
        connection is idle and no upkeep is due, and if it then finds the database locked
        by another connection, again in the worker thread, so ``fn`` must be one transaction
        that is rolled back when it fails. Done inline, the call does not yield to the
        scheduler: the caller's own awaits are its checkpoints.
        """
        if inline and self._may_run_inline():
            try:
                return self._counted(fn, self._open_connection())
            except sqlite3.OperationalError as exc:
                if _primary_code(exc) != sqlite3.SQLITE_BUSY:
                    _raise_if_down(exc)
                    raise
        with _unavailable_when_down():
            return await trio.to_thread.run_sync(
                partial(self._in_worker, fn), limiter=self._limiter
            )

    def _may_run_inline(self) -> bool:
        # The token is taken and given back in this (the loop's) thread, after the worker
        # finished with the connection: while it is free, no worker uses the connection, and
        # nothing can take it before this synchronous call returns.
        return self._limiter.available_tokens > 0 and self._unchecked_changes < UPKEEP_AFTER_CHANGES

    def _open_connection(self) -> sqlite3.Connection:
        if self._conn is None:
            raise errors.Unavailable("the SQLite database is closed")
        return self._conn

    def _in_worker(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        # Checked in the worker: a call queued behind aclose() must not touch the closed
        # connection, and the limiter orders this check after any close.
        conn = self._open_connection()
        conn.execute(f"PRAGMA busy_timeout={self._busy_timeout_ms:d}")
        try:
            if self._unchecked_changes >= UPKEEP_AFTER_CHANGES:
                # Before fn, not after: a failed upkeep must not fail a call that committed.
                _index_pending(conn)
                _forget_expired_sends(conn)
                conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
                self._unchecked_changes = 0
            return self._counted(fn, conn)
        finally:
            conn.execute("PRAGMA busy_timeout=0")

    def _counted(self, fn: Callable[[sqlite3.Connection], T], conn: sqlite3.Connection) -> T:
        before = conn.total_changes
        try:
            return fn(conn)
        finally:
            # total_changes is a C int: it wraps, one call never changes 2**32 rows.
            self._unchecked_changes += (conn.total_changes - before) % 2**32

    async def check(self) -> None:
        """Return if the database answers a query; raise ``Unavailable`` otherwise."""
        await self.run(lambda conn: conn.execute("SELECT 1").fetchone())

    async def schema_version(self) -> int:
        def read(conn: sqlite3.Connection) -> int:
            return int(conn.execute("SELECT version FROM schema_version").fetchone()[0])

        return await self.run(read)

    async def aclose(self) -> None:
        """Close the connection after the statements already queued. Idempotent."""

        def close() -> None:
            conn, self._conn = self._conn, None
            if conn is not None:
                conn.close()

        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(close, limiter=self._limiter)


_USER_COLUMNS: Final = "name, password_hash, is_admin, created_at_ms, id, revoked_before_ms"


def _user(row: sqlite3.Row | tuple[Any, ...]) -> User:
    name, password_hash, is_admin, created_at_ms, account_id, revoked_before_ms = row
    return User(
        name,
        password_hash,
        int(created_at_ms),
        bool(is_admin),
        id=int(account_id),
        revoked_before_ms=int(revoked_before_ms),
    )


def _room(row: sqlite3.Row | tuple[Any, ...]) -> Room:
    room_id, name, created_at_ms = row
    return Room(int(room_id), name, int(created_at_ms))


def _select_user(conn: sqlite3.Connection, name: str) -> User | None:
    row = conn.execute(
        f"SELECT {_USER_COLUMNS} FROM users WHERE name = ? OR name_key = ?"
        " ORDER BY name = ? DESC LIMIT 1",
        (name, validation.name_key(name), name),
    ).fetchone()
    return None if row is None else _user(row)


def _select_user_by_id(conn: sqlite3.Connection, account_id: int) -> User | None:
    row = conn.execute(f"SELECT {_USER_COLUMNS} FROM users WHERE id = ?", (account_id,)).fetchone()
    return None if row is None else _user(row)


@attrs.define(eq=False)
class SqliteDirectory:
    """``ports.Directory`` on a :class:`SqliteDatabase`.

    Rules:

    1. **Accounts.** Ids come from the ``account_id`` counter, taken in the transaction that
       inserts the user: increasing, never reused (a deletion leaves the counter where it
       is). Names are unique by ``name_key`` (``validation.name_key``, computed here; the
       migration computes it with the same function registered in SQLite); an exact name is
       looked up before a key, so accounts migrated with colliding names stay reachable.
    2. Room ids come from ``AUTOINCREMENT``: increasing from 1 and never reused.
       ``add_member`` checks the member limit and inserts in one transaction, so concurrent
       joins never overfill a room.
    """

    _db: SqliteDatabase

    async def check(self) -> None:
        await self._db.check()

    async def aclose(self) -> None:
        """Nothing to release: the database belongs to whoever opened it."""
        await trio.lowlevel.checkpoint()

    async def create_user(
        self, name: str, password_hash: str, *, created_at_ms: int, is_admin: bool = False
    ) -> User:
        def insert(conn: sqlite3.Connection) -> int:
            with _Transaction(conn):
                conn.execute("UPDATE counters SET value = value + 1 WHERE name = 'account_id'")
                (account_id,) = conn.execute(
                    "SELECT value FROM counters WHERE name = 'account_id'"
                ).fetchone()
                conn.execute(
                    "INSERT INTO users (id, name, name_key, password_hash, is_admin,"
                    " created_at_ms) VALUES (?, ?, ?, ?, ?, ?)",
                    (
                        account_id,
                        name,
                        validation.name_key(name),
                        password_hash,
                        int(is_admin),
                        created_at_ms,
                    ),
                )
            return int(account_id)

        try:
            account_id = await self._db.run(insert)
        except sqlite3.IntegrityError as exc:
            raise errors.Conflict(
                f"the user name {name!r} is already taken (names are compared ignoring case);"
                " choose another"
            ) from exc
        return User(name, password_hash, created_at_ms, is_admin, id=account_id)

    async def get_user(self, name: str) -> User | None:
        return await self._db.run(partial(_select_user, name=name))

    async def get_user_by_id(self, account_id: int) -> User | None:
        return await self._db.run(partial(_select_user_by_id, account_id=account_id))

    async def set_password(
        self, account_id: int, password_hash: str, *, revoked_before_ms: int
    ) -> User | None:
        def update(conn: sqlite3.Connection) -> User | None:
            with _Transaction(conn):
                conn.execute(
                    "UPDATE users SET password_hash = ?,"
                    " revoked_before_ms = MAX(revoked_before_ms, ?) WHERE id = ?",
                    (password_hash, revoked_before_ms, account_id),
                )
                return _select_user_by_id(conn, account_id)

        return await self._db.run(update)

    async def set_admin(
        self, name: str, is_admin: bool, *, revoked_before_ms: int = 0
    ) -> User | None:
        def update(conn: sqlite3.Connection) -> User | None:
            with _Transaction(conn):
                user = _select_user(conn, name)
                if user is None:
                    return None
                conn.execute(
                    "UPDATE users SET is_admin = ?,"
                    " revoked_before_ms = MAX(revoked_before_ms, ?) WHERE id = ?",
                    (int(is_admin), revoked_before_ms, user.id),
                )
                return _select_user_by_id(conn, user.id)

        return await self._db.run(update)

    async def delete_all_users(self) -> int:
        def delete(conn: sqlite3.Connection) -> int:
            with _Transaction(conn):
                conn.execute("DELETE FROM memberships")
                return conn.execute("DELETE FROM users").rowcount

        return await self._db.run(delete)

    async def create_room(self, name: str, *, created_at_ms: int) -> Room:
        def insert(conn: sqlite3.Connection) -> int:
            with _Transaction(conn):
                cursor = conn.execute(
                    "INSERT INTO rooms (name, created_at_ms) VALUES (?, ?)", (name, created_at_ms)
                )
            assert cursor.lastrowid is not None
            return cursor.lastrowid

        room_id = await self._db.run(insert)
        return Room(room_id, name, created_at_ms)

    async def get_room(self, room_id: int) -> Room | None:
        def select(conn: sqlite3.Connection) -> Room | None:
            row = conn.execute(
                "SELECT id, name, created_at_ms FROM rooms WHERE id = ?", (room_id,)
            ).fetchone()
            return None if row is None else _room(row)

        return await self._db.run(select)

    async def list_rooms(self, *, after_id: int, limit: int) -> list[Room]:
        def select(conn: sqlite3.Connection) -> list[Room]:
            rows = conn.execute(
                "SELECT id, name, created_at_ms FROM rooms WHERE id > ? ORDER BY id LIMIT ?",
                (after_id, max(limit, 0)),
            )
            return [_room(row) for row in rows]

        return await self._db.run(select)

    async def add_member(self, room_id: int, user: str, *, max_members: int) -> bool:
        def insert(conn: sqlite3.Connection) -> bool:
            with _Transaction(conn):
                _require_room_and_user(conn, room_id, user)
                if _is_member(conn, room_id, user):
                    return False
                (count,) = conn.execute(
                    "SELECT COUNT(*) FROM memberships WHERE room_id = ?", (room_id,)
                ).fetchone()
                if count >= max_members:
                    raise errors.RoomFull(
                        f"room {room_id} is full ({max_members} members); "
                        "try again after someone leaves"
                    )
                conn.execute(
                    "INSERT INTO memberships (room_id, user) VALUES (?, ?)", (room_id, user)
                )
                return True

        return await self._db.run(insert)

    async def remove_member(self, room_id: int, user: str) -> bool:
        def delete(conn: sqlite3.Connection) -> bool:
            with _Transaction(conn):
                cursor = conn.execute(
                    "DELETE FROM memberships WHERE room_id = ? AND user = ?", (room_id, user)
                )
            return cursor.rowcount > 0

        return await self._db.run(delete)

    async def list_members(self, room_id: int) -> list[str]:
        def select(conn: sqlite3.Connection) -> list[str]:
            rows = conn.execute(
                "SELECT user FROM memberships WHERE room_id = ? ORDER BY user", (room_id,)
            )
            return [name for (name,) in rows]

        return await self._db.run(select)


def _require_room_and_user(conn: sqlite3.Connection, room_id: int, user: str) -> None:
    if conn.execute("SELECT 1 FROM rooms WHERE id = ?", (room_id,)).fetchone() is None:
        raise errors.NotFound(f"there is no room {room_id}")
    if conn.execute("SELECT 1 FROM users WHERE name = ?", (user,)).fetchone() is None:
        raise errors.NotFound(f"there is no user {user!r}")


def _is_member(conn: sqlite3.Connection, room_id: int, user: str) -> bool:
    row = conn.execute(
        "SELECT 1 FROM memberships WHERE room_id = ? AND user = ?", (room_id, user)
    ).fetchone()
    return row is not None


# --- revocations ----------------------------------------------------------------------------


def _wall_ms() -> int:
    return time.time_ns() // 1_000_000


@attrs.define(eq=False)
class SqliteRevocations:
    """``ports.Revocations`` on a :class:`SqliteDatabase`: the embedded node's, durable
    across restarts (a sign-out stays signed out), and shared with every process that opens
    the file (``chatnode users revoke-admin`` records there and the node follows).

    One table is both the state and the changes: ``revocations`` rows in the order recorded
    (``seq``, ``AUTOINCREMENT``: the cursor); ``lookup`` reads the latest times from it.
    Recording also deletes the rows expired by then (except ``ALL``, which never expires),
    so the table holds the revocations of live tokens. A row expired before a follower read
    it ends no live token: the changes stay complete for what matters.
    """

    _db: SqliteDatabase

    async def record(self, revocation: Revocation) -> None:
        def insert(conn: sqlite3.Connection) -> None:
            with _Transaction(conn):
                conn.execute(
                    "DELETE FROM revocations WHERE expires_at_ms <= ? AND kind != 'all'",
                    (_wall_ms(),),
                )
                conn.execute(
                    "INSERT INTO revocations (kind, at_ms, expires_at_ms, account_id, token_id)"
                    " VALUES (?, ?, ?, ?, ?)",
                    (
                        revocation.kind.value,
                        revocation.at_ms,
                        revocation.expires_at_ms,
                        revocation.account_id,
                        revocation.token_id,
                    ),
                )

        await self._db.run(insert)

    async def lookup(self, *, account_id: int, token_id: str) -> RevocationState:
        def select(conn: sqlite3.Connection) -> RevocationState:
            token, account, everyone = conn.execute(
                "SELECT"
                " EXISTS (SELECT 1 FROM revocations WHERE token_id = ? AND kind = 'token'"
                "  AND expires_at_ms > ?),"
                " (SELECT MAX(at_ms) FROM revocations WHERE account_id = ? AND kind = 'account'"
                "  AND expires_at_ms > ?),"
                " (SELECT MAX(at_ms) FROM revocations WHERE kind = 'all')",
                (token_id, now, account_id, now),
            ).fetchone()
            return RevocationState(bool(token), int(account or 0), int(everyone or 0))

        now = _wall_ms()
        return await self._db.run(select)

    async def changes(self, cursor: str | None, *, limit: int = 1000) -> RevocationChanges:
        def select(conn: sqlite3.Connection) -> RevocationChanges:
            if cursor is None:
                row = conn.execute(
                    "SELECT seq FROM sqlite_sequence WHERE name = 'revocations'"
                ).fetchone()
                return RevocationChanges((), str(0 if row is None else int(row[0])))
            rows = conn.execute(
                "SELECT seq, kind, at_ms, expires_at_ms, account_id, token_id FROM revocations"
                " WHERE seq > ? ORDER BY seq LIMIT ?",
                (int(cursor), max(1, limit)),
            ).fetchall()
            revocations = tuple(
                Revocation(RevocationKind(kind), at, until, int(account), token)
                for _, kind, at, until, account, token in rows
            )
            return RevocationChanges(revocations, str(rows[-1][0]) if rows else cursor)

        return await self._db.run(select)


# --- messages: the room log and the archive --------------------------------------------------

_MESSAGE_COLUMNS: Final = 'm.room_id, m."offset", m.user, m.text, m.timestamp_ms'

# A search term is a run of letters, digits or marks: what the unicode61 tokenizer indexes.
# Everything else (quotes, parentheses, "*", ":", "^", "-") is a separator, never FTS5 syntax.
_TERM: Final = re.compile(r"[^\W_]+")


def _message(row: sqlite3.Row | tuple[Any, ...]) -> ChatMessage:
    room_id, offset, user, text, timestamp_ms = row[:5]
    return ChatMessage(int(room_id), int(offset), user, text, int(timestamp_ms))


def fts_match_expression(text: str) -> str | None:
    """The FTS5 MATCH expression for a user's query: every word, each as a quoted string.

    All words must match (implicit AND). Returns None when the query has no word, so the caller
    returns no hits instead of asking SQLite. The result contains no FTS5 operator, column
    filter or prefix star, whatever the input.
    """
    terms = _TERM.findall(text)
    if not terms:
        return None
    return " ".join(f'"{term}"' for term in terms)


def _read_range(
    conn: sqlite3.Connection, room_id: int, after: int, up_to: int | None, limit: int
) -> list[ChatMessage]:
    rows = conn.execute(
        f'SELECT {_MESSAGE_COLUMNS} FROM messages AS m WHERE m.room_id = ? AND m."offset" > ?'
        ' AND (? IS NULL OR m."offset" <= ?) ORDER BY m."offset" LIMIT ?',
        (room_id, after, up_to, up_to, max(limit, 0)),
    )
    return [_message(row) for row in rows]


def _last_offset(conn: sqlite3.Connection, room_id: int) -> int:
    (last,) = conn.execute(
        'SELECT COALESCE(MAX("offset"), 0) FROM messages WHERE room_id = ?', (room_id,)
    ).fetchone()
    return int(last)


@attrs.define(eq=False)
class SqliteArchive:
    """``ports.Archive`` on the ``messages`` table with an FTS5 index kept by triggers.

    ``store`` decodes the documents (``ChatMessage.from_document``; one that is not a message
    document is refused) and inserts them in one transaction of ``INSERT OR IGNORE``: storing a
    message again (same room and offset) changes nothing, the first stored version wins. When
    the insert added fewer rows than it was given, the same transaction compares each
    document with the row under its key: a different message there is refused as a
    ``CONFLICT`` carrying the stored one (the check costs nothing while every row is new). What
    is stored is visible at once, so ``refresh`` has nothing to do. ``search`` matches every word of the query (case and
    diacritics folded), ranks by BM25, then newest first; the time filters are inclusive.
    ``SearchHit.score`` is the negated BM25 value: higher is better. Dead letters are rows of
    ``dead_letters``, unique by digest, listed by ``(kept_at_ms, digest)``.
    """

    _db: SqliteDatabase

    async def check(self) -> None:
        await self._db.check()

    async def aclose(self) -> None:
        """Nothing to release: the database belongs to whoever opened it."""
        await trio.lowlevel.checkpoint()

    async def refresh(self) -> None:
        await trio.lowlevel.checkpoint()

    async def store(self, documents: Sequence[bytes]) -> None:
        messages: list[tuple[bytes, ChatMessage]] = []
        refused: list[Refusal] = []
        for document in documents:
            try:
                messages.append((document, ChatMessage.from_document(document)))
            except ValueError as exc:
                refused.append(Refusal(RefusalKind.UNINDEXABLE, document, str(exc)))
        if messages:
            refused += await self._db.run(partial(_insert_messages, messages))
        else:
            await trio.lowlevel.checkpoint()
        if refused:
            raise ports.ArchiveRefused(refused)

    async def keep_dead_letters(self, letters: Sequence[DeadLetter]) -> None:
        rows = [
            (
                letter.digest,
                letter.refusal.kind.value,
                letter.refusal.document,
                letter.refusal.reason,
                letter.refusal.stored,
                letter.kept_at_ms,
            )
            for letter in letters
        ]

        def insert(conn: sqlite3.Connection) -> None:
            with _Transaction(conn):
                conn.executemany(
                    "INSERT OR IGNORE INTO dead_letters"
                    " (digest, kind, document, reason, stored, kept_at_ms)"
                    " VALUES (?, ?, ?, ?, ?, ?)",
                    rows,
                )

        if rows:
            await self._db.run(insert)
        else:
            await trio.lowlevel.checkpoint()

    async def dead_letters(self, *, limit: int) -> list[DeadLetter]:
        def select(conn: sqlite3.Connection) -> list[DeadLetter]:
            rows = conn.execute(
                "SELECT kind, document, reason, stored, kept_at_ms FROM dead_letters"
                " ORDER BY kept_at_ms, digest LIMIT ?",
                (max(limit, 0),),
            )
            return [
                DeadLetter(
                    Refusal(RefusalKind(kind), bytes(document), reason, _blob(stored)), kept_at_ms
                )
                for kind, document, reason, stored, kept_at_ms in rows
            ]

        return await self._db.run(select)

    async def read(
        self, room_id: int, *, after_offset: int, up_to_offset: int, limit: int
    ) -> list[ChatMessage]:
        return await self._db.run(
            lambda conn: _read_range(conn, room_id, after_offset, up_to_offset, limit)
        )

    async def tail(self, room_id: int, *, up_to_offset: int, limit: int) -> list[ChatMessage]:
        def select(conn: sqlite3.Connection) -> list[ChatMessage]:
            rows = conn.execute(
                f"SELECT {_MESSAGE_COLUMNS} FROM messages AS m"
                ' WHERE m.room_id = ? AND m."offset" <= ? ORDER BY m."offset" DESC LIMIT ?',
                (room_id, up_to_offset, max(limit, 0)),
            )
            return [_message(row) for row in reversed(rows.fetchall())]

        return await self._db.run(select)

    async def last_offset(self, room_id: int) -> int:
        return await self._db.run(lambda conn: _last_offset(conn, room_id))

    async def search(self, query: SearchQuery) -> list[SearchHit]:
        match = fts_match_expression(query.text)
        if match is None or query.limit <= 0:
            await trio.lowlevel.checkpoint()
            return []
        return await self._db.run(partial(_search, match, query))


def _insert_messages(
    messages: list[tuple[bytes, ChatMessage]], conn: sqlite3.Connection
) -> list[Refusal]:
    """Insert the messages that are new; the documents whose key holds a different message."""
    with _Transaction(conn):
        inserted = conn.executemany(
            'INSERT OR IGNORE INTO messages (room_id, "offset", user, text, timestamp_ms)'
            " VALUES (?, ?, ?, ?, ?)",
            [(m.room_id, m.offset, m.user, m.text, m.timestamp_ms) for _, m in messages],
        ).rowcount
        if inserted == len(messages):
            return []
        conflicts: list[Refusal] = []
        for document, m in messages:
            row = conn.execute(
                f"SELECT {_MESSAGE_COLUMNS} FROM messages AS m"
                ' WHERE m.room_id = ? AND m."offset" = ?',
                (m.room_id, m.offset),
            ).fetchone()
            stored = _message(row)
            if stored != m:
                conflicts.append(
                    Refusal(
                        RefusalKind.CONFLICT,
                        document,
                        f"a different message is stored under {m.key}",
                        stored.document,
                    )
                )
        return conflicts


def _blob(value: bytes | None) -> bytes | None:
    return None if value is None else bytes(value)


def _search(match: str, q: SearchQuery, conn: sqlite3.Connection) -> list[SearchHit]:
    _index_pending(conn)
    rows = conn.execute(
        f"SELECT {_MESSAGE_COLUMNS}, bm25(messages_fts) AS rank"
        " FROM messages_fts JOIN messages AS m ON m.id = messages_fts.rowid"
        " WHERE messages_fts MATCH ?"
        " AND (? IS NULL OR m.room_id = ?) AND (? IS NULL OR m.user = ?)"
        " AND (? IS NULL OR m.timestamp_ms >= ?) AND (? IS NULL OR m.timestamp_ms <= ?)"
        ' ORDER BY rank, m.timestamp_ms DESC, m.room_id, m."offset" DESC LIMIT ?',
        (
            match,
            q.room_id,
            q.room_id,
            q.user,
            q.user,
            q.from_ms,
            q.from_ms,
            q.to_ms,
            q.to_ms,
            q.limit,
        ),
    )
    return [SearchHit(_message(row), -float(row[5])) for row in rows]


# --- the bus ------------------------------------------------------------------------------------


@attrs.frozen
class _Signal:
    room_id: int
    event_json: str


_Item = ChatMessage | _Signal


@attrs.define(eq=False)
class _LocalBroker:
    """The buses serving on one database, and the lock that orders their deliveries."""

    lock: trio.Lock = attrs.field(factory=trio.Lock)
    buses: dict[SqliteBus, None] = attrs.field(factory=dict)

    def fan_out(self, item: _Item) -> None:
        """Hand ``item`` to every serving bus; never waits."""
        for bus in self.buses:
            bus._offer(item)


def _append(draft: Draft, dedup_window_ms: int, conn: sqlite3.Connection) -> _Appended:
    """Insert ``draft`` as the room's next message, or find the message its client id
    already published within the dedup window; one transaction."""
    with _Transaction(conn):
        if draft.client_id is not None:
            row = conn.execute(
                f"SELECT {_MESSAGE_COLUMNS} FROM sent_ids AS s JOIN messages AS m"
                ' ON m.room_id = s.room_id AND m."offset" = s."offset"'
                " WHERE s.room_id = ? AND s.user = ? AND s.client_id = ? AND s.expires_at_ms > ?",
                (draft.room_id, draft.user, draft.client_id, draft.timestamp_ms),
            ).fetchone()
            if row is not None:
                return _Appended(_message(row), duplicate=True)
        offset = _last_offset(conn, draft.room_id) + 1
        conn.execute(
            'INSERT INTO messages (room_id, "offset", user, text, timestamp_ms)'
            " VALUES (?, ?, ?, ?, ?)",
            (draft.room_id, offset, draft.user, draft.text, draft.timestamp_ms),
        )
        if draft.client_id is not None:
            conn.execute(
                'INSERT OR REPLACE INTO sent_ids (room_id, user, client_id, "offset", expires_at_ms)'
                " VALUES (?, ?, ?, ?, ?)",
                (
                    draft.room_id,
                    draft.user,
                    draft.client_id,
                    offset,
                    draft.timestamp_ms + dedup_window_ms,
                ),
            )
    message = ChatMessage(draft.room_id, offset, draft.user, draft.text, draft.timestamp_ms)
    return _Appended(message, duplicate=False)


class _Appended(NamedTuple):
    message: ChatMessage
    duplicate: bool


async def _recover(handler: ports.BusHandler) -> None:
    """The handler could not apply a delivery (its gap fill hit an unavailable backend):
    retry its catch-up with backoff until it succeeds, as a Redis bus does after a reconnect."""
    backoff_s = 0.05
    while True:
        await trio.sleep(backoff_s)
        try:
            await handler.resubscribed()
            return
        except errors.Unavailable:
            backoff_s = min(2.0, backoff_s * 2)


@attrs.define(eq=False)
class SqliteBus:
    """``ports.Bus`` for the embedded node: the room log is the ``messages`` table.

    ``publish`` assigns ``offset = last + 1`` and inserts in one transaction (on the event loop
    when it can, module rule 2), then hands the message to every bus serving on the same
    database (this one included) that is subscribed to the room, all under the database's FIFO
    publish lock; once the insert has started the publish completes even if the caller is
    cancelled. Each bus delivers from its own ``serve`` task, in offset order, through a bounded
    inbox of ``inbox_size`` items (module rule 7). A draft whose client id the same user
    published in the room less than ``dedup_window_s`` ago is found in ``sent_ids`` (same
    transaction) and its message returned, nothing inserted or fanned out.

    Subscriptions are a set: subscribing twice and unsubscribing once ends delivery. Signal
    events are JSON round-tripped, like on a real broker, so each handler gets its own copy and a
    non-JSON event fails at ``signal`` here too.
    """

    _db: SqliteDatabase
    inbox_size: int = attrs.field(default=1024, kw_only=True)
    dedup_window_s: float = attrs.field(default=300.0, kw_only=True)
    _rooms: set[int] = attrs.field(factory=set, init=False)
    _inbox: trio.MemorySendChannel[_Item] | None = attrs.field(default=None, init=False)
    _overflowed: bool = attrs.field(default=False, init=False)

    async def check(self) -> None:
        await self._db.check()

    async def aclose(self) -> None:
        """Nothing to release: ``serve`` stops when its task is cancelled."""
        await trio.lowlevel.checkpoint()

    async def publish(self, draft: Draft) -> ChatMessage:
        broker = self._db.broker
        async with broker.lock:
            # No await after the append has started (rule 1): a cancelled publish either
            # published nothing or completes, fan-out included.
            window_ms = int(self.dedup_window_s * 1000)
            appended = await self._db.run(partial(_append, draft, window_ms), inline=True)
            if not appended.duplicate:
                broker.fan_out(appended.message)
        return appended.message

    async def signal(self, room_id: int, event: dict[str, Any]) -> None:
        item = _Signal(room_id, json.dumps(event))
        await trio.lowlevel.checkpoint()
        self._db.broker.fan_out(item)

    async def subscribe(self, room_id: int) -> None:
        self._rooms.add(room_id)
        await trio.lowlevel.checkpoint()

    async def unsubscribe(self, room_id: int) -> None:
        self._rooms.discard(room_id)
        await trio.lowlevel.checkpoint()

    async def last_offset(self, room_id: int) -> int:
        return await self._db.run(lambda conn: _last_offset(conn, room_id))

    def counters(self) -> Mapping[str, int]:
        return {}

    async def restore(
        self,
        room_id: int,
        *,
        last_offset: int,
        messages: Sequence[ChatMessage] = (),
        seed: bool = False,
    ) -> int:
        """Nothing to restore: the room log is the database, which loses nothing that was
        acknowledged (module rule 5)."""
        return await self.last_offset(room_id)

    async def read_log(self, room_id: int, *, after_offset: int, limit: int) -> list[ChatMessage]:
        return await self._db.run(
            lambda conn: _read_range(conn, room_id, after_offset, None, limit)
        )

    async def serve(self, handler: ports.BusHandler, *, task_status: ports.TaskStatus) -> None:
        """Deliver to ``handler`` until cancelled; one ``serve`` per bus at a time."""
        if self._inbox is not None:
            raise RuntimeError("this SqliteBus is already serving")
        send, receive = trio.open_memory_channel[_Item](self.inbox_size)
        self._inbox, self._overflowed = send, False
        self._db.broker.buses[self] = None
        try:
            task_status.started()
            async for item in receive:
                try:
                    await self._dispatch(handler, item)
                except errors.Unavailable:
                    await _recover(handler)
                if self._overflowed and receive.statistics().current_buffer_used == 0:
                    self._overflowed = False
                    await handler.resubscribed()
        finally:
            self._db.broker.buses.pop(self, None)
            self._inbox = None
            send.close()
            receive.close()

    async def _dispatch(self, handler: ports.BusHandler, item: _Item) -> None:
        if item.room_id not in self._rooms:
            return  # unsubscribed while the item waited in the inbox
        if isinstance(item, ChatMessage):
            await handler.deliver(item)
        else:
            await handler.signal(item.room_id, json.loads(item.event_json))

    def _offer(self, item: _Item) -> None:
        """Queue ``item`` if subscribed; on a full inbox drop messages until drained."""
        if self._inbox is None or self._overflowed or item.room_id not in self._rooms:
            return
        try:
            self._inbox.send_nowait(item)
        except trio.WouldBlock:
            if isinstance(item, ChatMessage):
                self._overflowed = True


if TYPE_CHECKING:  # mypy proves the adapters implement their ports

    def _implements_ports(db: SqliteDatabase) -> tuple[ports.Directory, ports.Archive, ports.Bus]:
        return SqliteDirectory(db), SqliteArchive(db), SqliteBus(db)

    def _implements_revocations(db: SqliteDatabase) -> ports.Revocations:
        return SqliteRevocations(db)
