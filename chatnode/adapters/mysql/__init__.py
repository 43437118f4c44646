"""The cluster Directory: users, rooms and memberships in MySQL or MariaDB (mysqlclient).

mysqlclient blocks, so every call runs in a worker thread. Rules that make it correct:

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
3. **One call, one transaction.** Sessions run in autocommit with ``READ COMMITTED``; a call
   that checks then writes runs ``START TRANSACTION`` ... ``COMMIT`` in its worker function
   and rolls back on any error. ``add_member`` locks the room row (``SELECT ... FOR UPDATE``)
   before counting, so concurrent joins on any number of nodes never overfill a room.
   A deadlock (1213) rolls the transaction back and runs it again, at most three times.
4. **Broken connections are replaced.** A connection whose call failed with a client or
   connection error is closed, not returned, and the idle connections opened before it are
   dropped too (a server restart broke them all). A connection idle longer than
   ``idle_ping_s`` is pinged before use and replaced if dead, so a server restart between
   calls during a quiet spell costs no failed call.

Errors: connection failures (2002, 2003, 2006, 2013, ...), too many connections, server
shutdown, statement timeouts (1969, 3024), lock wait timeouts, repeated deadlocks, a pool
exhausted for ``acquire_timeout_s``, a missing schema (run ``chatnode migrate``) and any use
after ``aclose()`` map to :class:`~chatnode.core.errors.Unavailable`. A duplicate user name is
``Conflict``; an unknown room or user in ``add_member`` is ``NotFound``; a value too long for
its column is ``BadRequest``. Other MySQL errors are bugs and propagate.
"""

from __future__ import annotations

import collections
import math
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from functools import partial
from typing import TYPE_CHECKING, Any, Final, TypeVar
from urllib.parse import parse_qs, unquote, urlsplit

import attrs
import MySQLdb
import trio

from chatnode.adapters.lifecycle import ClosesOnExit
from chatnode.core import errors, ports, validation
from chatnode.core.models import Room, User

T = TypeVar("T")

Connection = MySQLdb.Connection

# Besides every client error (2000-2999): what means "this connection, or the server, is gone".
_CONNECTION_LOST: Final = frozenset(
    {
        1040,  # too many connections
        1045,  # access denied (at connect)
        1049,  # unknown database (at connect)
        1053,  # server shutdown in progress
        1077,  # normal shutdown
        1078,  # got signal
        1079,  # shutdown complete
        1080,  # forcing close of thread
        1129,  # host blocked because of many connection errors
        1152,  # aborted connection
        1927,  # MariaDB: connection was killed
        2002,  # can't connect through socket
        2003,  # can't connect to server
        2005,  # unknown host
        2006,  # server has gone away
        2013,  # lost connection during query
        2026,  # TLS error
        2055,  # lost connection at '...'
        4031,  # MySQL: disconnected by the server for inactivity
    }
)
# The statement was stopped by a server-side bound; the connection is still usable.
_TIMED_OUT: Final = frozenset(
    {
        1205,  # lock wait timeout exceeded
        1317,  # query execution was interrupted
        1969,  # MariaDB: max_statement_time exceeded
        3024,  # MySQL: max_execution_time exceeded
    }
)
_DEADLOCK: Final = 1213
_DEADLOCK_ATTEMPTS: Final = 3
_NO_SUCH_TABLE: Final = frozenset({1146})  # the schema is missing: migrations did not run
_DUPLICATE_KEY: Final = 1062
_NO_PARENT_ROW: Final = 1452  # foreign key: the room or user is gone
_DATA_TOO_LONG: Final = 1406

NETWORK_TIMEOUT_MARGIN_S: Final = 10.0


def _error_code(exc: BaseException) -> int | None:
    if isinstance(exc, MySQLdb.Error) and exc.args and isinstance(exc.args[0], int):
        return exc.args[0]
    return None


