"""``ports.Directory`` in MySQL or MariaDB: users, rooms and memberships.

Rules:

1. **One call, one transaction.** Sessions run in autocommit with ``READ COMMITTED``; a
   call that checks then writes runs ``START TRANSACTION`` ... ``COMMIT`` in its worker
   function and rolls back on any error. A deadlock (1213) rolls the transaction back and
   the pool runs it again (``pool.py`` rule 4).
2. **Room writes lock the room row.** ``add_member`` and ``ban`` lock it
   (``SELECT ... FOR UPDATE``) before they check and write, so concurrent joins on any number
   of nodes never overfill a room and a join never slips past a ban.
3. **One direct room per pair**: ``rooms.direct_key`` (the two account ids, lower first) is a
   unique key; two nodes making the pair's room at once make one, the other reads it.
4. **A page of visible rooms costs a page**, however many rooms others have: the first
   ``limit`` public rooms (key ``rooms_by_visibility``) and the first ``limit`` of the
   user's memberships (key ``memberships_by_user``) after ``after_id``, merged.

Errors: besides what the pool maps (``errors.py``), a duplicate user name is ``Conflict``, an
unknown room ``NotFound`` (``room_not_found``), an unknown user ``NotFound``
(``user_not_found``).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from functools import partial
from typing import TYPE_CHECKING, Any, Final, TypeVar

import attrs
import MySQLdb

from chatnode.adapters.lifecycle import ClosesOnExit
from chatnode.adapters.mysql.connection import transaction
from chatnode.adapters.mysql.errors import DUPLICATE_KEY, NO_PARENT_ROW, error_code
from chatnode.adapters.mysql.migrations import read_mysql_version, shipped_mysql_version
from chatnode.adapters.mysql.pool import MysqlPool
from chatnode.adapters.mysql.url import Connection
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

T = TypeVar("T")
CURSOR_BATCH: Final = 500
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


_ROOM_COLUMNS: Final = "id, name, created_at_ms, visibility, created_by"
_ROOM_COLUMNS_R: Final = "r.id, r.name, r.created_at_ms, r.visibility, r.created_by"


def _room(row: tuple[Any, ...]) -> Room:
    room_id, name, created_at_ms, visibility, created_by = row
    return Room(int(room_id), name, int(created_at_ms), str(visibility), created_by)


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
                cursor.execute("DELETE FROM bans")
                cursor.execute("DELETE FROM users")
                return int(cursor.rowcount)

        return await self.pool.run(delete)

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
        seated = first_members(owner, members) if visibility == PRIVATE else []
        if seated and len(seated) > max_members:
            raise room_full(0, max_members)

        def insert(conn: Connection) -> int:
            with transaction(conn) as cursor:
                for user, _ in seated:
                    _require_user(cursor, user, lock=True)
                cursor.execute(
                    "INSERT INTO rooms (name, created_at_ms, visibility, created_by)"
                    " VALUES (%s, %s, %s, %s)",
                    (name, created_at_ms, visibility, owner),
                )
                room_id = int(cursor.lastrowid)
                if seated:
                    cursor.executemany(
                        "INSERT INTO memberships (room_id, user, role, joined_at_ms)"
                        " VALUES (%s, %s, %s, %s)",
                        [(room_id, user, role, created_at_ms) for user, role in seated],
                    )
                return room_id

        room_id = await self._run_naming_users(insert)
        return Room(room_id, name, created_at_ms, visibility, owner)

    async def direct_room(self, user: str, other: str, *, created_at_ms: int) -> tuple[Room, bool]:
        """Rule 3: the insert is refused by the unique ``direct_key`` when another node made
        the pair's room first (it committed, or our insert waited for its lock); then the
        room it made is read, which READ COMMITTED shows."""

        def insert(conn: Connection) -> tuple[Room, bool]:
            with transaction(conn) as cursor:
                ids = [
                    _require_user(cursor, user, lock=True),
                    _require_user(cursor, other, lock=True),
                ]
                key = direct_key(*ids)
                found = _select_direct(cursor, key)
                if found is not None:
                    return found, False
                name = direct_name(user, other)
                try:
                    cursor.execute(
                        "INSERT INTO rooms (name, created_at_ms, visibility, created_by,"
                        " direct_key) VALUES (%s, %s, 'direct', %s, %s)",
                        (name, created_at_ms, user, key),
                    )
                except MySQLdb.IntegrityError as exc:
                    if error_code(exc) != DUPLICATE_KEY:
                        raise
                    found = _select_direct(cursor, key)
                    if found is None:  # made and gone again: rooms are never deleted
                        raise
                    return found, False
                room_id = int(cursor.lastrowid)
                cursor.executemany(
                    "INSERT INTO memberships (room_id, user, role, joined_at_ms)"
                    " VALUES (%s, %s, 'member', %s)",
                    [(room_id, name_, created_at_ms) for name_ in sorted({user, other})],
                )
                return Room(room_id, name, created_at_ms, DIRECT, user), True

        return await self._run_naming_users(insert)

    async def _run_naming_users(self, work: Callable[[Connection], T]) -> T:
        """``work`` in the pool; a user deleted meanwhile (foreign key) is ``user_not_found``."""
        try:
            return await self.pool.run(work)
        except MySQLdb.IntegrityError as exc:
            if error_code(exc) == NO_PARENT_ROW:
                raise errors.NotFound("a user named does not exist", code="user_not_found") from exc
            raise

    async def find_direct(self, user: str, other: str) -> Room | None:
        def select(conn: Connection) -> Room | None:
            cursor = conn.cursor()
            cursor.execute("SELECT id FROM users WHERE name IN (%s, %s)", (user, other))
            ids = [int(row[0]) for row in cursor.fetchall()]
            return None if len(ids) != 2 else _select_direct(cursor, direct_key(*ids))

        return await self.pool.run(select)

    async def get_room(self, room_id: int) -> Room | None:
        row = await self.pool.run(
            partial(
                _fetch_one,
                sql=f"SELECT {_ROOM_COLUMNS} FROM rooms WHERE id = %s",
                args=(room_id,),
            )
        )
        return None if row is None else _room(row)

    async def list_rooms(self, *, after_id: int, limit: int) -> list[Room]:
        rows = await self.pool.run(
            partial(
                _fetch_all,
                sql=f"SELECT {_ROOM_COLUMNS} FROM rooms WHERE id > %s ORDER BY id LIMIT %s",
                args=(after_id, max(limit, 0)),
            )
        )
        return [_room(row) for row in rows]

    async def visible_rooms(self, user: str, *, after_id: int, limit: int) -> list[Listed]:
        """Rule 4: a page of the public rooms and a page of the user's, merged."""
        limit = max(limit, 0)
        rows = await self.pool.run(
            partial(
                _fetch_all,
                sql=f"SELECT {_ROOM_COLUMNS_R}, (SELECT COUNT(*) FROM memberships AS c"
                " WHERE c.room_id = r.id) FROM ("
                " (SELECT id FROM rooms WHERE visibility = 'public' AND id > %s"
                " ORDER BY id LIMIT %s)"
                " UNION (SELECT room_id FROM memberships WHERE user = %s AND room_id > %s"
                " ORDER BY room_id LIMIT %s)"
                ") AS v JOIN rooms AS r ON r.id = v.id ORDER BY r.id LIMIT %s",
                args=(after_id, limit, user, after_id, limit, limit),
            )
        )
        return [Listed(_room(row[:-1]), int(row[-1])) for row in rows]

    async def user_rooms(self, user: str, *, limit: int) -> list[Room]:
        rows = await self.pool.run(
            partial(
                _fetch_all,
                sql=f"SELECT {_ROOM_COLUMNS_R} FROM memberships AS m JOIN rooms AS r"
                " ON r.id = m.room_id WHERE m.user = %s"
                " ORDER BY m.joined_at_ms DESC, r.id DESC LIMIT %s",
                args=(user, max(limit, 0)),
            )
        )
        return [_room(row) for row in rows]

    async def get_member(self, room_id: int, user: str) -> Member | None:
        row = await self.pool.run(
            partial(
                _fetch_one,
                sql="SELECT user, role, joined_at_ms FROM memberships"
                " WHERE room_id = %s AND user = %s",
                args=(room_id, user),
            )
        )
        return None if row is None else Member(row[0], row[1], int(row[2]))

    async def add_member(
        self, room_id: int, user: str, *, max_members: int, role: str = MEMBER
    ) -> bool:
        joined_at_ms = int(time.time() * 1000)

        def insert(conn: Connection) -> bool:
            with transaction(conn) as cursor:
                created_by = _lock_room(cursor, room_id)
                _require_user(cursor, user)
                cursor.execute(
                    "SELECT 1 FROM memberships WHERE room_id = %s AND user = %s", (room_id, user)
                )
                if cursor.fetchone() is not None:
                    return False
                cursor.execute(
                    "SELECT 1 FROM bans WHERE room_id = %s AND user = %s", (room_id, user)
                )
                if cursor.fetchone() is not None:
                    raise banned(room_id, user)
                cursor.execute("SELECT COUNT(*) FROM memberships WHERE room_id = %s", (room_id,))
                (count,) = cursor.fetchone()
                if count >= max_members:
                    raise room_full(room_id, max_members)
                cursor.execute(
                    "INSERT INTO memberships (room_id, user, role, joined_at_ms)"
                    " VALUES (%s, %s, %s, %s)",
                    (room_id, user, OWNER if created_by == user else role, joined_at_ms),
                )
                return True

        return await self._run_naming_users(insert)

    async def remove_member(self, room_id: int, user: str) -> bool:
        def delete(conn: Connection) -> bool:
            cursor = conn.cursor()
            cursor.execute(
                "DELETE FROM memberships WHERE room_id = %s AND user = %s", (room_id, user)
            )
            return int(cursor.rowcount) > 0

        return await self.pool.run(delete)

    async def list_members(self, room_id: int) -> list[str]:
        return [member.user for member in await self.list_roles(room_id)]

    async def list_roles(self, room_id: int) -> list[Member]:
        rows = await self.pool.run(
            partial(
                _fetch_all,
                sql="SELECT user, role, joined_at_ms FROM memberships WHERE room_id = %s"
                " ORDER BY user",
                args=(room_id,),
            )
        )
        return [Member(name, role, int(at)) for name, role, at in rows]

    async def ban(self, room_id: int, user: str, *, by: str, at_ms: int) -> bool:
        """Under the room's row lock, like ``add_member``: a join racing a ban either
        comes before it (and is ended by it) or finds the ban."""

        def insert(conn: Connection) -> bool:
            with transaction(conn) as cursor:
                _lock_room(cursor, room_id)
                _require_user(cursor, user)
                cursor.execute(
                    "DELETE FROM memberships WHERE room_id = %s AND user = %s", (room_id, user)
                )
                cursor.execute(
                    "INSERT IGNORE INTO bans (room_id, user, by_user, at_ms)"
                    " VALUES (%s, %s, %s, %s)",
                    (room_id, user, by, at_ms),
                )
                return int(cursor.rowcount) > 0

        return await self.pool.run(insert)

    async def unban(self, room_id: int, user: str) -> bool:
        def delete(conn: Connection) -> bool:
            cursor = conn.cursor()
            cursor.execute("DELETE FROM bans WHERE room_id = %s AND user = %s", (room_id, user))
            return int(cursor.rowcount) > 0

        return await self.pool.run(delete)

    async def list_bans(self, room_id: int, *, limit: int) -> list[str]:
        rows = await self.pool.run(
            partial(
                _fetch_all,
                sql="SELECT user FROM bans WHERE room_id = %s ORDER BY user LIMIT %s",
                args=(room_id, max(limit, 0)),
            )
        )
        return [name for (name,) in rows]

    # -- cursors: forward only, one statement per batch (of at most CURSOR_BATCH rows) ----

    async def advance_cursors(self, cursors: Sequence[Cursor]) -> None:
        rows = coalesce_cursors(cursors)  # in key order: concurrent batches lock alike

        def upsert(conn: Connection) -> None:
            cursor = conn.cursor()
            for start in range(0, len(rows), CURSOR_BATCH):
                chunk = rows[start : start + CURSOR_BATCH]
                args: list[object] = []
                for c in chunk:
                    args += (c.room_id, c.user, c.delivered, c.read)
                cursor.execute(
                    "INSERT INTO cursors (room_id, user, delivered_offset, read_offset) VALUES "
                    + ", ".join(["(%s, %s, %s, %s)"] * len(chunk))
                    + " ON DUPLICATE KEY UPDATE"
                    " delivered_offset = GREATEST(delivered_offset, VALUES(delivered_offset)),"
                    " read_offset = GREATEST(read_offset, VALUES(read_offset))",
                    tuple(args),
                )

        if rows:
            await self.pool.run(upsert)

    async def room_cursors(self, room_id: int) -> list[Cursor]:
        rows = await self.pool.run(
            partial(
                _fetch_all,
                sql="SELECT c.user, c.delivered_offset, c.read_offset FROM cursors AS c"
                " JOIN memberships AS m ON m.room_id = c.room_id AND m.user = c.user"
                " WHERE c.room_id = %s ORDER BY c.user",
                args=(room_id,),
            )
        )
        return [Cursor(room_id, user, int(d), int(r)) for user, d, r in rows]

    async def user_cursors(self, user: str, room_ids: Sequence[int]) -> dict[int, Cursor]:
        ids = sorted(set(room_ids))
        found: dict[int, Cursor] = {}
        for start in range(0, len(ids), CURSOR_BATCH):
            chunk = ids[start : start + CURSOR_BATCH]
            rows = await self.pool.run(
                partial(
                    _fetch_all,
                    sql="SELECT room_id, delivered_offset, read_offset FROM cursors"
                    f" WHERE user = %s AND room_id IN ({', '.join(['%s'] * len(chunk))})",
                    args=(user, *chunk),
                )
            )
            for room_id, d, r in rows:
                found[int(room_id)] = Cursor(int(room_id), user, int(d), int(r))
        return found


