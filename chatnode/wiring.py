"""The composition root of the backends: ``Config`` in, adapters built from plain values out.

Rules:

1. **The only place that picks and builds backends.** Adapters take plain values (URLs, sizes,
   timeouts, key prefixes) and never see ``Config``; this module reads ``Config`` and builds
   them: the embedded set (:func:`open_embedded_backends`: one SQLite file, in-process
   presence, tickets and rate limits) or the cluster set (:func:`open_cluster_backends`: MySQL
   directory cached in Redis, Redis bus, presence, archive feed, revocations, tickets, rate
   limits and push gate, Elasticsearch archive), each with the push webhook when
   ``CHATNODE_PUSH_URL`` is set, and the smaller sets the CLI's one-shot commands need
   (:func:`open_accounts`, :func:`open_archive`, :func:`migrate`). ``app.py`` builds the node
   and the edge on what :func:`open_backends` yields.
2. **Whoever opens closes.** Every function here is an async context manager (or, for
   :func:`migrate`, one call) that closes everything it opened when it exits, in reverse
   order; the adapters' own ``aclose()`` on a shared resource (the SQLite database, a Redis
   client) releases nothing.
3. **Shared resources are shared here.** The buses of one SQLite database get the same
   :class:`~chatnode.adapters.sqlite.LocalBroker` (its lock orders their deliveries); the
   database itself does not own it.
4. **Client libraries load only when used.** Each backend's modules are imported inside the
   function that builds it, so an embedded node needs none of the cluster extra.
"""

from __future__ import annotations

import logging
import os
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path

from chatnode import datadir
from chatnode.config import Config, ConfigError
from chatnode.core.ports import Archive, Directory, Revocations, Webhook
from chatnode.node.settings import Backends

log = logging.getLogger(__name__)

SQLITE_FILE = "chatnode.sqlite3"
"""The embedded node's database file, in ``CHATNODE_DATA_DIR``."""


@asynccontextmanager
async def open_backends(config: Config, node_id: str) -> AsyncIterator[Backends]:
    """The configured backends (``app.py``'s node runs on them), closed on exit."""
    if config.embedded:
        async with open_embedded_backends(config) as backends:
            yield backends
    else:
        async with open_cluster_backends(config, node_id) as backends:
            yield backends


@asynccontextmanager
async def open_embedded_backends(config: Config) -> AsyncIterator[Backends]:
    """One SQLite file (directory, bus, archive, revocations) in the data directory, created
    private if missing; presence, tickets and rate limits in memory."""
    from chatnode.adapters.memory import (
        MemoryPresence,
        MemoryPushGate,
        MemoryRateLimits,
        MemoryTickets,
    )
    from chatnode.adapters.sqlite import (
        LocalBroker,
        SqliteArchive,
        SqliteBus,
        SqliteDatabase,
        SqliteDirectory,
        SqliteRevocations,
    )

    open_data_dir(config)
    async with await SqliteDatabase.open(sqlite_path(config)) as db, open_webhook(config) as hook:
        yield Backends(
            directory=SqliteDirectory(db),
            bus=SqliteBus(db, LocalBroker(), dedup_window_s=config.dedup_window_s),
            archive=SqliteArchive(db),
            presence=MemoryPresence(),
            revocations=SqliteRevocations(db),
            tickets=MemoryTickets(),
            rate_limits=MemoryRateLimits(),
            push_gate=MemoryPushGate() if hook else None,
            webhook=hook,
        )


@asynccontextmanager
async def open_cluster_backends(config: Config, node_id: str) -> AsyncIterator[Backends]:
    """MySQL, Redis and Elasticsearch as ``config`` names them. Redis: five clients, each with
    a connection of its own: presence, revocations, tickets and the directory's cache share
    one; the bus has one (every call is on the per-message path); the archive feed has one for
    its commands and one for its blocking reads; the rate limits have one, so a lease never
    waits behind the bus."""
    from chatnode.adapters.elasticsearch import EsArchive
    from chatnode.adapters.mysql import MysqlDirectory
    from chatnode.adapters.redis import (
        RedisArchiveFeed,
        RedisBus,
        RedisCachedDirectory,
        RedisPresence,
        RedisPushGate,
        RedisRateLimits,
        RedisRevocations,
        RedisTickets,
        RespClient,
    )

    prefix, timeout_s = config.key_prefix, config.backend_timeout_s

    async with AsyncExitStack() as stack:

        def resp_client(name: str) -> RespClient:
            client = RespClient.from_url(config.redis_url, timeout_s=timeout_s, client_name=name)
            stack.push_async_callback(client.aclose)
            return client

        redis = resp_client(f"chatnode:{node_id}")
        bus_client = resp_client(f"chatnode:{node_id}")
        feed_client = resp_client(f"chatnode:{node_id}:archiver")
        feed_reads = resp_client(f"chatnode:{node_id}:archive-reads")
        limits_client = resp_client(f"chatnode:{node_id}:limits")
        directory = MysqlDirectory.from_url(
            config.mysql_url, pool_size=config.mysql_pool_size, statement_timeout_s=timeout_s
        )
        stack.push_async_callback(directory.aclose)
        archive = EsArchive.from_url(
            config.elasticsearch_url, prefix=prefix, request_timeout_s=timeout_s
        )
        stack.push_async_callback(archive.aclose)
        hook = await stack.enter_async_context(open_webhook(config))
        yield Backends(
            directory=RedisCachedDirectory(
                directory,
                redis,
                prefix,
                ttl_s=config.cache_ttl_s,
                local_ttl_s=config.cache_local_ttl_s,
            ),
            bus=RedisBus(
                bus_client,
                prefix,
                room_log_length=config.room_log_length,
                dedup_window_s=config.dedup_window_s,
                settle_s=config.redis_settle_s,
                keep_bytes=config.unarchived_keep_bytes,
            ),
            archive=archive,
            presence=RedisPresence(redis, prefix),
            revocations=RedisRevocations(redis, prefix),
            tickets=RedisTickets(redis, prefix),
            feed=RedisArchiveFeed(
                feed_client,
                prefix,
                consumer=node_id,
                lease_ms=int(config.archive_claim_idle_s * 1000),
                reads=feed_reads,
            ),
            rate_limits=RedisRateLimits(limits_client, prefix),
            push_gate=RedisPushGate(redis, prefix) if hook else None,
            webhook=hook,
        )


