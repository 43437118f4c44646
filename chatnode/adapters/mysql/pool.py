"""A bounded pool of blocking MySQL connections (mysqlclient), each call in a worker thread.

Rules that make it correct:

1. **A bounded pool.** :class:`MysqlPool` holds at most ``size`` connections. A call first
   takes one of ``size`` tokens of a ``trio.CapacityLimiter`` (waiting at most
   ``acquire_timeout_s``; longer means the database is too slow: ``Unavailable``), then runs
   in a thread that borrows an idle connection, or opens one, and gives it back. A connection
   is used by one thread at a time and never crosses calls in a broken state.
2. **Every statement is bounded by the server.** A cancelled ``trio.to_thread.run_sync`` call
   does not stop its query: Trio waits for the thread to finish. So each session is opened
   with a server-side limit of ``statement_timeout_s``: on MariaDB ``max_statement_time``
   (every statement), on MySQL ``max_execution_time`` (read-only SELECTs) -- the flavor is
   read from ``SELECT VERSION()`` when a connection opens -- plus ``innodb_lock_wait_timeout``
   (whole seconds, at least 1) for row-lock waits on both. The limit is set once per session
   rather than with MariaDB's ``SET STATEMENT ... FOR`` on each statement: it covers every
   statement without rewriting any, and the MySQL path is the same shape. A statement over
   the limit is aborted by the server and the call raises ``Unavailable``. The client also
   has read/write socket timeouts (``statement_timeout_s + 10 s``) for a server that stopped
   answering altogether.
3. **Broken connections are replaced.** A connection whose call failed with a client or
   connection error is closed, not returned, and the idle connections opened before it are
   dropped too (a server restart broke them all). A connection idle longer than
   ``idle_ping_s`` is pinged before use and replaced if dead, so a server restart between
   calls during a quiet spell costs no failed call.
4. **Deadlocks are retried.** A call whose statement was chosen as a deadlock victim (1213)
   runs again, at most three times (its transaction was rolled back).

Errors: as ``errors.py`` maps them; a pool exhausted for ``acquire_timeout_s`` and any use
after ``aclose()`` are ``Unavailable``.
"""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Callable
from functools import partial
from typing import Final, TypeVar

import attrs
import MySQLdb
import trio

from chatnode.adapters.lifecycle import ClosesOnExit
from chatnode.adapters.mysql.connection import bound_session, close_quietly
from chatnode.adapters.mysql.errors import (
    DEADLOCK,
    DEADLOCK_ATTEMPTS,
    error_code,
    keeps_connection,
    mysql_error,
)
from chatnode.adapters.mysql.url import Connection, MysqlUrl
from chatnode.core import errors

T = TypeVar("T")

NETWORK_TIMEOUT_MARGIN_S: Final = 10.0


@attrs.define(eq=False)
class _Idle:
    conn: Connection
    since: float  # time.monotonic() when it was given back
    generation: int