def _lock_room(cursor: Any, room_id: int) -> str | None:
    """Lock the room's row for the transaction; its creator. ``NotFound`` if none."""
    cursor.execute("SELECT created_by FROM rooms WHERE id = %s FOR UPDATE", (room_id,))
    row = cursor.fetchone()
    if row is None:
        raise errors.NotFound(f"there is no room {room_id}", code="room_not_found")
    return None if row[0] is None else str(row[0])


def _require_user(cursor: Any, user: str, *, lock: bool = False) -> int:
    """The account id of the user named exactly ``user`` (its row share-locked with
    ``lock``, so it is not deleted before the transaction ends); ``NotFound`` if none."""
    cursor.execute(
        f"SELECT id FROM users WHERE name = %s{' LOCK IN SHARE MODE' if lock else ''}", (user,)
    )
    row = cursor.fetchone()
    if row is None:
        raise errors.NotFound(f"there is no user {user!r}", code="user_not_found")
    return int(row[0])


def _select_direct(cursor: Any, key: str) -> Room | None:
    cursor.execute(f"SELECT {_ROOM_COLUMNS} FROM rooms WHERE direct_key = %s", (key,))
    row = cursor.fetchone()
    return None if row is None else _room(row)


if TYPE_CHECKING:  # mypy proves the adapter implements its port

    def _implements_port(directory: MysqlDirectory) -> ports.Directory:
        return directory
