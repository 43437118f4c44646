"""The cluster set of backends: MySQL directory (cached in Redis), Redis bus, presence and
archive feed, Elasticsearch archive. Built here so ``app.py`` stays free of client libraries;
everything opened here is closed when the context exits."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager

from chatnode.adapters.elasticsearch import EsArchive
from chatnode.adapters.migrations import migrate
from chatnode.adapters.mysql import MysqlDirectory
from chatnode.adapters.redis.archive_feed import RedisArchiveFeed
from chatnode.adapters.redis.bus import RedisBus
from chatnode.adapters.redis.client import RespClient
from chatnode.adapters.redis.directory import RedisCachedDirectory
from chatnode.adapters.redis.presence import RedisPresence
from chatnode.adapters.redis.ratelimits import RedisRateLimits
from chatnode.adapters.redis.revocations import RedisRevocations
from chatnode.adapters.redis.tickets import RedisTickets
from chatnode.config import Config
from chatnode.node.service import Backends

__all__ = ["migrate", "open_cluster_backends"]


@asynccontextmanager
async def open_cluster_backends(config: Config, node_id: str) -> AsyncIterator[Backends]:
    async with AsyncExitStack() as stack:
        redis = RespClient.from_url(  # presence, directory cache, revocations, tickets
            config.redis_url,
            timeout_s=config.backend_timeout_s,
            client_name=f"chatnode:{node_id}",
        )
        stack.push_async_callback(redis.aclose)
        bus_client = RespClient.from_url(
            config.redis_url,
            timeout_s=config.backend_timeout_s,
            client_name=f"chatnode:{node_id}",
        )
        stack.push_async_callback(bus_client.aclose)
        feed_client = RespClient.from_url(
            config.redis_url,
            timeout_s=config.backend_timeout_s,
            client_name=f"chatnode:{node_id}:archiver",
        )
        stack.push_async_callback(feed_client.aclose)
        feed_reads = RespClient.from_url(  # its own: XREAD BLOCK holds a connection
            config.redis_url,
            timeout_s=config.backend_timeout_s,
            client_name=f"chatnode:{node_id}:archive-reads",
        )
        stack.push_async_callback(feed_reads.aclose)
        limits_client = RespClient.from_url(  # its own: a lease never waits behind the bus
            config.redis_url,
            timeout_s=config.backend_timeout_s,
            client_name=f"chatnode:{node_id}:limits",
        )
        stack.push_async_callback(limits_client.aclose)
        directory = MysqlDirectory.from_url(
            config.mysql_url,
            pool_size=config.mysql_pool_size,
            statement_timeout_s=config.backend_timeout_s,
        )
        stack.push_async_callback(directory.aclose)
        archive = EsArchive.from_url(
            config.elasticsearch_url,
            prefix=config.key_prefix,
            request_timeout_s=config.backend_timeout_s,
        )
        stack.push_async_callback(archive.aclose)
        yield Backends(
            directory=RedisCachedDirectory(
                directory,
                redis,
                config.key_prefix,
                ttl_s=config.cache_ttl_s,
                local_ttl_s=config.cache_local_ttl_s,
            ),
            bus=RedisBus(
                bus_client,
                config.key_prefix,
                room_log_length=config.room_log_length,
                dedup_window_s=config.dedup_window_s,
                settle_s=config.redis_settle_s,
                keep_bytes=config.unarchived_keep_bytes,
            ),
            archive=archive,
            presence=RedisPresence(redis, config.key_prefix),
            revocations=RedisRevocations(redis, config.key_prefix),
            tickets=RedisTickets(redis, config.key_prefix),
            feed=RedisArchiveFeed(
                feed_client,
                config.key_prefix,
                consumer=node_id,
                lease_ms=int(config.archive_claim_idle_s * 1000),
                reads=feed_reads,
            ),
            rate_limits=RedisRateLimits(limits_client, config.key_prefix),
        )