def _is_client_error(code: int | None) -> bool:
    """Codes 2000-2999 come from the client library: the connection itself failed."""
    return code is not None and 2000 <= code < 3000


def _keeps_connection(exc: BaseException) -> bool:
    """True if the connection is still fit for the next call after ``exc`` was raised in it."""
    if isinstance(exc, errors.ChatError):
        return True
    if not isinstance(exc, MySQLdb.Error) or isinstance(exc, MySQLdb.InterfaceError):
        return False  # a bug, a cancellation or a closed connection: the state is unknown
    code = _error_code(exc)
    return bool(code) and not _is_client_error(code) and code not in _CONNECTION_LOST


def mysql_error(exc: MySQLdb.Error) -> errors.ChatError | None:
    """The domain error a MySQL error means, or None when it is a bug."""
    code = _error_code(exc)
    if isinstance(exc, MySQLdb.InterfaceError) or (
        isinstance(exc, MySQLdb.OperationalError) and not code
    ):
        return errors.Unavailable(f"the MySQL connection is unusable: {exc}")
    if code in _CONNECTION_LOST or _is_client_error(code):
        return errors.Unavailable(f"the MySQL database is unavailable: {exc}")
    if code in _TIMED_OUT or code == _DEADLOCK:
        return errors.Unavailable(f"the MySQL statement did not finish in time: {exc}")
    if code in _NO_SUCH_TABLE:
        return errors.Unavailable(
            f"the MySQL schema is missing or incomplete ({exc}); run `chatnode migrate`"
        )
    if code == _DATA_TOO_LONG:
        return errors.BadRequest(f"a value is too long for the database: {exc}")
    return None


# --- connecting ---------------------------------------------------------------------------------


@attrs.frozen
class MysqlUrl:
    """The parts of ``mysql://user:password@host:port/database[?unix_socket=/path]``."""

    host: str
    port: int
    user: str
    password: str
    database: str
    unix_socket: str | None = None

    @classmethod
    def parse(cls, url: str) -> MysqlUrl:
        parts = urlsplit(url)
        if parts.scheme != "mysql":
            raise ValueError(f"a MySQL URL starts with mysql://, got {url!r}")
        database = unquote(parts.path.lstrip("/"))
        if not database or "/" in database:
            raise ValueError(
                f"the MySQL URL must name one database: mysql://host/<database>, got {url!r}"
            )
        socket_paths = parse_qs(parts.query).get("unix_socket", [])
        return cls(
            host=parts.hostname or "127.0.0.1",
            port=parts.port or 3306,
            user=unquote(parts.username or ""),
            password=unquote(parts.password or ""),
            database=database,
            unix_socket=socket_paths[-1] if socket_paths else None,
        )

    def with_database(self, database: str) -> MysqlUrl:
        return attrs.evolve(self, database=database)

    def connect(
        self, *, connect_timeout_s: float, io_timeout_s: float, database: bool = True
    ) -> Connection:
        """A blocking connect in utf8mb4 and autocommit; raise ``MySQLdb.OperationalError``.

        ``io_timeout_s`` bounds each socket read and write (whole seconds, at least 1).
        """
        kwargs: dict[str, Any] = {
            "host": self.host,
            "port": self.port,
            "user": self.user,
            "password": self.password,
            "charset": "utf8mb4",
            "use_unicode": True,
            "autocommit": True,
            "connect_timeout": max(1, math.ceil(connect_timeout_s)),
            "read_timeout": max(1, math.ceil(io_timeout_s)),
            "write_timeout": max(1, math.ceil(io_timeout_s)),
        }
        if database:
            kwargs["database"] = self.database
        if self.unix_socket:
            kwargs["unix_socket"] = self.unix_socket
        return MySQLdb.connect(**kwargs)


def server_is_mariadb(conn: Connection) -> bool:
    cursor = conn.cursor()
    cursor.execute("SELECT VERSION()")
    (version,) = cursor.fetchone()
    return "mariadb" in str(version).lower()


