"""What ends tokens early, in Redis: :class:`RedisRevocations` (``ports.Revocations``).

Keys (``P`` is the deployment's key prefix)::

    P:revoked:users_deleted_at     string  epoch ms before which every user was deleted

Every node of the cluster reads what any node recorded: a node that learns nothing else during
a MySQL outage still refuses the tokens of users deleted through another node before it
(``core/auth.py`` ``UserChecks``, rule 2). Recording keeps the later of the held and the new
time in one script, so two deletions racing, or two nodes' clocks a little apart, never move
it back. One key, no TTL: it is as durable as the Redis it lives in (AOF in production).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Final

import attrs
from coredis.commands.script import Script

from chatnode.core import ports

from .redis_connection import RedisClient, int_reply, redis_failures

# KEYS: the time key. ARGV: a time (ms). Returns the time held afterwards.
_RECORD_LUA: Final = """#!lua
local held = tonumber(redis.call('GET', KEYS[1]) or '0')
local new = tonumber(ARGV[1])
if new > held then
  redis.call('SET', KEYS[1], ARGV[1])
  return new
end
return held
"""


@attrs.define(eq=False)
class RedisRevocations:
    """``ports.Revocations`` in Redis (layout in the module docstring). Redis failures raise
    ``Unavailable``. The client belongs to the caller."""

    _redis: RedisClient
    prefix: str
    _record: Script[bytes] = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        self._record = self._redis.register_script(_RECORD_LUA)

    @property
    def _users_deleted_key(self) -> str:
        return f"{self.prefix}:revoked:users_deleted_at"

    async def record_users_deleted(self, at_ms: int) -> None:
        with redis_failures("recording a deletion of users"):
            await self._record(keys=[self._users_deleted_key], args=[at_ms], callback=int_reply)

    async def users_deleted_at(self) -> int:
        with redis_failures("reading when users were deleted"):
            held = await self._redis.get(self._users_deleted_key)
        return 0 if held is None else int(held)


if TYPE_CHECKING:  # mypy proves the adapter implements its port

    def _implements_port(redis: RedisClient) -> ports.Revocations:
        return RedisRevocations(redis, "p")
