"""The ``messages`` table, read by the bus (the room log) and the archive alike.

Rule: **the room log is the archive.** ``messages`` holds every published message;
``SqliteBus.publish`` inserts there, ``SqliteArchive.store`` inserts there with
``INSERT OR IGNORE``. A message is durable (against a process crash; with
``synchronous=NORMAL`` a power loss may drop the last commits) the moment ``publish`` returns,
so the embedded node needs no archive feed. It is searchable at once too (``schema.py`` rule 2).

A membership change is a row like a message, with its own offset, ``text`` empty and
``event``/``by_user`` set (NULL for a message): reads and offsets count it, search never
returns it (``SqliteArchive.search``).
"""

from __future__ import annotations

import sqlite3
from typing import Any, Final

from chatnode.core.models import ChatMessage

MESSAGE_COLUMNS: Final = 'm.room_id, m."offset", m.user, m.text, m.timestamp_ms, m.event, m.by_user'
"""The columns :func:`message_of` reads, in its order (``messages AS m``)."""
MESSAGE_COLUMN_COUNT: Final = 7


def message_of(row: sqlite3.Row | tuple[Any, ...]) -> ChatMessage:
    """The message (or membership change) of a row selected with :data:`MESSAGE_COLUMNS`."""
    room_id, offset, user, text, timestamp_ms, event, by = row[:MESSAGE_COLUMN_COUNT]
    if event is None:
        return ChatMessage(int(room_id), int(offset), user, text, int(timestamp_ms))
    return ChatMessage(int(room_id), int(offset), user, text, int(timestamp_ms), event, by or "")


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