def bound_session(conn: Connection, statement_timeout_s: float) -> bool:
    """Set this session's server-side bounds (module rule 2); return True on MariaDB.

    ``statement_timeout_s <= 0`` leaves statements unbounded.
    """
    mariadb = server_is_mariadb(conn)
    cursor = conn.cursor()
    cursor.execute("SET SESSION TRANSACTION ISOLATION LEVEL READ COMMITTED")
    if statement_timeout_s > 0:
        lock_wait_s = max(1, math.ceil(statement_timeout_s))
        if mariadb:
            cursor.execute(
                "SET SESSION max_statement_time = %s, innodb_lock_wait_timeout = %s",
                (float(statement_timeout_s), lock_wait_s),
            )
        else:
            cursor.execute(
                "SET SESSION max_execution_time = %s, innodb_lock_wait_timeout = %s",
                (max(1, math.ceil(statement_timeout_s * 1000)), lock_wait_s),
            )
    return mariadb


@contextmanager
def transaction(conn: Connection) -> Iterator[Any]:
    """``START TRANSACTION`` ... ``COMMIT``, rolled back on any error; yields a cursor."""
    cursor = conn.cursor()
    cursor.execute("START TRANSACTION")
    try:
        yield cursor
    except BaseException:
        conn.rollback()  # type: ignore[no-untyped-call]  # (stubs: untyped)
        raise
    conn.commit()  # type: ignore[no-untyped-call]


def close_quietly(conn: Connection) -> None:
    with suppress(MySQLdb.Error):
        conn.close()  # type: ignore[no-untyped-call]


# --- the pool -----------------------------------------------------------------------------------


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
            for attempt in range(1, _DEADLOCK_ATTEMPTS + 1):
                try:
                    result = fn(conn)
                    break
                except MySQLdb.OperationalError as exc:
                    if _error_code(exc) != _DEADLOCK or attempt == _DEADLOCK_ATTEMPTS:
                        raise
        except BaseException as exc:
            if _keeps_connection(exc):
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


# --- the directory ------------------------------------------------------------------------------


_USER_COLUMNS: Final = "name, password_hash, is_admin, created_at_ms, id, revoked_before_ms"


def _user(row: tuple[Any, ...]) -> User:
    name, password_hash, is_admin, created_at_ms, account_id, revoked_before_ms = row
    return User(
        name,
        password_hash,
        int(created_at_ms),
        bool(is_admin),
        id=int(account_id),
        revoked_before_ms=int(revoked_before_ms),
    )


def _select_user(cursor: Any, name: str, *, lock: bool = False) -> User | None:
    """The account named exactly ``name``, else the one whose key is ``name``'s."""
    cursor.execute(
        f"SELECT {_USER_COLUMNS} FROM users WHERE name = %s OR name_key = %s"
        f" ORDER BY name = %s DESC LIMIT 1{' FOR UPDATE' if lock else ''}",
        (name, validation.name_key(name), name),
    )
    row = cursor.fetchone()
    return None if row is None else _user(row)


def _select_user_by_id(cursor: Any, account_id: int) -> User | None:
    cursor.execute(f"SELECT {_USER_COLUMNS} FROM users WHERE id = %s", (account_id,))
    row = cursor.fetchone()
    return None if row is None else _user(row)


def _room(row: tuple[Any, ...]) -> Room:
    room_id, name, created_at_ms = row
    return Room(int(room_id), name, int(created_at_ms))


