"""What a failing SQLite call means: the database is down (``Unavailable``) or a bug.

Rule: ``sqlite3.OperationalError`` whose primary result code says the database cannot be used
right now (busy, locked, out of memory, read-only, I/O error, full, cannot open, protocol) maps
to :class:`~chatnode.core.errors.Unavailable`, as does an error without a code; every other
SQLite error is a bug in the SQL and propagates.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Final

from chatnode.core import errors

# Primary result codes meaning "the database cannot be used right now", not "the SQL is wrong".
_UNAVAILABLE_CODES: Final = frozenset(
    {
        sqlite3.SQLITE_BUSY,
        sqlite3.SQLITE_LOCKED,
        sqlite3.SQLITE_NOMEM,
        sqlite3.SQLITE_READONLY,
        sqlite3.SQLITE_IOERR,
        sqlite3.SQLITE_FULL,
        sqlite3.SQLITE_CANTOPEN,
        sqlite3.SQLITE_PROTOCOL,
    }
)


def primary_code(exc: sqlite3.OperationalError) -> int | None:
    code = getattr(exc, "sqlite_errorcode", None)
    return None if code is None else int(code) & 0xFF


def raise_if_down(exc: sqlite3.OperationalError) -> None:
    """Raise ``Unavailable`` if ``exc`` means "the database is down"; return otherwise."""
    code = primary_code(exc)
    if code is None or code in _UNAVAILABLE_CODES:
        raise errors.Unavailable(f"the SQLite database is unavailable: {exc}") from exc


@contextmanager
def unavailable_when_down() -> Iterator[None]:
    try:
        yield
    except sqlite3.OperationalError as exc:
        raise_if_down(exc)
        raise
