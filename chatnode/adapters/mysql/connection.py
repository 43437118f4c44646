"""One MySQL connection's session: its server-side bounds, a transaction, a quiet close."""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from typing import Any

import MySQLdb

from chatnode.adapters.mysql.url import Connection


def server_is_mariadb(conn: Connection) -> bool:
    cursor = conn.cursor()
    cursor.execute("SELECT VERSION()")
    (version,) = cursor.fetchone()
    return "mariadb" in str(version).lower()


def bound_session(conn: Connection, statement_timeout_s: float) -> bool:
    """Set this session's server-side bounds (``pool.py`` rule 2); return True on MariaDB.

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
