"""``ports.Directory`` on the embedded database: users, rooms, memberships."""

from __future__ import annotations

import sqlite3
from functools import partial
from typing import TYPE_CHECKING, Any, Final

import attrs
import trio

from chatnode.adapters.sqlite.runner import SqliteDatabase
from chatnode.adapters.sqlite.transaction import Transaction
from chatnode.core import errors, validation
from chatnode.core.models import Room, User

if TYPE_CHECKING:
    from chatnode.core import ports

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
            with Transaction(conn):
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
            with Transaction(conn):
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
            with Transaction(conn):
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
            with Transaction(conn):
                conn.execute("DELETE FROM memberships")
                return conn.execute("DELETE FROM users").rowcount

        return await self._db.run(delete)

    async def create_room(self, name: str, *, created_at_ms: int) -> Room:
        def insert(conn: sqlite3.Connection) -> int:
            with Transaction(conn):
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
            with Transaction(conn):
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
            with Transaction(conn):
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

    async def rooms_of(self, user: str, *, limit: int) -> list[int]:
        def select(conn: sqlite3.Connection) -> list[int]:
            rows = conn.execute(
                "SELECT room_id FROM memberships WHERE user = ? ORDER BY room_id LIMIT ?",
                (user, limit),
            )
            return [room_id for (room_id,) in rows]

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


if TYPE_CHECKING:  # mypy proves the adapter implements its port

    def _implements_port(db: SqliteDatabase) -> ports.Directory:
        return SqliteDirectory(db)
