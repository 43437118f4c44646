"""A MySQL URL, ``mysql://user:password@host:port/database[?unix_socket=/path]``, and a
blocking connect to it."""

from __future__ import annotations

import math
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import attrs
import MySQLdb

Connection = MySQLdb.Connection


@attrs.frozen
class MysqlUrl:
    """The parts of ``mysql://user:password@host:port/database[?unix_socket=/path]``."""

    host: str
    port: int
    user: str
    password: str
    database: str
    unix_socket: str | None = None

    @classmethod
    def parse(cls, url: str) -> MysqlUrl:
        parts = urlsplit(url)
        if parts.scheme != "mysql":
            raise ValueError(f"a MySQL URL starts with mysql://, got {url!r}")
        database = unquote(parts.path.lstrip("/"))
        if not database or "/" in database:
            raise ValueError(
                f"the MySQL URL must name one database: mysql://host/<database>, got {url!r}"
            )
        socket_paths = parse_qs(parts.query).get("unix_socket", [])
        return cls(
            host=parts.hostname or "127.0.0.1",
            port=parts.port or 3306,
            user=unquote(parts.username or ""),
            password=unquote(parts.password or ""),
            database=database,
            unix_socket=socket_paths[-1] if socket_paths else None,
        )

    def with_database(self, database: str) -> MysqlUrl:
        return attrs.evolve(self, database=database)

    def connect(
        self, *, connect_timeout_s: float, io_timeout_s: float, database: bool = True
    ) -> Connection:
        """A blocking connect in utf8mb4 and autocommit; raise ``MySQLdb.OperationalError``.

        ``io_timeout_s`` bounds each socket read and write (whole seconds, at least 1).
        """
        kwargs: dict[str, Any] = {
            "host": self.host,
            "port": self.port,
            "user": self.user,
            "password": self.password,
            "charset": "utf8mb4",
            "use_unicode": True,
            "autocommit": True,
            "connect_timeout": max(1, math.ceil(connect_timeout_s)),
            "read_timeout": max(1, math.ceil(io_timeout_s)),
            "write_timeout": max(1, math.ceil(io_timeout_s)),
        }
        if database:
            kwargs["database"] = self.database
        if self.unix_socket:
            kwargs["unix_socket"] = self.unix_socket
        return MySQLdb.connect(**kwargs)
