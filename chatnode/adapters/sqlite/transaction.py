"""``with Transaction(conn):`` one write transaction on a SQLite connection."""

from __future__ import annotations

import sqlite3


class Transaction:
    """``with Transaction(conn):`` a write transaction; the write lock is taken at BEGIN, so
    reads inside it are current. A class rather than ``@contextmanager``: it is on the path of
    every message."""

    __slots__ = ("_conn",)

    def __init__(self, conn: sqlite3.Connection) -> None:
        self._conn = conn

    def __enter__(self) -> None:
        self._conn.execute("BEGIN IMMEDIATE")

    def __exit__(self, exc_type: type[BaseException] | None, *_: object) -> None:
        if exc_type is None:
            try:
                self._conn.execute("COMMIT")
                return
            except BaseException:
                self._rollback()
                raise
        self._rollback()

    def _rollback(self) -> None:
        if self._conn.in_transaction:
            self._conn.execute("ROLLBACK")
