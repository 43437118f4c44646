"""``ports.Archive`` on the embedded database: the ``messages`` table and its FTS5 index."""

from __future__ import annotations

import json
import re
import sqlite3
from collections.abc import Sequence
from functools import partial
from typing import TYPE_CHECKING, Final

import attrs
import trio

from chatnode.adapters.sqlite.messages import (
    MESSAGE_COLUMN_COUNT,
    MESSAGE_COLUMNS,
    last_offset,
    message_of,
    read_range,
)
from chatnode.adapters.sqlite.runner import SqliteDatabase
from chatnode.adapters.sqlite.schema import index_pending
from chatnode.adapters.sqlite.transaction import Transaction
from chatnode.core import ports
from chatnode.core.models import (
    ChatMessage,
    DeadLetter,
    Refusal,
    RefusalKind,
    SearchHit,
    SearchQuery,
)

# A search term is a run of letters, digits or marks: what the unicode61 tokenizer indexes.
# Everything else (quotes, parentheses, "*", ":", "^", "-") is a separator, never FTS5 syntax.
_TERM: Final = re.compile(r"[^\W_]+")


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


@attrs.define(eq=False)
class SqliteArchive:
    """``ports.Archive`` on the ``messages`` table with an FTS5 index kept by triggers.

    ``store`` decodes the documents (``ChatMessage.from_document``; one that is not a message
    document is refused) and inserts them in one transaction of ``INSERT OR IGNORE``: storing a
    message again (same room and offset) changes nothing, the first stored version wins. When
    the insert added fewer rows than it was given, the same transaction compares each
    document with the row under its key: a different message there is refused as a
    ``CONFLICT`` carrying the stored one (the check costs nothing while every row is new). What
    is stored is visible at once, so ``refresh`` has nothing to do. A membership change is
    stored, read and counted by ``last_offset`` like a message, its ``event`` and ``by``
    kept. ``search`` matches every word of the query (case and diacritics folded) in messages
    only, never a membership change; ranks by BM25, then newest first; the time filters are
    inclusive. ``SearchHit.score`` is the negated BM25 value: higher is better. Dead letters
    are rows of ``dead_letters``, unique by digest, listed by ``(kept_at_ms, digest)``.
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
            with Transaction(conn):
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
            lambda conn: read_range(conn, room_id, after_offset, up_to_offset, limit)
        )

    async def tail(self, room_id: int, *, up_to_offset: int, limit: int) -> list[ChatMessage]:
        def select(conn: sqlite3.Connection) -> list[ChatMessage]:
            rows = conn.execute(
                f"SELECT {MESSAGE_COLUMNS} FROM messages AS m"
                ' WHERE m.room_id = ? AND m."offset" <= ? ORDER BY m."offset" DESC LIMIT ?',
                (room_id, up_to_offset, max(limit, 0)),
            )
            return [message_of(row) for row in reversed(rows.fetchall())]

        return await self._db.run(select)

    async def last_offset(self, room_id: int) -> int:
        return await self._db.run(lambda conn: last_offset(conn, room_id))

    async def search(self, query: SearchQuery) -> list[SearchHit]:
        match = fts_match_expression(query.text)
        if match is None or query.limit <= 0 or query.rooms == ():
            await trio.lowlevel.checkpoint()
            return []
        return await self._db.run(partial(_search, match, query))


def _insert_messages(
    messages: list[tuple[bytes, ChatMessage]], conn: sqlite3.Connection
) -> list[Refusal]:
    """Insert the messages that are new; the documents whose key holds a different message."""
    with Transaction(conn):
        inserted = conn.executemany(
            "INSERT OR IGNORE INTO messages"
            ' (room_id, "offset", user, text, timestamp_ms, event, by_user)'
            " VALUES (?, ?, ?, ?, ?, ?, ?)",
            [
                (m.room_id, m.offset, m.user, m.text, m.timestamp_ms, m.event, m.by)
                for _, m in messages
            ],
        ).rowcount
        if inserted == len(messages):
            return []
        conflicts: list[Refusal] = []
        for document, m in messages:
            row = conn.execute(
                f"SELECT {MESSAGE_COLUMNS} FROM messages AS m"
                ' WHERE m.room_id = ? AND m."offset" = ?',
                (m.room_id, m.offset),
            ).fetchone()
            stored = message_of(row)
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
    index_pending(conn)
    rooms = None if q.rooms is None else json.dumps(list(q.rooms))
    rows = conn.execute(
        f"SELECT {MESSAGE_COLUMNS}, bm25(messages_fts) AS rank"
        " FROM messages_fts JOIN messages AS m ON m.id = messages_fts.rowid"
        " WHERE messages_fts MATCH ? AND m.event IS NULL"
        " AND (? IS NULL OR m.room_id = ?) AND (? IS NULL OR m.user = ?)"
        " AND (? IS NULL OR m.room_id IN (SELECT value FROM json_each(?)))"
        " AND (? IS NULL OR m.timestamp_ms >= ?) AND (? IS NULL OR m.timestamp_ms <= ?)"
        ' ORDER BY rank, m.timestamp_ms DESC, m.room_id, m."offset" DESC LIMIT ?',
        (
            match,
            q.room_id,
            q.room_id,
            q.user,
            q.user,
            rooms,
            rooms,
            q.from_ms,
            q.from_ms,
            q.to_ms,
            q.to_ms,
            q.limit,
        ),
    )
    return [SearchHit(message_of(row), -float(row[MESSAGE_COLUMN_COUNT])) for row in rows]


if TYPE_CHECKING:  # mypy proves the adapter implements its port

    def _implements_port(db: SqliteDatabase) -> ports.Archive:
        return SqliteArchive(db)
