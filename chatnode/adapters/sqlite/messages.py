"""The ``messages`` table, read by the bus (the room log) and the archive alike.

Rule: **the room log is the archive.** ``messages`` holds every published message;
``SqliteBus.publish`` inserts there, ``SqliteArchive.store`` inserts there with
``INSERT OR IGNORE``. A message is durable (against a process crash; with
``synchronous=NORMAL`` a power loss may drop the last commits) the moment ``publish`` returns,
so the embedded node needs no archive feed. It is searchable at once too (``schema.py`` rule 2).
"""

from __future__ import annotations

import sqlite3
from typing import Any, Final

from chatnode.core.models import ChatMessage

MESSAGE_COLUMNS: Final = 'm.room_id, m."offset", m.user, m.text, m.timestamp_ms'


def message_of(row: sqlite3.Row | tuple[Any, ...]) -> ChatMessage:
    room_id, offset, user, text, timestamp_ms = row[:5]
    return ChatMessage(int(room_id), int(offset), user, text, int(timestamp_ms))


def read_range(
    conn: sqlite3.Connection, room_id: int, after: int, up_to: int | None, limit: int
) -> list[ChatMessage]:
    rows = conn.execute(
        f'SELECT {MESSAGE_COLUMNS} FROM messages AS m WHERE m.room_id = ? AND m."offset" > ?'
        ' AND (? IS NULL OR m."offset" <= ?) ORDER BY m."offset" LIMIT ?',
        (room_id, after, up_to, up_to, max(limit, 0)),
    )
    return [message_of(row) for row in rows]


def last_offset(conn: sqlite3.Connection, room_id: int) -> int:
    (last,) = conn.execute(
        'SELECT COALESCE(MAX("offset"), 0) FROM messages WHERE room_id = ?', (room_id,)
    ).fetchone()
    return int(last)