def _fetch_one(conn: Connection, sql: str, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
    cursor = conn.cursor()
    cursor.execute(sql, args)
    row: tuple[Any, ...] | None = cursor.fetchone()
    return row


def _fetch_all(conn: Connection, sql: str, args: tuple[Any, ...]) -> list[tuple[Any, ...]]:
    cursor = conn.cursor()
    cursor.execute(sql, args)
    return list(cursor.fetchall())


@attrs.define(eq=False)
class MysqlDirectory(ClosesOnExit):
    """``ports.Directory`` in MySQL/MariaDB (schema: ``migrations/mysql``).

    Names are unique by ``name_key`` (migration 0002; the exact name is looked up first, so
    migrated twins stay reachable) and sort by code point. Account ids and room ids come
    from ``AUTO_INCREMENT``: increasing, never reused (the server keeps its counters across
    restarts; a failed insert may skip one).
    ``add_member`` is atomic against every node (module rule 3). ``check()`` also verifies
    that the schema is at least the version this chatnode ships (else: run ``chatnode
    migrate``). The directory owns its pool: ``aclose()`` closes it.
    """

    pool: MysqlPool

    @classmethod
    def from_url(
        cls, url: str, *, pool_size: int = 8, statement_timeout_s: float = 5.0
    ) -> MysqlDirectory:
        return cls(MysqlPool.from_url(url, size=pool_size, statement_timeout_s=statement_timeout_s))

    async def check(self) -> None:
        from chatnode.adapters.mysql.migrations import read_mysql_version, shipped_mysql_version

        needed = shipped_mysql_version()
        current = await self.pool.run(read_mysql_version)
        if current < needed:
            raise errors.Unavailable(
                f"the MySQL schema is at version {current}, this chatnode needs {needed}: "
                "run `chatnode migrate`"
            )

    async def aclose(self) -> None:
        await self.pool.aclose()

    async def create_user(
        self, name: str, password_hash: str, *, created_at_ms: int, is_admin: bool = False
    ) -> User:
        """The key is the table's generated ``name_key`` (``LOWER(name)``, which is
        ``validation.name_key`` for every name the node accepts): unique in the server, so
        nodes racing for one name ignoring case get one account and one ``Conflict``."""

        def insert(conn: Connection) -> int:
            cursor = conn.cursor()
            cursor.execute(
                "INSERT INTO users (name, password_hash, is_admin, created_at_ms)"
                " VALUES (%s, %s, %s, %s)",
                (name, password_hash, is_admin, created_at_ms),
            )
            return int(cursor.lastrowid)

        try:
            account_id = await self.pool.run(insert)
        except MySQLdb.IntegrityError as exc:
            if _error_code(exc) != _DUPLICATE_KEY:
                raise
            raise errors.Conflict(
                f"the user name {name!r} is already taken (names are compared ignoring case);"
                " choose another"
            ) from exc
        return User(name, password_hash, created_at_ms, is_admin, id=account_id)

    async def get_user(self, name: str) -> User | None:
        return await self.pool.run(lambda conn: _select_user(conn.cursor(), name))

    async def get_user_by_id(self, account_id: int) -> User | None:
        return await self.pool.run(lambda conn: _select_user_by_id(conn.cursor(), account_id))

    async def set_password(
        self, account_id: int, password_hash: str, *, revoked_before_ms: int
    ) -> User | None:
        def update(conn: Connection) -> User | None:
            with transaction(conn) as cursor:
                cursor.execute(
                    "UPDATE users SET password_hash = %s,"
                    " revoked_before_ms = GREATEST(revoked_before_ms, %s) WHERE id = %s",
                    (password_hash, revoked_before_ms, account_id),
                )
                return _select_user_by_id(cursor, account_id)

        return await self.pool.run(update)

    async def set_admin(
        self, name: str, is_admin: bool, *, revoked_before_ms: int = 0
    ) -> User | None:
        def update(conn: Connection) -> User | None:
            with transaction(conn) as cursor:
                user = _select_user(cursor, name, lock=True)
                if user is None:
                    return None
                cursor.execute(
                    "UPDATE users SET is_admin = %s,"
                    " revoked_before_ms = GREATEST(revoked_before_ms, %s) WHERE id = %s",
                    (is_admin, revoked_before_ms, user.id),
                )
                return _select_user_by_id(cursor, user.id)

        return await self.pool.run(update)

    async def delete_all_users(self) -> int:
        def delete(conn: Connection) -> int:
            with transaction(conn) as cursor:
                cursor.execute("DELETE FROM memberships")
                cursor.execute("DELETE FROM users")
                return int(cursor.rowcount)

        return await self.pool.run(delete)

    async def create_room(self, name: str, *, created_at_ms: int) -> Room:
        def insert(conn: Connection) -> int:
            cursor = conn.cursor()
            cursor.execute(
                "INSERT INTO rooms (name, created_at_ms) VALUES (%s, %s)", (name, created_at_ms)
            )
            return int(cursor.lastrowid)

        room_id = await self.pool.run(insert)
        return Room(room_id, name, created_at_ms)

    async def get_room(self, room_id: int) -> Room | None:
        row = await self.pool.run(
            partial(
                _fetch_one,
                sql="SELECT id, name, created_at_ms FROM rooms WHERE id = %s",
                args=(room_id,),
            )
        )
        return None if row is None else _room(row)

    async def list_rooms(self, *, after_id: int, limit: int) -> list[Room]:
        rows = await self.pool.run(
            partial(
                _fetch_all,
                sql="SELECT id, name, created_at_ms FROM rooms WHERE id > %s ORDER BY id LIMIT %s",
                args=(after_id, max(limit, 0)),
            )
        )
        return [_room(row) for row in rows]

    async def add_member(self, room_id: int, user: str, *, max_members: int) -> bool:
        joined_at_ms = int(time.time() * 1000)

        def insert(conn: Connection) -> bool:
            with transaction(conn) as cursor:
                cursor.execute("SELECT id FROM rooms WHERE id = %s FOR UPDATE", (room_id,))
                if cursor.fetchone() is None:
                    raise errors.NotFound(f"there is no room {room_id}")
                cursor.execute("SELECT 1 FROM users WHERE name = %s", (user,))
                if cursor.fetchone() is None:
                    raise errors.NotFound(f"there is no user {user!r}")
                cursor.execute(
                    "SELECT 1 FROM memberships WHERE room_id = %s AND user = %s", (room_id, user)
                )
                if cursor.fetchone() is not None:
                    return False
                cursor.execute("SELECT COUNT(*) FROM memberships WHERE room_id = %s", (room_id,))
                (count,) = cursor.fetchone()
                if count >= max_members:
                    raise errors.RoomFull(
                        f"room {room_id} is full ({max_members} members); "
                        "try again after someone leaves"
                    )
                cursor.execute(
                    "INSERT INTO memberships (room_id, user, joined_at_ms) VALUES (%s, %s, %s)",
                    (room_id, user, joined_at_ms),
                )
                return True

        try:
            return await self.pool.run(insert)
        except MySQLdb.IntegrityError as exc:
            if _error_code(exc) == _NO_PARENT_ROW:  # the user was deleted meanwhile
                raise errors.NotFound(f"there is no user {user!r}") from exc
            raise

    async def remove_member(self, room_id: int, user: str) -> bool:
        def delete(conn: Connection) -> bool:
            cursor = conn.cursor()
            cursor.execute(
                "DELETE FROM memberships WHERE room_id = %s AND user = %s", (room_id, user)
            )
            return int(cursor.rowcount) > 0

        return await self.pool.run(delete)

    async def list_members(self, room_id: int) -> list[str]:
        rows = await self.pool.run(
            partial(
                _fetch_all,
                sql="SELECT user FROM memberships WHERE room_id = %s ORDER BY user",
                args=(room_id,),
            )
        )
        return [name for (name,) in rows]


if TYPE_CHECKING:  # mypy proves the adapter implements its port

    def _implements_port(directory: MysqlDirectory) -> ports.Directory:
        return directory
