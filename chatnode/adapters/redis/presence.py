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

from chatnode.core import ports
from chatnode.core.models import PresenceEntry

from .client import RespClient, Script

# KEYS: room hash, node entries, nodes. ARGV: entry, user, member, node id.
_ADD: Final = Script("""#!lua
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('SADD', KEYS[2], ARGV[3])
redis.call('SADD', KEYS[3], ARGV[4])
return 1
""")

# KEYS: room hash, node entries. ARGV: entry, member.
_REMOVE: Final = Script("""#!lua
redis.call('SREM', KEYS[2], ARGV[2])
return redis.call('HDEL', KEYS[1], ARGV[1])
""")

# KEYS: heartbeat, nodes. ARGV: ttl ms, node id.
_HEARTBEAT: Final = Script("""#!lua
redis.call('SET', KEYS[1], '1', 'PX', ARGV[1])
redis.call('SADD', KEYS[2], ARGV[2])
return 1
""")

# KEYS: heartbeat, node entries, nodes. ARGV: node id, room hash key prefix.
_REAP_NODE: Final = Script("""#!lua
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
""")


@attrs.define(eq=False)
class RedisPresence:
    """``ports.Presence`` in Redis (layout and rules in the module docstring). Redis failures
    raise ``Unavailable``.

    The client belongs to the caller: ``aclose`` does not close it.
    """

    _redis: RespClient
    prefix: str

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
        await self._redis.call("PING")

    async def aclose(self) -> None:
        await trio.lowlevel.checkpoint()

    async def add(self, entry: PresenceEntry) -> None:
        field = self._entry_field(entry)
        await _ADD.run(
            self._redis,
            [self._room_key(entry.room_id), self._entries_key(entry.node_id), self._nodes_key],
            [field, entry.user, f"{entry.room_id} {field}", entry.node_id],
        )

    async def remove(self, entry: PresenceEntry) -> None:
        field = self._entry_field(entry)
        await _REMOVE.run(
            self._redis,
            [self._room_key(entry.room_id), self._entries_key(entry.node_id)],
            [field, f"{entry.room_id} {field}"],
        )

    async def online(self, room_id: int) -> list[str]:
        users = await self._redis.call("HVALS", self._room_key(room_id))
        if not isinstance(users, list):
            raise TypeError(f"HVALS returned {users!r:.200}")
        return sorted({user.decode() for user in users if isinstance(user, bytes)})

    async def heartbeat(self, node_id: str, *, ttl_ms: int) -> None:
        await _HEARTBEAT.run(
            self._redis, [self._alive_key(node_id), self._nodes_key], [ttl_ms, node_id]
        )

    async def reap(self) -> int:
        nodes = await self._redis.call("SMEMBERS", self._nodes_key)
        if not isinstance(nodes, list):
            raise TypeError(f"SMEMBERS returned {nodes!r:.200}")
        removed = 0
        for raw in nodes:
            if not isinstance(raw, bytes):
                raise TypeError(f"SMEMBERS returned {nodes!r:.200}")
            node_id = raw.decode()
            count = await _REAP_NODE.run(
                self._redis,
                [self._alive_key(node_id), self._entries_key(node_id), self._nodes_key],
                [node_id, self._room_key_prefix],
            )
            if not isinstance(count, int):
                raise TypeError(f"the reap script returned {count!r:.200}")
            removed += count
        return removed


if TYPE_CHECKING:  # mypy proves the adapter implements its port

    def _implements_port(redis: RespClient) -> ports.Presence:
        return RedisPresence(redis, "p")