@asynccontextmanager
async def open_webhook(config: Config) -> AsyncIterator[Webhook | None]:
    """The push notifications' webhook (``CHATNODE_PUSH_URL``; requests time out after
    ``backend_timeout_s``), None when unset, closed on exit."""
    if not config.push_url:
        yield None
        return
    from chatnode.adapters.webhook import HttpWebhook

    hook = HttpWebhook(config.push_url, timeout_s=config.backend_timeout_s)
    try:
        yield hook
    finally:
        await hook.aclose()


def open_data_dir(config: Config) -> None:
    """The embedded node's data directory, created 0700 if missing, a warning if others may
    list it (``chatnode/datadir.py``); ``ConfigError`` if it cannot be made."""
    path = Path(config.data_dir)
    try:
        datadir.make_private_dir(path)
        datadir.warn_if_shared(path)
    except OSError as exc:
        raise ConfigError(f"CHATNODE_DATA_DIR={path}: {exc.strerror}") from None


def sqlite_path(config: Config) -> str:
    """The embedded node's database file."""
    return os.path.join(config.data_dir, SQLITE_FILE)


@asynccontextmanager
async def open_accounts(config: Config) -> AsyncIterator[tuple[Directory, Revocations]]:
    """The configured directory and revocation store alone (``chatnode users``), closed on
    exit: the embedded node's SQLite file (the node follows what is recorded there), or
    MySQL and Redis."""
    if config.embedded:
        from chatnode.adapters.sqlite import SqliteDatabase, SqliteDirectory, SqliteRevocations

        async with await SqliteDatabase.open(sqlite_path(config)) as db:
            yield SqliteDirectory(db), SqliteRevocations(db)
    else:
        from chatnode.adapters.mysql import MysqlDirectory
        from chatnode.adapters.redis import RedisRevocations, RespClient

        async with (
            RespClient.from_url(config.redis_url, timeout_s=config.backend_timeout_s) as redis,
            MysqlDirectory.from_url(
                config.mysql_url, pool_size=1, statement_timeout_s=config.backend_timeout_s
            ) as directory,
        ):
            yield directory, RedisRevocations(redis, config.key_prefix)


@asynccontextmanager
async def open_archive(config: Config) -> AsyncIterator[Archive]:
    """The configured archive alone (``chatnode dead-letters``), closed on exit."""
    if config.embedded:
        from chatnode.adapters.sqlite import SqliteArchive, SqliteDatabase

        async with await SqliteDatabase.open(sqlite_path(config)) as db:
            yield SqliteArchive(db)
    else:
        from chatnode.adapters.elasticsearch import EsArchive

        async with EsArchive.from_url(
            config.elasticsearch_url,
            prefix=config.key_prefix,
            request_timeout_s=config.backend_timeout_s,
        ) as archive:
            yield archive


async def migrate(config: Config) -> int:
    """``chatnode migrate``: bring the configured MySQL schema and Elasticsearch indices up to
    this chatnode's (``adapters/mysql/migrations.py``, ``adapters/elasticsearch/migrations.py``);
    the exit code.

    0 when everything is up to date (also in embedded mode, where SQLite migrates itself on
    open), 1 when a migration failed (the reason is logged).
    """
    if not (config.mysql_url or config.elasticsearch_url):
        log.info("embedded mode: SQLite migrates itself when a node opens it; nothing to do")
        return 0
    from chatnode.adapters.elasticsearch import dead_letters_index, messages_index
    from chatnode.adapters.elasticsearch.migrations import migrate_elasticsearch
    from chatnode.adapters.migration import MigrationError
    from chatnode.adapters.mysql.migrations import migrate_mysql, shipped_mysql_version
    from chatnode.core import errors

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
    except (errors.Unavailable, MigrationError, ValueError) as exc:
        log.error("migration failed: %s", exc)
        return 1
    return 0
