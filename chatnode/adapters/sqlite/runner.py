"""The embedded database: one SQLite connection and the calls that run on it.

One :class:`SqliteDatabase` owns one ``sqlite3`` connection. The ports built on it
(``directory.py``, ``archive.py``, ``bus.py``, ``revocations.py``) share it; their
``aclose()`` releases nothing, the code that opened the database closes it.

Rules that make it correct:

1. **One user of the connection at a time, and the loop never waits.** A call runs in a worker
   thread via ``trio.to_thread.run_sync`` under a ``CapacityLimiter(1)``, so the connection is
   never used by two threads at once. A call is not abandoned when cancelled: cancelled before
   its function started, it raises ``Cancelled`` and the function never runs; once started,
   the function finishes (and its transaction commits or rolls back) and the call returns its
   result, the cancellation coming at the caller's next checkpoint.
2. **The append of a message runs on the loop when it cannot wait** (``run(fn, inline=True)``).
   The thread hop costs more than the append. Node CPU per delivery in the single-node
   benchmark (3 rooms x 100 members, interleaved runs of one code snapshot; docs/benchmarks.md):
   at 5k deliveries/s 23.4 us with the append in a ``to_thread`` worker, 20.5 with it on the
   loop, 18.6 on the loop with batched indexing (rule 3); at 40k 14.0 / 13.4 / 11.8 (the worker
   with batched indexing: 22.8 and 13.5; a dedicated long-lived thread saves only a third of the
   hop). With WAL and ``synchronous=NORMAL`` a commit is a write to the page cache, no fsync.
   What could make it wait never happens on the loop: it runs there only while no worker call
   holds the connection and no upkeep is due; the connection's busy timeout is 0 except during
   worker calls, so a write lock held by another connection fails the attempt at once and the
   call is repeated in the worker thread (``fn`` must be one transaction for that); and
   checkpoints (the fsyncs of WAL mode) run only in the worker thread (rule 3). The page cache
   itself may still make a write wait for the disk (a page under writeback, the file system's
   journal): of 35,000 appends at 40k deliveries/s the median took 0.15 ms, p99 0.5 ms, p99.9
   4.4 ms (mostly the kernel giving the core to another process), and the longest waits for
   the disk were 10 and 32 ms, with other programs' databases writing to the same disk. The
   node pauses with it, as Redis does for its AOF write; a worker thread would delay only the
   acks.
3. **Upkeep in the worker, in batches.** Once ``UPKEEP_AFTER_CHANGES`` rows changed since the
   last upkeep, the next call goes to the worker thread, which first indexes the messages
   waiting for the full-text index (``schema.py`` rule 2) and forgets expired client ids, then
   runs a PASSIVE checkpoint. SQLite's automatic checkpoint would run in whichever thread
   commits, so it is off. A message changes 2 rows and writes about 4 WAL pages, so the WAL
   stays near SQLite's own default of 1,000 pages.
4. **One call, one transaction.** A call that writes runs inside ``BEGIN IMMEDIATE`` ...
   ``COMMIT`` in its worker function (``transaction.py``), so a check-then-write (the member
   limit, the next room offset) is atomic against this process and against other processes on
   the same file.
5. **The files are private.** The database holds password hashes and every message. A database
   file that does not exist is created empty, mode 0600, before SQLite opens it: SQLite gives
   the -wal and -shm files the database file's mode, so all three are this user's alone from
   their first byte. An existing database, -wal or -shm that others may read is made 0600,
   with a warning.

Errors: as ``errors.py`` maps them (the database down: ``Unavailable``), and any use after
``aclose()`` is ``Unavailable``.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import stat
from collections.abc import Callable
from functools import partial
from typing import Final, TypeVar

import attrs
import trio

from chatnode.adapters.lifecycle import ClosesOnExit
from chatnode.adapters.sqlite.errors import primary_code, raise_if_down, unavailable_when_down
from chatnode.adapters.sqlite.schema import forget_expired_sends, index_pending, migrate
from chatnode.core import errors, validation

T = TypeVar("T")
log = logging.getLogger(__name__)

UPKEEP_AFTER_CHANGES: Final = 500

PRIVATE_FILE_MODE: Final = 0o600


def _make_files_private(path: str) -> None:
    """Rule 5 for the database file ``path`` (a name, not ``:memory:`` or a URI). What
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
    checkpoint (rules 2 and 3); the files private (rule 5)."""
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
        migrate(conn)
        conn.execute("PRAGMA busy_timeout=0")
    except BaseException:
        conn.close()
        raise
    return conn


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
        with unavailable_when_down():
            conn = await trio.to_thread.run_sync(connect, limiter=limiter)
        return cls(conn, limiter, busy_timeout_ms)

    async def run(self, fn: Callable[[sqlite3.Connection], T], *, inline: bool = False) -> T:
        """Run ``fn(connection)`` alone on the connection and return its result.

        ``fn`` runs in the database's worker thread; it is one transaction if it opens one.
        ``inline=True`` (rule 2): run it right here on the event loop when the
        connection is idle and no upkeep is due, and if it then finds the database locked
        by another connection, again in the worker thread, so ``fn`` must be one transaction
        that is rolled back when it fails. Done inline, the call does not yield to the
        scheduler: the caller's own awaits are its checkpoints.
        """
        if inline and self._may_run_inline():
            try:
                return self._counted(fn, self._open_connection())
            except sqlite3.OperationalError as exc:
                if primary_code(exc) != sqlite3.SQLITE_BUSY:
                    raise_if_down(exc)
                    raise
        with unavailable_when_down():
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
                index_pending(conn)
                forget_expired_sends(conn)
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
