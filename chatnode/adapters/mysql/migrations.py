"""Schema migrations of the cluster backends: what ``chatnode migrate`` runs.

MySQL (:func:`migrate_mysql`): the files ``migrations/mysql/NNNN_name.sql`` run in version
order, each recorded in ``schema_migrations(version, name, checksum, applied_at)`` once all its
statements ran. Guarantees:

- **Idempotent.** A recorded version is never run again; running ``migrate`` twice is a no-op
  the second time. MySQL commits DDL implicitly, so a file interrupted half-way runs again
  from its first statement next time: every statement in a file is written to be repeatable
  (``CREATE TABLE IF NOT EXISTS`` ...).
- **Safe when nodes race.** The whole run holds the server lock ``GET_LOCK('chatnode.migrate.
  <database>')``: a second runner waits (up to ``lock_timeout_s``), then finds everything
  applied.
- **Creates the database** when the URL names one that does not exist (utf8mb4).
- A recorded migration whose file changed since is reported (a released file is never edited);
  it is not run again.

Elasticsearch (:func:`migrate_elasticsearch`): for each index of the archive -- the messages
(``migrations/elasticsearch/messages_template.json``, ``<prefix>-messages``) and the dead
letters (``dead_letters_template.json``, ``<prefix>-dead-letters``) -- puts the index template
for ``<index>*``, creates the index if missing (a concurrent creation counts as created),
applies the template's mappings to an existing index (new fields are added; a conflicting
change fails loudly) and waits until the index is usable. Every step is idempotent. The nodes
never create an index (its mapping would be dynamic): they wait for this.

Errors: an unreachable backend raises ``Unavailable``; :func:`migrate` turns every failure
into a log line and exit code 1.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from functools import cache, partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import attrs
import MySQLdb
import trio
from elasticsearch import ApiError, AsyncElasticsearch

from chatnode.adapters.elasticsearch import (
    dead_letters_index,
    es_client,
    es_errors,
    messages_index,
)
from chatnode.adapters.mysql import Connection, MysqlUrl, close_quietly, mysql_error
from chatnode.core import errors

if TYPE_CHECKING:
    from chatnode.config import Config

log = logging.getLogger(__name__)

MYSQL_DIR: Final = Path(__file__).resolve().parent / "schema"
ES_TEMPLATE: Final = (
    Path(__file__).resolve().parents[1] / "elasticsearch" / "schema" / "messages_template.json"
)
ES_DEAD_LETTERS_TEMPLATE: Final = ES_TEMPLATE.parent / "dead_letters_template.json"

_FILE_RE: Final = re.compile(r"(\d+)_([A-Za-z0-9_\-]+)\.sql")
_UNKNOWN_DATABASE: Final = 1049
_NO_SUCH_TABLE: Final = 1146
CONNECT_TIMEOUT_S: Final = 10.0
DDL_TIMEOUT_S: Final = 3600.0  # a long ALTER TABLE must not trip the client's read timeout
ES_TIMEOUT_S: Final = 30.0  # one request, and the wait for the new index to be allocated


class MigrationError(Exception):
    """A migration cannot run: bad files, a lock held too long, a conflicting mapping."""


# --- MySQL --------------------------------------------------------------------------------------


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


def mysql_migrations(directory: Path = MYSQL_DIR) -> tuple[SqlMigration, ...]:
    """The migrations in ``directory``, by version; raise ``MigrationError`` on a bad name or
    a version used twice."""
    found: dict[int, SqlMigration] = {}
    for path in sorted(directory.glob("*.sql")):
        match = _FILE_RE.fullmatch(path.name)
        if match is None:
            raise MigrationError(f"{path}: a migration file is named NNNN_name.sql")
        version = int(match.group(1))
        if version in found:
            raise MigrationError(f"{path}: version {version} is used by two files")
        text = path.read_text(encoding="utf-8")
        found[version] = SqlMigration(
            version,
            path.stem,
            tuple(split_sql(text)),
            hashlib.sha256(text.encode()).hexdigest(),
        )
    return tuple(found[v] for v in sorted(found))


@cache
def shipped_mysql_version() -> int:
    """The newest schema version in this chatnode's own ``migrations/mysql`` (read once)."""
    return max((m.version for m in mysql_migrations(MYSQL_DIR)), default=0)


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
    url: str, *, directory: Path = MYSQL_DIR, lock_timeout_s: float = 60.0
) -> list[int]:
    """Apply the migrations of ``directory`` not yet applied to ``url``'s database; return
    their versions (``[]`` when up to date). See the module guarantees.

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
            raise
        raise mapped from exc


# --- Elasticsearch ------------------------------------------------------------------------------


def messages_template(prefix: str, path: Path = ES_TEMPLATE) -> dict[str, Any]:
    """The index template body for ``prefix`` (``${prefix}`` in its patterns substituted)."""
    messages_index(prefix)  # validates the prefix
    body: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    body["index_patterns"] = [p.replace("${prefix}", prefix) for p in body["index_patterns"]]
    return body


def dead_letters_template(prefix: str) -> dict[str, Any]:
    """The dead letters' index template body for ``prefix``."""
    return messages_template(prefix, ES_DEAD_LETTERS_TEMPLATE)


