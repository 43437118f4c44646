"""The MySQL schema: the files of ``schema/`` (package data) and applying them.

The files ``schema/NNNN_name.sql`` run in version order, each recorded in
``schema_migrations(version, name, checksum, applied_at)`` once all its statements ran. They
are read with ``importlib.resources``: an installed wheel carries them. Rules:

1. **Idempotent.** A recorded version is never run again; migrating twice is a no-op the
   second time. MySQL commits DDL implicitly, so a file interrupted half-way runs again from
   its first statement next time: every statement in a file is written to be repeatable
   (``CREATE TABLE IF NOT EXISTS`` ...).
2. **Safe when nodes race.** The whole run holds the server lock ``GET_LOCK('chatnode.migrate.
   <database>')``: a second runner waits (up to ``lock_timeout_s``), then finds everything
   applied.
3. **Creates the database** when the URL names one that does not exist (utf8mb4).
4. A recorded migration whose file changed since is reported (a released file is never
   edited); it is not run again.
5. **The directory checks the version**: ``MysqlDirectory.check`` compares
   :func:`read_mysql_version` with :func:`shipped_mysql_version`, so a node never runs on a
   schema older than its own.

Errors: an unreachable server raises ``Unavailable``; bad files, a lock held too long, a
statement MySQL refuses raise :class:`~chatnode.adapters.migration.MigrationError`.
"""

from __future__ import annotations

import hashlib
import logging
import re
from functools import cache, partial
from importlib import resources
from importlib.resources.abc import Traversable
from typing import Final

import attrs
import MySQLdb
import trio

from chatnode.adapters.migration import MigrationError
from chatnode.adapters.mysql.connection import close_quietly
from chatnode.adapters.mysql.errors import mysql_error
from chatnode.adapters.mysql.url import Connection, MysqlUrl

log = logging.getLogger(__name__)

SCHEMA_DIR: Final[Traversable] = resources.files("chatnode.adapters.mysql") / "schema"
"""The shipped migration files (package data)."""

_FILE_RE: Final = re.compile(r"(\d+)_([A-Za-z0-9_\-]+)\.sql")
_UNKNOWN_DATABASE: Final = 1049
_NO_SUCH_TABLE: Final = 1146
CONNECT_TIMEOUT_S: Final = 10.0
DDL_TIMEOUT_S: Final = 3600.0  # a long ALTER TABLE must not trip the client's read timeout


@attrs.frozen
class SqlMigration:
    version: int
    name: str
    statements: tuple[str, ...]
    checksum: str


def split_sql(text: str) -> list[str]:
    """The statements of a migration file: ``--`` comment lines dropped, split at a ``;``
    ending a line."""
    lines = [line for line in text.splitlines() if not line.lstrip().startswith("--")]
    body = "\n".join(lines)
    return [part.strip() for part in re.split(r";[ \t]*$", body, flags=re.M) if part.strip()]


def mysql_migrations(directory: Traversable = SCHEMA_DIR) -> tuple[SqlMigration, ...]:
    """The migrations in ``directory``, by version; raise ``MigrationError`` on a bad name or
    a version used twice."""
    found: dict[int, SqlMigration] = {}
    files = (entry for entry in directory.iterdir() if entry.name.endswith(".sql"))
    for path in sorted(files, key=lambda entry: entry.name):
        match = _FILE_RE.fullmatch(path.name)
        if match is None:
            raise MigrationError(f"{path}: a migration file is named NNNN_name.sql")
        version = int(match.group(1))
        if version in found:
            raise MigrationError(f"{path}: version {version} is used by two files")
        text = path.read_text(encoding="utf-8")
        found[version] = SqlMigration(
            version,
            path.name.removesuffix(".sql"),
            tuple(split_sql(text)),
            hashlib.sha256(text.encode()).hexdigest(),
        )
    return tuple(found[v] for v in sorted(found))


@cache
def shipped_mysql_version() -> int:
    """The newest schema version in this chatnode's own ``schema/`` (read once)."""
    return max((m.version for m in mysql_migrations(SCHEMA_DIR)), default=0)


def read_mysql_version(conn: Connection) -> int:
    """The newest applied version, 0 for a database never migrated."""
    cursor = conn.cursor()
    try:
        cursor.execute("SELECT COALESCE(MAX(version), 0) FROM schema_migrations")
    except MySQLdb.ProgrammingError as exc:
        if exc.args and exc.args[0] == _NO_SUCH_TABLE:
            return 0
        raise
    (version,) = cursor.fetchone()
    return int(version)


