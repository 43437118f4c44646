"""Who is connected where, in Redis: :class:`RedisPresence` (``ports.Presence``).

Keys (``P`` is the deployment's key prefix)::

    P:presence:room:{id}             hash    entry -> user, one field per live connection
    P:presence:node:{node}:entries   set     "{room id} {entry}" of every entry the node added
    P:presence:node:{node}:alive     string  the node's heartbeat, expiring after its TTL (PX)
    P:presence:nodes                 set     every node that added an entry or heartbeated

``entry`` is the JSON array ``[node_id, conn_id, user]``: an entry is identified by all its
fields, as in :class:`~chatnode.adapters.memory.MemoryPresence`, whose rules this follows:

- adding an entry twice adds it once; removing an unknown one is harmless;
- ``online`` counts every entry not yet reaped, whether its node is alive or not;
- ``reap`` removes every entry of a node whose heartbeat key is gone (expired, or never set),
  together with the node's bookkeeping; a later ``heartbeat`` brings the node back, empty.

Each of add, remove, heartbeat and the reaping of one node is one Lua script, so no reader
ever sees an entry in a room hash but not in its node's set, or the reverse. ``reap`` looks at
the nodes one script at a time: a node whose heartbeat is renewed before its turn is kept.

The scripts touch keys they compute (room hashes), so this assumes one Redis, not a Cluster.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Final

import attrs
import trio
from coredis.commands.script import Script

from chatnode.core import ports
from chatnode.core.models import PresenceEntry

from .connection import RedisClient, int_reply, redis_failures

# KEYS: room hash, node entries, nodes. ARGV: entry, user, member, node id.
_ADD_LUA: Final = """#!lua
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('SADD', KEYS[2], ARGV[3])
redis.call('SADD', KEYS[3], ARGV[4])
return 1
"""

# KEYS: room hash, node entries. ARGV: entry, member.
_REMOVE_LUA: Final = """#!lua
redis.call('SREM', KEYS[2], ARGV[2])
return redis.call('HDEL', KEYS[1], ARGV[1])
"""

# KEYS: heartbeat, nodes. ARGV: ttl ms, node id.
_HEARTBEAT_LUA: Final = """#!lua
redis.call('SET', KEYS[1], '1', 'PX', ARGV[1])
redis.call('SADD', KEYS[2], ARGV[2])
return 1
"""

# KEYS: heartbeat, node entries, nodes. ARGV: node id, room hash key prefix.
_REAP_NODE_LUA: Final = """#!lua
if redis.call('EXISTS', KEYS[1]) == 1 then
  return 0
end
local removed = 0
for _, member in ipairs(redis.call('SMEMBERS', KEYS[2])) do
  local room, entry = string.match(member, '^(%d+) (.*)$')
  if room then
    removed = removed + redis.call('HDEL', ARGV[2] .. room, entry)
  end
end
redis.call('DEL', KEYS[2])
redis.call('SREM', KEYS[3], ARGV[1])
return removed
"""


@attrs.define(eq=False)
class RedisPresence:
    """``ports.Presence`` in Redis (layout and rules in the module docstring).

    The client belongs to the caller: ``aclose`` does not close it.
    """

    _redis: RedisClient
    prefix: str
    _add: Script[bytes] = attrs.field(init=False)
    _remove: Script[bytes] = attrs.field(init=False)
    _heartbeat: Script[bytes] = attrs.field(init=False)
    _reap_node: Script[bytes] = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        self._add = self._redis.register_script(_ADD_LUA)
        self._remove = self._redis.register_script(_REMOVE_LUA)
        self._heartbeat = self._redis.register_script(_HEARTBEAT_LUA)
        self._reap_node = self._redis.register_script(_REAP_NODE_LUA)

    # -- keys ---------------------------------------------------------------------------------

    def _room_key(self, room_id: int) -> str:
        return f"{self._room_key_prefix}{room_id}"

    @property
    def _room_key_prefix(self) -> str:
        return f"{self.prefix}:presence:room:"

    def _entries_key(self, node_id: str) -> str:
        return f"{self.prefix}:presence:node:{node_id}:entries"

    def _alive_key(self, node_id: str) -> str:
        return f"{self.prefix}:presence:node:{node_id}:alive"

    @property
    def _nodes_key(self) -> str:
        return f"{self.prefix}:presence:nodes"

    @staticmethod
    def _entry_field(entry: PresenceEntry) -> str:
        return json.dumps([entry.node_id, entry.conn_id, entry.user], ensure_ascii=False)

    # -- ports.Presence -----------------------------------------------------------------------

    async def check(self) -> None:
        with redis_failures("PING"):
            await self._redis.ping()

    async def aclose(self) -> None:
        await trio.lowlevel.checkpoint()

    async def add(self, entry: PresenceEntry) -> None:
        field = self._entry_field(entry)
        with redis_failures("presence add"):
            await self._add(
                keys=[
                    self._room_key(entry.room_id),
                    self._entries_key(entry.node_id),
                    self._nodes_key,
                ],
                args=[field, entry.user, f"{entry.room_id} {field}", entry.node_id],
                callback=int_reply,
            )

    async def remove(self, entry: PresenceEntry) -> None:
        field = self._entry_field(entry)
        with redis_failures("presence remove"):
            await self._remove(
                keys=[self._room_key(entry.room_id), self._entries_key(entry.node_id)],
                args=[field, f"{entry.room_id} {field}"],
                callback=int_reply,
            )

    async def online(self, room_id: int) -> list[str]:
        with redis_failures("presence online"):
            users = await self._redis.hvals(self._room_key(room_id))
        return sorted({user.decode() for user in users})

    async def heartbeat(self, node_id: str, *, ttl_ms: int) -> None:
        with redis_failures("presence heartbeat"):
            await self._heartbeat(
                keys=[self._alive_key(node_id), self._nodes_key],
                args=[ttl_ms, node_id],
                callback=int_reply,
            )

    async def reap(self) -> int:
        removed = 0
        with redis_failures("presence reap"):
            for raw in await self._redis.smembers(self._nodes_key):
                node_id = raw.decode()
                removed += await self._reap_node(
                    keys=[self._alive_key(node_id), self._entries_key(node_id), self._nodes_key],
                    args=[node_id, self._room_key_prefix],
                    callback=int_reply,
                )
        return removed


if TYPE_CHECKING:  # mypy proves the adapter implements its port

    def _implements_port(redis: RedisClient) -> ports.Presence:
        return RedisPresence(redis, "p")
