"""``ports.Directory`` on the embedded database: users, rooms, memberships."""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Sequence
from functools import partial
from typing import TYPE_CHECKING, Any, Final

import attrs
import trio

from chatnode.adapters.sqlite.runner import SqliteDatabase
from chatnode.adapters.sqlite.transaction import Transaction
from chatnode.core import errors, validation
from chatnode.core.models import (
    DIRECT,
    MEMBER,
    OWNER,
    PRIVATE,
    PUBLIC,
    Cursor,
    Listed,
    Member,
    Room,
    User,
    coalesce_cursors,
)
from chatnode.core.rooms import banned, direct_key, direct_name, first_members, room_full

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


_ROOM_COLUMNS: Final = "id, name, created_at_ms, visibility, created_by"
_ROOM_COLUMNS_R: Final = "r.id, r.name, r.created_at_ms, r.visibility, r.created_by"


def _room(row: sqlite3.Row | tuple[Any, ...]) -> Room:
    room_id, name, created_at_ms, visibility, created_by = row
    return Room(int(room_id), name, int(created_at_ms), visibility, created_by)


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
       ``add_member`` checks the ban, the member limit and inserts in one transaction, so
       concurrent joins never overfill a room; ``create_room`` makes a room with all its
       first members, or nothing.
    3. **One direct room per pair.** ``rooms.direct_key`` (``direct_key``: the two account
       ids, lower first) is unique: the pair's room is looked up and made in one write
       transaction (SQLite has one writer), and the key would refuse a second one anyway.
    4. **A page of visible rooms costs a page**, however many rooms others have: the first
       ``limit`` public rooms (index ``rooms_by_visibility``) and the first ``limit`` of the
       user's memberships (index ``memberships_by_user``) after ``after_id``, merged.
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
                conn.execute("DELETE FROM bans")
                return conn.execute("DELETE FROM users").rowcount

        return await self._db.run(delete)

    async def create_room(
        self,
        name: str,
        *,
        created_at_ms: int,
        visibility: str = PUBLIC,
        owner: str | None = None,
        members: Sequence[str] = (),
        max_members: int = 0,
    ) -> Room:
        def insert(conn: sqlite3.Connection) -> int:
            with Transaction(conn):
                seated = first_members(owner, members) if visibility == PRIVATE else []
                if seated and len(seated) > max_members:
                    raise room_full(0, max_members)
                for user, _ in seated:
                    _require_user(conn, user)
                cursor = conn.execute(
                    "INSERT INTO rooms (name, created_at_ms, visibility, created_by)"
                    " VALUES (?, ?, ?, ?)",
                    (name, created_at_ms, visibility, owner),
                )
                assert cursor.lastrowid is not None
                conn.executemany(
                    "INSERT INTO memberships (room_id, user, role, joined_at_ms)"
                    " VALUES (?, ?, ?, ?)",
                    [(cursor.lastrowid, user, role, created_at_ms) for user, role in seated],
                )
            return cursor.lastrowid

        room_id = await self._db.run(insert)
        return Room(room_id, name, created_at_ms, visibility, owner)

    async def direct_room(self, user: str, other: str, *, created_at_ms: int) -> tuple[Room, bool]:
        def insert(conn: sqlite3.Connection) -> tuple[Room, bool]:
            with Transaction(conn):
                ids = [_require_user(conn, user), _require_user(conn, other)]
                key = direct_key(*ids)
                row = conn.execute(
                    f"SELECT {_ROOM_COLUMNS} FROM rooms WHERE direct_key = ?", (key,)
                ).fetchone()
                if row is not None:
                    return _room(row), False
                cursor = conn.execute(
                    "INSERT INTO rooms (name, created_at_ms, visibility, created_by, direct_key)"
                    " VALUES (?, ?, 'direct', ?, ?)",
                    (direct_name(user, other), created_at_ms, user, key),
                )
                assert cursor.lastrowid is not None
                conn.executemany(
                    "INSERT INTO memberships (room_id, user, role, joined_at_ms)"
                    " VALUES (?, ?, 'member', ?)",
                    [(cursor.lastrowid, name, created_at_ms) for name in sorted({user, other})],
                )
                return (
                    Room(cursor.lastrowid, direct_name(user, other), created_at_ms, DIRECT, user),
                    True,
                )

        return await self._db.run(insert)

    async def find_direct(self, user: str, other: str) -> Room | None:
        def select(conn: sqlite3.Connection) -> Room | None:
            ids = conn.execute(
                "SELECT id FROM users WHERE name IN (?, ?)", (user, other)
            ).fetchall()
            if len(ids) != 2:
                return None
            row = conn.execute(
                f"SELECT {_ROOM_COLUMNS} FROM rooms WHERE direct_key = ?",
                (direct_key(int(ids[0][0]), int(ids[1][0])),),
            ).fetchone()
            return None if row is None else _room(row)

        return await self._db.run(select)

    async def get_room(self, room_id: int) -> Room | None:
        def select(conn: sqlite3.Connection) -> Room | None:
            row = conn.execute(
                f"SELECT {_ROOM_COLUMNS} FROM rooms WHERE id = ?", (room_id,)
            ).fetchone()
            return None if row is None else _room(row)

        return await self._db.run(select)

    async def list_rooms(self, *, after_id: int, limit: int) -> list[Room]:
        def select(conn: sqlite3.Connection) -> list[Room]:
            rows = conn.execute(
                f"SELECT {_ROOM_COLUMNS} FROM rooms WHERE id > ? ORDER BY id LIMIT ?",
                (after_id, max(limit, 0)),
            )
            return [_room(row) for row in rows]

        return await self._db.run(select)

    async def visible_rooms(self, user: str, *, after_id: int, limit: int) -> list[Listed]:
        """Rule 4: a page of the public rooms and a page of the user's, merged."""

        def select(conn: sqlite3.Connection) -> list[Listed]:
            rows = conn.execute(
                f"SELECT {_ROOM_COLUMNS_R}, (SELECT COUNT(*) FROM memberships AS c"
                " WHERE c.room_id = r.id) FROM rooms AS r WHERE r.id IN ("
                " SELECT id FROM (SELECT id FROM rooms WHERE visibility = 'public'"
                " AND id > :after ORDER BY id LIMIT :limit)"
                " UNION SELECT room_id FROM (SELECT room_id FROM memberships"
                " WHERE user = :user AND room_id > :after ORDER BY room_id LIMIT :limit)"
                ") ORDER BY r.id LIMIT :limit",
                {"after": after_id, "user": user, "limit": max(limit, 0)},
            )
            return [Listed(_room(row[:-1]), int(row[-1])) for row in rows]

        return await self._db.run(select)

    async def user_rooms(self, user: str, *, limit: int) -> list[Room]:
        def select(conn: sqlite3.Connection) -> list[Room]:
            rows = conn.execute(
                f"SELECT {_ROOM_COLUMNS_R} FROM memberships AS m JOIN rooms AS r"
                " ON r.id = m.room_id WHERE m.user = ?"
                " ORDER BY m.joined_at_ms DESC, r.id DESC LIMIT ?",
                (user, max(limit, 0)),
            )
            return [_room(row) for row in rows]

        return await self._db.run(select)

    async def get_member(self, room_id: int, user: str) -> Member | None:
        def select(conn: sqlite3.Connection) -> Member | None:
            row = conn.execute(
                "SELECT user, role, joined_at_ms FROM memberships WHERE room_id = ? AND user = ?",
                (room_id, user),
            ).fetchone()
            return None if row is None else Member(row[0], row[1], int(row[2]))

        return await self._db.run(select)

    async def add_member(
        self, room_id: int, user: str, *, max_members: int, role: str = MEMBER
    ) -> bool:
        joined_at_ms = time.time_ns() // 1_000_000

        def insert(conn: sqlite3.Connection) -> bool:
            with Transaction(conn):
                row = conn.execute(
                    "SELECT created_by FROM rooms WHERE id = ?", (room_id,)
                ).fetchone()
                if row is None:
                    raise errors.NotFound(f"there is no room {room_id}", code="room_not_found")
                _require_user(conn, user)
                if _is_member(conn, room_id, user):
                    return False
                if _is_banned(conn, room_id, user):
                    raise banned(room_id, user)
                (count,) = conn.execute(
                    "SELECT COUNT(*) FROM memberships WHERE room_id = ?", (room_id,)
                ).fetchone()
                if count >= max_members:
                    raise room_full(room_id, max_members)
                conn.execute(
                    "INSERT INTO memberships (room_id, user, role, joined_at_ms)"
                    " VALUES (?, ?, ?, ?)",
                    (room_id, user, OWNER if row[0] == user else role, joined_at_ms),
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
        return [member.user for member in await self.list_roles(room_id)]

    async def list_roles(self, room_id: int) -> list[Member]:
        def select(conn: sqlite3.Connection) -> list[Member]:
            rows = conn.execute(
                "SELECT user, role, joined_at_ms FROM memberships WHERE room_id = ? ORDER BY user",
                (room_id,),
            )
            return [Member(name, role, int(at)) for name, role, at in rows]

        return await self._db.run(select)

    async def ban(self, room_id: int, user: str, *, by: str, at_ms: int) -> bool:
        def insert(conn: sqlite3.Connection) -> bool:
            with Transaction(conn):
                if conn.execute("SELECT 1 FROM rooms WHERE id = ?", (room_id,)).fetchone() is None:
                    raise errors.NotFound(f"there is no room {room_id}", code="room_not_found")
                _require_user(conn, user)
                conn.execute(
                    "DELETE FROM memberships WHERE room_id = ? AND user = ?", (room_id, user)
                )
                cursor = conn.execute(
                    "INSERT OR IGNORE INTO bans (room_id, user, by_user, at_ms)"
                    " VALUES (?, ?, ?, ?)",
                    (room_id, user, by, at_ms),
                )
            return cursor.rowcount > 0

        return await self._db.run(insert)

    async def unban(self, room_id: int, user: str) -> bool:
        def delete(conn: sqlite3.Connection) -> bool:
            with Transaction(conn):
                cursor = conn.execute(
                    "DELETE FROM bans WHERE room_id = ? AND user = ?", (room_id, user)
                )
            return cursor.rowcount > 0

        return await self._db.run(delete)

    async def list_bans(self, room_id: int, *, limit: int) -> list[str]:
        def select(conn: sqlite3.Connection) -> list[str]:
            rows = conn.execute(
                "SELECT user FROM bans WHERE room_id = ? ORDER BY user LIMIT ?",
                (room_id, max(limit, 0)),
            )
            return [name for (name,) in rows]

        return await self._db.run(select)

    # -- cursors: forward only, one transaction per batch ----------------------------------

    async def advance_cursors(self, cursors: Sequence[Cursor]) -> None:
        rows = [(c.room_id, c.user, c.delivered, c.read) for c in coalesce_cursors(cursors)]
        if not rows:
            return

        def upsert(conn: sqlite3.Connection) -> None:
            with Transaction(conn):
                conn.executemany(
                    "INSERT INTO cursors (room_id, user, delivered_offset, read_offset)"
                    " VALUES (?, ?, ?, ?) ON CONFLICT (room_id, user) DO UPDATE SET"
                    " delivered_offset = MAX(delivered_offset, excluded.delivered_offset),"
                    " read_offset = MAX(read_offset, excluded.read_offset)",
                    rows,
                )

        await self._db.run(upsert)

    async def room_cursors(self, room_id: int) -> list[Cursor]:
        def select(conn: sqlite3.Connection) -> list[Cursor]:
            rows = conn.execute(
                "SELECT c.user, c.delivered_offset, c.read_offset FROM cursors AS c"
                " JOIN memberships AS m ON m.room_id = c.room_id AND m.user = c.user"
                " WHERE c.room_id = ? ORDER BY c.user",
                (room_id,),
            )
            return [Cursor(room_id, user, int(d), int(r)) for user, d, r in rows]

        return await self._db.run(select)

    async def user_cursors(self, user: str, room_ids: Sequence[int]) -> dict[int, Cursor]:
        ids = sorted(set(room_ids))
        if not ids:
            return {}

        def select(conn: sqlite3.Connection) -> dict[int, Cursor]:
            found: dict[int, Cursor] = {}
            for start in range(0, len(ids), 500):
                chunk = ids[start : start + 500]
                rows = conn.execute(
                    "SELECT room_id, delivered_offset, read_offset FROM cursors"
                    f" WHERE user = ? AND room_id IN ({','.join('?' * len(chunk))})",
                    (user, *chunk),
                )
                for room_id, d, r in rows:
                    found[int(room_id)] = Cursor(int(room_id), user, int(d), int(r))
            return found

        return await self._db.run(select)


def _require_user(conn: sqlite3.Connection, user: str) -> int:
    """The account id of the user named exactly ``user``; ``NotFound`` if none."""
    row = conn.execute("SELECT id FROM users WHERE name = ?", (user,)).fetchone()
    if row is None:
        raise errors.NotFound(f"there is no user {user!r}", code="user_not_found")
    return int(row[0])


def _is_member(conn: sqlite3.Connection, room_id: int, user: str) -> bool:
    row = conn.execute(
        "SELECT 1 FROM memberships WHERE room_id = ? AND user = ?", (room_id, user)
    ).fetchone()
    return row is not None


def _is_banned(conn: sqlite3.Connection, room_id: int, user: str) -> bool:
    row = conn.execute(
        "SELECT 1 FROM bans WHERE room_id = ? AND user = ?", (room_id, user)
    ).fetchone()
    return row is not None


if TYPE_CHECKING:  # mypy proves the adapter implements its port

    def _implements_port(db: SqliteDatabase) -> ports.Directory:
        return SqliteDirectory(db)
