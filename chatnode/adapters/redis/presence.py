"""Who is connected where, in Redis: :class:`RedisPresence` (``ports.Presence``).

Keys (``P`` is the deployment's key prefix)::

    P:presence:room:{id}             hash    entry -> user, one field per live connection
    P:presence:node:{node}:entries   set     "{room id} {entry}" of every entry the node added
    P:presence:node:{node}:alive     string  the node's heartbeat, expiring after its TTL (PX)
    P:presence:nodes                 set     every node that added an entry or heartbeated
    P:presence:user:{name}           set     "{room id} {entry}" of every live entry of the user
    P:presence:last_seen             hash    user -> epoch ms of their latest connect/disconnect

``entry`` is the JSON array ``[node_id, conn_id, user]``: an entry is identified by all its
fields, as in :class:`~chatnode.adapters.memory.MemoryPresence`, whose rules this follows:

- adding an entry twice adds it once; removing an unknown one is harmless;
- ``online`` counts every entry not yet reaped, whether its node is alive or not;
- ``reap`` removes every entry of a node whose heartbeat key is gone (expired, or never set),
  together with the node's bookkeeping; a later ``heartbeat`` brings the node back, empty;
- a user is online while their user set is not empty; ``last_seen`` (the adapter's wall
  clock, kept as the maximum so a node's clock behind another's never moves it back) is set
  by an add, by the removal of the user's last entry and by the reap that removes it.

Each of add, remove, heartbeat and the reaping of one node is one Lua script, so no reader
ever sees an entry in a room hash but not in its node's set, or the reverse. ``reap`` looks at
the nodes one script at a time: a node whose heartbeat is renewed before its turn is kept.

The scripts touch keys they compute (room hashes), so this assumes one Redis, not a Cluster.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Final

import attrs
import trio

from chatnode.core import ports
from chatnode.core.models import PresenceEntry, Reaped, UserPresence

from .client import RespClient, Script

_SEEN: Final = """
local function seen(hash, user, now)
  local old = tonumber(redis.call('HGET', hash, user) or '0')
  if tonumber(now) > old then
    redis.call('HSET', hash, user, now)
  end
end
"""

# KEYS: room hash, node entries, nodes, user set, last seen. ARGV: entry, user, member,
# node id, now ms.
_ADD: Final = Script(
    "#!lua\n"
    + _SEEN
    + """
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('SADD', KEYS[2], ARGV[3])
redis.call('SADD', KEYS[3], ARGV[4])
redis.call('SADD', KEYS[4], ARGV[3])
seen(KEYS[5], ARGV[2], ARGV[5])
return 1
"""
)

# KEYS: room hash, node entries, user set, last seen. ARGV: entry, member, user, now ms.
_REMOVE: Final = Script(
    "#!lua\n"
    + _SEEN
    + """
redis.call('SREM', KEYS[2], ARGV[2])
local removed = redis.call('HDEL', KEYS[1], ARGV[1])
if redis.call('SREM', KEYS[3], ARGV[2]) == 1 and redis.call('SCARD', KEYS[3]) == 0 then
  seen(KEYS[4], ARGV[3], ARGV[4])
end
return removed
"""
)

# KEYS: last seen. ARGV: user set key prefix, then the names. Per name: online (0/1), last
# seen (or nil).
_USERS: Final = Script("""#!lua
local result = {}
for i = 2, #ARGV do
  table.insert(result, redis.call('EXISTS', ARGV[1] .. ARGV[i]))
  table.insert(result, redis.call('HGET', KEYS[1], ARGV[i]))
end
return result
""")

# KEYS: heartbeat, nodes. ARGV: ttl ms, node id.
_HEARTBEAT: Final = Script("""#!lua
redis.call('SET', KEYS[1], '1', 'PX', ARGV[1])
redis.call('SADD', KEYS[2], ARGV[2])
return 1
""")

# KEYS: heartbeat, node entries, nodes, last seen. ARGV: node id, room hash key prefix, user
# set key prefix, now ms. Returns the count removed, then the users left with no entry.
_REAP_NODE: Final = Script(
    "#!lua\n"
    + _SEEN
    + """
if redis.call('EXISTS', KEYS[1]) == 1 then
  return {0}
