"""``ports.Revocations`` on the embedded database."""

from __future__ import annotations

import sqlite3
import time
from typing import TYPE_CHECKING

import attrs

from chatnode.adapters.sqlite.runner import SqliteDatabase
from chatnode.adapters.sqlite.transaction import Transaction
from chatnode.core.models import Revocation, RevocationChanges, RevocationKind, RevocationState

if TYPE_CHECKING:
    from chatnode.core import ports


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
            with Transaction(conn):
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


if TYPE_CHECKING:  # mypy proves the adapter implements its port

    def _implements_port(db: SqliteDatabase) -> ports.Revocations:
        return SqliteRevocations(db)
