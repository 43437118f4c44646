"""The Redis backend of a chatnode cluster: bus, archive feed, presence, directory cache,
revocations, tickets, rate limits, all on one client (:mod:`.client`).

Everything a node keeps in Redis, under one key prefix ``P`` (the deployment's)::

    P:room:{id}:offset                    string   newest offset of the room           (bus)
    P:room:{id}:log                       stream   recent room log, ids <offset>-0
    P:room:{id}:sent:{user}:{client id}   string   a recent send's offset (retries)
    P:incarnation                         string   when this Redis began holding our data
    P:room:{id}                           channel  live room traffic and signals
    P:archive                             stream   messages waiting for the archive
    P:archive:lease                       string   the node reading it        (archive_feed)
    P:presence:room:{id}                  hash     live connections of a room     (presence)
    P:presence:node:{node}:entries        set      a node's presence entries
    P:presence:node:{node}:alive          string   a node's heartbeat (PX ttl)
    P:presence:nodes                      set      nodes with entries or heartbeats
    P:presence:user:{name}                set      a user's live presence entries
    P:presence:last_seen                  hash     user -> last seen (epoch ms)
    P:dir:...                             strings  cached rooms pages, member lists and rooms,
                                          sets     confirmed memberships, and their version
                                                   tokens                        (directory)
    P:revoked:users_deleted_at            string   when every user was last deleted
    P:revoked:account:{id}                string   an account's tokens revoked up to then
    P:revoked:token:{id}                  string   a revoked token (PXAT its expiry)
    P:revoked:changes                     stream   every revocation, in order  (revocations)
    P:ticket:{ticket}                     string   a WebSocket ticket's token (PX 30 s)
    P:tickets:account:{id}                string   tickets issued to an account    (tickets)
    P:rate:{kind}:{key}                   string   a rate limit's bucket, PX until full
                                                                                (ratelimits)
    P:push:{room}:{user}                  string   a push notification window's holder
    P:push:{room}:{user}:next             hash     the note it holds back      (push_gate)

One module per job, each with its rules in its docstring:

- :mod:`.client`: :class:`RespClient`, connections, pipelining, pub/sub connections, scripts,
  and the one table of what a Redis failure means (``Unavailable``); the bytes are
  :mod:`chatnode.wire.resp`'s;
- :mod:`.bus`: :class:`RedisBus` (``ports.Bus``), its keys and scripts in :mod:`.bus_keys`,
  a pub/sub connection and its acknowledgements in :mod:`.subscriptions`;
- :mod:`.archive_feed`: :class:`RedisArchiveFeed` (``ports.ArchiveFeed``);
- :mod:`.presence`: :class:`RedisPresence` (``ports.Presence``);
- :mod:`.directory`: :class:`RedisCachedDirectory`, a ``ports.Directory`` caching another
  (its scripts and rows in :mod:`.directory_store`, its node-local layer in
  :mod:`.local_cache`);
- :mod:`.revocations`: :class:`RedisRevocations` (``ports.Revocations``);
- :mod:`.tickets`: :class:`RedisTickets` (``ports.Tickets``);
- :mod:`.ratelimits`: :class:`RedisRateLimits` (``ports.RateLimits``);
- :mod:`.push_gate`: :class:`RedisPushGate` (``ports.PushGate``).

Every port takes a :class:`RespClient` and a key prefix; the client is the caller's (it is
closed by whoever made it). A client runs its commands on one pipelined connection, so the
composition root gives a port that must not wait behind another's commands a client of its
own: the bus (the per-message path), the archive feed (and its blocking reads, another),
the rate limits; presence, the directory cache, revocations and tickets share one.

Requires Redis >= 7.0 (scripts declare ``#!lua``) on one address (a primary that moves must
end the nodes' connections), not Redis Cluster (scripts compute key names). Run it with
``appendonly yes``, ``appendfsync always``, ``maxmemory-policy noeviction``: room offsets and
messages not yet archived live there (what a Redis that loses data costs: :mod:`.bus`
rules 6-7).
"""

from __future__ import annotations

from .archive_feed import RedisArchiveFeed
from .bus import RedisBus
from .client import RedisAddress, RespClient
from .directory import RedisCachedDirectory
from .presence import RedisPresence
from .push_gate import RedisPushGate
from .ratelimits import RedisRateLimits
from .revocations import RedisRevocations
from .tickets import RedisTickets

__all__ = [
    "RedisAddress",
    "RedisArchiveFeed",
    "RedisBus",
    "RedisCachedDirectory",
    "RedisPresence",
    "RedisPushGate",
    "RedisRateLimits",
    "RedisRevocations",
    "RedisTickets",
    "RespClient",
]