async def migrate_elasticsearch(url: str, prefix: str) -> bool:
    """Put the templates and create the indices if missing; return True if this call created
    the messages index. See the module guarantees."""
    es = es_client(url, request_timeout_s=ES_TIMEOUT_S)
    try:
        created = await _migrate_index(es, messages_index(prefix), messages_template(prefix))
        await _migrate_index(es, dead_letters_index(prefix), dead_letters_template(prefix))
        return created
    finally:
        with trio.CancelScope(shield=True):
            await es.close()


async def _migrate_index(es: AsyncElasticsearch, index: str, template: dict[str, Any]) -> bool:
    """Put ``index``'s template, create it or update its mapping; whether this call created it."""
    with es_errors("put the index template"):
        await es.indices.put_index_template(name=index, body=template)
    created = True
    try:
        with es_errors(f"create the index {index}"):
            await es.indices.create(index=index)
    except ApiError as exc:
        if exc.error != "resource_already_exists_exception":
            raise
        created = False
    if created:
        log.info("created the Elasticsearch index %s", index)
    else:
        try:
            with es_errors(f"update the mapping of {index}"):
                await es.indices.put_mapping(index=index, body=template["template"]["mappings"])
        except ApiError as exc:
            raise MigrationError(
                f"the index {index} has a mapping chatnode cannot update in place: {exc}"
            ) from exc
    with es_errors(f"wait for the index {index}"):
        await es.cluster.health(
            index=index, wait_for_status="yellow", timeout=f"{int(ES_TIMEOUT_S)}s"
        )
    return created


# --- chatnode migrate ---------------------------------------------------------------------------


async def migrate(config: Config) -> int:
    """``chatnode migrate``: migrate the configured MySQL and Elasticsearch; the exit code.

    0 when everything is up to date (also in embedded mode, where SQLite migrates itself on
    open), 1 when a migration failed (the reason is logged).
    """
    if not (config.mysql_url or config.elasticsearch_url):
        log.info("embedded mode: SQLite migrates itself when a node opens it; nothing to do")
        return 0
    try:
        if config.mysql_url:
            applied = await migrate_mysql(config.mysql_url)
            log.info(
                "MySQL schema at version %s (%s)",
                shipped_mysql_version(),
                f"applied {applied}" if applied else "already up to date",
            )
        if config.elasticsearch_url:
            created = await migrate_elasticsearch(config.elasticsearch_url, config.key_prefix)
            log.info(
                "Elasticsearch index %s %s; dead letters in %s",
                messages_index(config.key_prefix),
                "created" if created else "already present (template and mapping updated)",
                dead_letters_index(config.key_prefix),
            )
    except (errors.Unavailable, MigrationError, ValueError, MySQLdb.Error, ApiError) as exc:
        log.error("migration failed: %s", exc)
        return 1
    return 0
