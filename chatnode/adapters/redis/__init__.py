"""The Redis backend of a chatnode cluster: bus, archive feed, presence, directory cache.

Everything a node keeps in Redis, under one key prefix ``P`` (``Config.key_prefix``)::

    P:room:{id}:offset                    string   newest offset of the room     (redis_bus)
    P:room:{id}:log                       stream   recent room log, ids <offset>-0
    P:room:{id}:sent:{user}:{client id}   string   a recent send's offset (retries)
    P:incarnation                         string   when this Redis began holding our data
    P:room:{id}                           channel  live room traffic and signals
    P:archive                             stream   messages waiting for the archive
    P:archive:lease                       string   the node reading it (redis_archive_feed)
    P:presence:room:{id}                  hash     live connections of a room    (redis_presence)
    P:presence:node:{node}:entries        set      a node's presence entries
    P:presence:node:{node}:alive          string   a node's heartbeat (PX ttl)
    P:presence:nodes                      set      nodes with entries or heartbeats
    P:dir:...                             strings  cached rooms pages, member lists and rooms,
                                          sets     confirmed memberships, and their version
                                                   tokens                 (redis_directory)
    P:revoked:users_deleted_at            string   when every user was last deleted
    P:revoked:account:{id}                string   an account's tokens revoked up to then
    P:revoked:token:{id}                  string   a revoked token (PXAT its expiry)
    P:revoked:changes                     stream   every revocation, in order
                                                                          (redis_revocations)
    P:ticket:{ticket}                     string   a WebSocket ticket's token (PX 30 s)
    P:tickets:account:{id}                string   tickets issued to an account  (redis_tickets)
    P:rate:{kind}:{key}                   string   a rate limit's bucket, PX until full
                                                                          (redis_ratelimits)

One module per concern, each with its rules in its docstring:

- :mod:`.redis_connection`: :func:`open_redis`, the client every port shares (entered by the
  composition root), and the mapping of Redis failures to ``Unavailable``;
- :mod:`.resp`: :class:`RespClient`, a lean pipelined RESP2 client (hiredis parser) for the
  bus, whose every call is on the per-message path;
- :mod:`.redis_bus`: :class:`RedisBus` (``ports.Bus``);
- :mod:`.redis_archive_feed`: :class:`RedisArchiveFeed` (``ports.ArchiveFeed``);
- :mod:`.redis_presence`: :class:`RedisPresence` (``ports.Presence``);
- :mod:`.redis_directory`: :class:`RedisCachedDirectory`, a ``ports.Directory`` caching another;
- :mod:`.redis_revocations`: :class:`RedisRevocations` (``ports.Revocations``);
- :mod:`.redis_tickets`: :class:`RedisTickets` (``ports.Tickets``);
- :mod:`.redis_ratelimits`: :class:`RedisRateLimits` (``ports.RateLimits``), on a
  :class:`RespClient` of its own.

Requires Redis >= 7.0 (scripts declare ``#!lua``) on one address (a primary that moves must
end the nodes' connections), not Redis Cluster (scripts compute key names). Run it with
``appendonly yes``, ``appendfsync always``, ``maxmemory-policy noeviction``: room offsets and
messages not yet archived live there (what a Redis that loses data costs: ``redis_bus``
rules 6-7).

Wiring, in ``cluster.py``::

    async with open_redis(config.redis_url, timeout_s=config.backend_timeout_s) as redis:
        bus_client = RespClient.from_url(config.redis_url, timeout_s=config.backend_timeout_s)
        bus = RedisBus(bus_client, config.key_prefix, room_log_length=config.room_log_length)
        feed_client = RespClient.from_url(config.redis_url)
        feed_reads = RespClient.from_url(config.redis_url)  # its own: XREAD BLOCK
        feed = RedisArchiveFeed(
            feed_client, config.key_prefix, consumer=node_id,
            lease_ms=int(config.archive_claim_idle_s * 1000), reads=feed_reads,
        )
        presence = RedisPresence(redis, config.key_prefix)
        directory = RedisCachedDirectory(mysql_directory, redis, config.key_prefix,
                                         ttl_s=config.cache_ttl_s)
        revocations = RedisRevocations(redis, config.key_prefix)
        tickets = RedisTickets(redis, config.key_prefix)
"""

from __future__ import annotations

from .archive_feed import RedisArchiveFeed
from .bus import RedisBus
from .client import RespClient
from .connection import RedisClient, open_redis, redis_failures
from .directory import RedisCachedDirectory
from .presence import RedisPresence
from .ratelimits import RedisRateLimits
from .revocations import RedisRevocations
from .tickets import RedisTickets

__all__ = [
    "RedisArchiveFeed",
    "RedisBus",
    "RedisCachedDirectory",
    "RedisClient",
    "RedisPresence",
    "RedisRateLimits",
    "RedisRevocations",
    "RedisTickets",
    "RespClient",
    "open_redis",
    "redis_failures",
]
