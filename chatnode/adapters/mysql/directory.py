"""``ports.Directory`` in MySQL or MariaDB: users, rooms and memberships.

Rule: **one call, one transaction.** Sessions run in autocommit with ``READ COMMITTED``; a
call that checks then writes runs ``START TRANSACTION`` ... ``COMMIT`` in its worker function
and rolls back on any error. ``add_member`` locks the room row (``SELECT ... FOR UPDATE``)
before counting, so concurrent joins on any number of nodes never overfill a room. A deadlock
(1213) rolls the transaction back and the pool runs it again (``pool.py`` rule 4).

Errors: besides what the pool maps (``errors.py``), a duplicate user name is ``Conflict`` and
an unknown room or user in ``add_member`` is ``NotFound``.
"""

from __future__ import annotations

import time
from functools import partial
from typing import TYPE_CHECKING, Any, Final

import attrs
import MySQLdb

from chatnode.adapters.lifecycle import ClosesOnExit
from chatnode.adapters.mysql.connection import transaction
from chatnode.adapters.mysql.errors import DUPLICATE_KEY, NO_PARENT_ROW, error_code
from chatnode.adapters.mysql.migrations import read_mysql_version, shipped_mysql_version
from chatnode.adapters.mysql.pool import MysqlPool
from chatnode.adapters.mysql.url import Connection
from chatnode.core import errors, validation
from chatnode.core.models import Room, User

if TYPE_CHECKING:
    from chatnode.core import ports

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
    """``ports.Directory`` in MySQL/MariaDB (schema: ``schema/``, applied by ``migrations.py``).

    Names are unique by ``name_key`` (migration 0002; the exact name is looked up first, so
    migrated twins stay reachable) and sort by code point. Account ids and room ids come
    from ``AUTO_INCREMENT``: increasing, never reused (the server keeps its counters across
    restarts; a failed insert may skip one).
    ``add_member`` is atomic against every node (the module rule). ``check()`` also verifies
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
            if error_code(exc) != DUPLICATE_KEY:
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
            if error_code(exc) == NO_PARENT_ROW:  # the user was deleted meanwhile
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

    async def rooms_of(self, user: str, *, limit: int) -> list[int]:
        rows = await self.pool.run(
            partial(
                _fetch_all,
                sql="SELECT room_id FROM memberships WHERE user = %s ORDER BY room_id LIMIT %s",
                args=(user, limit),
            )
        )
        return [int(room_id) for (room_id,) in rows]


if TYPE_CHECKING:  # mypy proves the adapter implements its port

    def _implements_port(directory: MysqlDirectory) -> ports.Directory:
        return directory