@attrs.define(eq=False)
class MysqlPool(ClosesOnExit):
    """At most ``size`` MySQL connections, each used by one worker thread at a time.

    See the module rules. ``run(fn)`` is the only way in; the pool belongs to whoever built it
    and ``aclose()`` closes its connections (those in use close when their call returns).
    """

    url: MysqlUrl
    size: int
    statement_timeout_s: float
    acquire_timeout_s: float
    idle_ping_s: float
    _limiter: trio.CapacityLimiter
    _threads: trio.CapacityLimiter
    _lock: threading.Lock = attrs.field(factory=threading.Lock, init=False)
    _idle: collections.deque[_Idle] = attrs.field(factory=collections.deque, init=False)
    _generation: int = attrs.field(default=0, init=False)
    _closed: bool = attrs.field(default=False, init=False)
    mariadb: bool | None = attrs.field(default=None, init=False)
    """The server flavor, known once a connection opened."""

    @classmethod
    def from_url(
        cls,
        url: str,
        *,
        size: int = 8,
        statement_timeout_s: float = 5.0,
        acquire_timeout_s: float | None = None,
        idle_ping_s: float = 5.0,
    ) -> MysqlPool:
        """A pool for ``url``; connects lazily (nothing happens until the first call).

        ``acquire_timeout_s`` (default ``statement_timeout_s``) is the longest a call waits
        for a free connection.
        """
        if size < 1:
            raise ValueError("a MySQL pool needs at least one connection")
        return cls(
            MysqlUrl.parse(url),
            size,
            statement_timeout_s,
            statement_timeout_s if acquire_timeout_s is None else acquire_timeout_s,
            idle_ping_s,
            trio.CapacityLimiter(size),
            trio.CapacityLimiter(size),
        )

    async def run(self, fn: Callable[[Connection], T]) -> T:
        """Run ``fn(connection)`` in a worker thread on a pooled connection; return its result.

        Once the thread started, the call completes even if the caller is cancelled (the
        server bounds how long that takes); then the cancellation is delivered. MySQL errors
        are mapped as the module says.
        """
        if self._closed:
            await trio.lowlevel.checkpoint()
            raise errors.Unavailable("the MySQL pool is closed")
        # A token handed to a parked acquire() cannot be cancelled away: cancelled_caught
        # is True exactly when no token was taken.
        with trio.move_on_after(self.acquire_timeout_s) as waiting:
            await self._limiter.acquire()
        if waiting.cancelled_caught:
            raise errors.Unavailable(
                f"all {self.size} MySQL connections stayed busy for {self.acquire_timeout_s} s"
            )
        try:
            return await trio.to_thread.run_sync(partial(self._call, fn), limiter=self._threads)
        except MySQLdb.Error as exc:
            mapped = mysql_error(exc)
            if mapped is None:
                raise
            raise mapped from exc
        finally:
            self._limiter.release()

    async def check(self) -> None:
        """Return if the server answers a query; raise ``Unavailable`` otherwise."""
        await self.run(lambda conn: conn.ping())

    async def aclose(self) -> None:
        """Close the idle connections; those in use close when their call returns. Idempotent."""
        self._closed = True
        with self._lock:
            idle = [entry.conn for entry in self._idle]
            self._idle.clear()

        def close_all() -> None:
            for conn in idle:
                close_quietly(conn)

        if idle:
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(close_all)
        else:
            await trio.lowlevel.checkpoint()

    # Everything below runs in a worker thread.

    def _call(self, fn: Callable[[Connection], T]) -> T:
        conn, generation = self._checkout()
        try:
            for attempt in range(1, DEADLOCK_ATTEMPTS + 1):
                try:
                    result = fn(conn)
                    break
                except MySQLdb.OperationalError as exc:
                    if error_code(exc) != DEADLOCK or attempt == DEADLOCK_ATTEMPTS:
                        raise
        except BaseException as exc:
            if keeps_connection(exc):
                self._checkin(conn, generation)
            else:
                self._discard(conn, generation)
            raise
        self._checkin(conn, generation)
        return result

    def _checkout(self) -> tuple[Connection, int]:
        while True:
            with self._lock:
                if not self._idle:
                    generation = self._generation
                    break
                entry = self._idle.pop()  # the most recently used: least likely stale
            if time.monotonic() - entry.since < self.idle_ping_s:
                return entry.conn, entry.generation
            try:
                entry.conn.ping()
            except MySQLdb.Error:
                close_quietly(entry.conn)
                continue
            return entry.conn, entry.generation
        timeout_s = self.statement_timeout_s + NETWORK_TIMEOUT_MARGIN_S
        conn = self.url.connect(connect_timeout_s=timeout_s, io_timeout_s=timeout_s)
        try:
            self.mariadb = bound_session(conn, self.statement_timeout_s)
        except BaseException:
            close_quietly(conn)
            raise
        return conn, generation

    def _checkin(self, conn: Connection, generation: int) -> None:
        with self._lock:
            if not self._closed and generation == self._generation:
                self._idle.append(_Idle(conn, time.monotonic(), generation))
                return
        close_quietly(conn)

    def _discard(self, conn: Connection, generation: int) -> None:
        """Close ``conn`` and every idle connection at least as old: they likely broke too."""
        with self._lock:
            stale = [e.conn for e in self._idle if e.generation <= generation]
            self._idle = collections.deque(e for e in self._idle if e.generation > generation)
            self._generation = max(self._generation, generation + 1)
        for old in [conn, *stale]:
            close_quietly(old)