end
local result = {0}
for _, member in ipairs(redis.call('SMEMBERS', KEYS[2])) do
  local room, entry = string.match(member, '^(%d+) (.*)$')
  if room then
    local hash = ARGV[2] .. room
    local user = redis.call('HGET', hash, entry)
    result[1] = result[1] + redis.call('HDEL', hash, entry)
    if user then
      local set = ARGV[3] .. user
      if redis.call('SREM', set, member) == 1 and redis.call('SCARD', set) == 0 then
        seen(KEYS[4], user, ARGV[4])
        table.insert(result, user)
      end
    end
  end
end
redis.call('DEL', KEYS[2])
redis.call('SREM', KEYS[3], ARGV[1])
return result
"""
)


@attrs.define(eq=False)
class RedisPresence:
    """``ports.Presence`` in Redis (layout and rules in the module docstring). Redis failures
    raise ``Unavailable``.

    The client belongs to the caller: ``aclose`` does not close it.
    """

    _redis: RespClient
    prefix: str
    clock_ms: Callable[[], int] = attrs.field(
        default=lambda: time.time_ns() // 1_000_000, kw_only=True
    )

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

    @property
    def _user_key_prefix(self) -> str:
        return f"{self.prefix}:presence:user:"

    @property
    def _last_seen_key(self) -> str:
        return f"{self.prefix}:presence:last_seen"

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
            [
                self._room_key(entry.room_id),
                self._entries_key(entry.node_id),
                self._nodes_key,
                self._user_key_prefix + entry.user,
                self._last_seen_key,
            ],
            [field, entry.user, f"{entry.room_id} {field}", entry.node_id, self.clock_ms()],
        )

    async def remove(self, entry: PresenceEntry) -> None:
        field = self._entry_field(entry)
        await _REMOVE.run(
            self._redis,
            [
                self._room_key(entry.room_id),
                self._entries_key(entry.node_id),
                self._user_key_prefix + entry.user,
                self._last_seen_key,
            ],
            [field, f"{entry.room_id} {field}", entry.user, self.clock_ms()],
        )

    async def users(self, names: Sequence[str]) -> dict[str, UserPresence]:
        if not names:
            return {}
        reply = await _USERS.run(
            self._redis, [self._last_seen_key], [self._user_key_prefix, *names]
        )
        if not isinstance(reply, list) or len(reply) != 2 * len(names):
            raise TypeError(f"the users script returned {reply!r:.200}")
        result: dict[str, UserPresence] = {}
        for i, name in enumerate(names):
            online, seen = reply[2 * i], reply[2 * i + 1]
            last_seen = int(seen) if isinstance(seen, bytes) else None
            result[name] = UserPresence(online == 1, last_seen)
        return result

    async def online(self, room_id: int) -> list[str]:
        users = await self._redis.call("HVALS", self._room_key(room_id))
        if not isinstance(users, list):
            raise TypeError(f"HVALS returned {users!r:.200}")
        return sorted({user.decode() for user in users if isinstance(user, bytes)})

    async def heartbeat(self, node_id: str, *, ttl_ms: int) -> None:
        await _HEARTBEAT.run(
            self._redis, [self._alive_key(node_id), self._nodes_key], [ttl_ms, node_id]
        )

    async def reap(self) -> Reaped:
        nodes = await self._redis.call("SMEMBERS", self._nodes_key)
        if not isinstance(nodes, list):
            raise TypeError(f"SMEMBERS returned {nodes!r:.200}")
        removed, offline = 0, list[str]()
        for raw in nodes:
            if not isinstance(raw, bytes):
                raise TypeError(f"SMEMBERS returned {nodes!r:.200}")
            node_id = raw.decode()
            reply = await _REAP_NODE.run(
                self._redis,
                [
                    self._alive_key(node_id),
                    self._entries_key(node_id),
                    self._nodes_key,
                    self._last_seen_key,
                ],
                [node_id, self._room_key_prefix, self._user_key_prefix, self.clock_ms()],
            )
            if not isinstance(reply, list) or not reply or not isinstance(reply[0], int):
                raise TypeError(f"the reap script returned {reply!r:.200}")
            removed += reply[0]
            offline.extend(user.decode() for user in reply[1:] if isinstance(user, bytes))
        return Reaped(removed, tuple(sorted(set(offline))))


if TYPE_CHECKING:  # mypy proves the adapter implements its port

    def _implements_port(redis: RespClient) -> ports.Presence:
        return RedisPresence(redis, "p")