def _lock_name(database: str) -> str:
    return f"chatnode.migrate.{database}"[:64]


def _connect_or_create(url: MysqlUrl) -> Connection:
    try:
        return url.connect(connect_timeout_s=CONNECT_TIMEOUT_S, io_timeout_s=DDL_TIMEOUT_S)
    except MySQLdb.OperationalError as exc:
        if not exc.args or exc.args[0] != _UNKNOWN_DATABASE:
            raise
    log.info("creating the MySQL database %s", url.database)
    conn = url.connect(
        connect_timeout_s=CONNECT_TIMEOUT_S, io_timeout_s=DDL_TIMEOUT_S, database=False
    )
    try:
        quoted = url.database.replace("`", "``")
        conn.cursor().execute(
            f"CREATE DATABASE IF NOT EXISTS `{quoted}` CHARACTER SET utf8mb4 COLLATE utf8mb4_bin"
        )
    finally:
        close_quietly(conn)
    return url.connect(connect_timeout_s=CONNECT_TIMEOUT_S, io_timeout_s=DDL_TIMEOUT_S)


def _migrate_mysql_blocking(
    url: MysqlUrl, migrations: tuple[SqlMigration, ...], lock_timeout_s: float
) -> list[int]:
    conn = _connect_or_create(url)
    try:
        cursor = conn.cursor()
        lock = _lock_name(url.database)
        cursor.execute("SELECT GET_LOCK(%s, %s)", (lock, lock_timeout_s))
        (got,) = cursor.fetchone()
        if got != 1:
            raise MigrationError(
                f"another `chatnode migrate` held the lock {lock!r} for {lock_timeout_s} s; "
                "try again when it finished"
            )
        try:
            return _apply(conn, migrations)
        finally:
            cursor.execute("SELECT RELEASE_LOCK(%s)", (lock,))
            cursor.fetchall()
    finally:
        close_quietly(conn)


def _apply(conn: Connection, migrations: tuple[SqlMigration, ...]) -> list[int]:
    cursor = conn.cursor()
    cursor.execute(
        "CREATE TABLE IF NOT EXISTS schema_migrations ("
        " version INT NOT NULL PRIMARY KEY,"
        " name VARCHAR(255) NOT NULL,"
        " checksum CHAR(64) NOT NULL,"
        " applied_at DATETIME(3) NOT NULL DEFAULT CURRENT_TIMESTAMP(3)"
        ") ENGINE = InnoDB DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_bin"
    )
    cursor.execute("SELECT version, checksum FROM schema_migrations")
    applied = {int(version): checksum for version, checksum in cursor.fetchall()}
    done: list[int] = []
    for migration in migrations:
        if migration.version in applied:
            if applied[migration.version] != migration.checksum:
                log.warning(
                    "migration %s changed after it was applied; released migrations must "
                    "not be edited (it is not run again)",
                    migration.name,
                )
            continue
        log.info("applying MySQL migration %s", migration.name)
        for statement in migration.statements:
            cursor.execute(statement)
        cursor.execute(
            "INSERT INTO schema_migrations (version, name, checksum) VALUES (%s, %s, %s)",
            (migration.version, migration.name, migration.checksum),
        )
        done.append(migration.version)
    newest = max(applied, default=0)
    known = max((m.version for m in migrations), default=0)
    if newest > known:
        log.warning(
            "the MySQL schema is at version %s, newer than this chatnode's %s", newest, known
        )
    return done


async def migrate_mysql(
    url: str, *, directory: Traversable = SCHEMA_DIR, lock_timeout_s: float = 60.0
) -> list[int]:
    """Apply the migrations of ``directory`` not yet applied to ``url``'s database; return
    their versions (``[]`` when up to date). See the module rules.

    It runs in one worker thread that a cancellation does not stop (DDL cannot be abandoned
    half-way anyway); ``lock_timeout_s`` is the server-side bound on waiting for another
    runner's lock.
    """
    parsed = MysqlUrl.parse(url)
    migrations = mysql_migrations(directory)
    run = partial(_migrate_mysql_blocking, parsed, migrations, lock_timeout_s)
    try:
        return await trio.to_thread.run_sync(run)
    except MySQLdb.Error as exc:
        mapped = mysql_error(exc)
        if mapped is None:
            raise MigrationError(f"MySQL refused a migration: {exc}") from exc
        raise mapped from exc
