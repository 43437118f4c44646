"""Push notifications' collapse windows in Redis: :class:`RedisPushGate` (``ports.PushGate``).

Keys (``P`` is the deployment's key prefix)::

    P:push:{room}:{user}        string  the open window: the token of the node holding it,
                                        PX twice the window
    P:push:{room}:{user}:next   hash    {offset, note}: the newest notification the window
                                        holds back, PX twice the window

Rules:

1. **One script per batch.** Opening (``SET NX PX``) the windows of every offline member of
   a room for one message, or keeping the message as their pending note, is one script; so is
   closing a batch of due windows. Two nodes opening a window at once: one opens it.
2. **The newest note wins.** A pending note is replaced only by one of a greater offset, so
   nodes publishing in any order keep the room's latest message.
3. **Only the holder closes.** Closing checks the window's token: a window that expired (its
   holder never closed it) and was opened again by another node is not touched.
4. **Nothing to sweep.** Both keys expire twice the window after their last write.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Final

import attrs

from chatnode.core import ports

from .client import RespClient, Script

# KEYS: window, pending, window, pending, ... ARGV: token, ttl ms, offset, note.
# Returns the 1-based indices of the windows opened.
_OPEN: Final = Script("""#!lua
local opened = {}
for i = 1, #KEYS, 2 do
  if redis.call('SET', KEYS[i], ARGV[1], 'NX', 'PX', ARGV[2]) then
    redis.call('DEL', KEYS[i + 1])
    opened[#opened + 1] = (i + 1) / 2
  else
    local kept = redis.call('HGET', KEYS[i + 1], 'offset')
    if not kept or tonumber(kept) < tonumber(ARGV[3]) then
      redis.call('HSET', KEYS[i + 1], 'offset', ARGV[3], 'note', ARGV[4])
      redis.call('PEXPIRE', KEYS[i + 1], ARGV[2])
    end
  end
end
return opened
""")

# KEYS: as _OPEN's. ARGV: token, ttl ms. Returns one note per window ('' : closed).
_CLOSE: Final = Script("""#!lua
local notes = {}
for i = 1, #KEYS, 2 do
  local note = ''
  if redis.call('GET', KEYS[i]) == ARGV[1] then
    note = redis.call('HGET', KEYS[i + 1], 'note') or ''
    redis.call('DEL', KEYS[i + 1])
    if note == '' then
      redis.call('DEL', KEYS[i])
    else
      redis.call('SET', KEYS[i], ARGV[1], 'PX', ARGV[2])
    end
  end
  notes[#notes + 1] = note
end
return notes
""")


@attrs.define(eq=False)
class RedisPushGate:
    """``ports.PushGate`` in Redis (rules in the module docstring). Redis failures raise
    ``Unavailable``."""

    _redis: RespClient
    prefix: str

    def _keys(self, room_id: int, users: Sequence[str]) -> list[str]:
        keys = []
        for user in users:
            window = f"{self.prefix}:push:{room_id}:{user}"
            keys += [window, window + ":next"]
        return keys

    async def open(
        self,
        room_id: int,
        users: Sequence[str],
        *,
        offset: int,
        note: bytes,
        token: str,
        window_ms: int,
    ) -> list[str]:
        if not users:
            return []
        reply = await _OPEN.run(
            self._redis, self._keys(room_id, users), [token, 2 * window_ms, offset, note]
        )
        if not isinstance(reply, list):
            raise TypeError(f"the push gate's open returned {reply!r:.200}")
        return [users[i - 1] for i in reply if isinstance(i, int)]

    async def close(
        self, room_id: int, users: Sequence[str], *, token: str, window_ms: int
    ) -> list[bytes | None]:
        if not users:
            return []
        reply = await _CLOSE.run(self._redis, self._keys(room_id, users), [token, 2 * window_ms])
        if not isinstance(reply, list) or len(reply) != len(users):
            raise TypeError(f"the push gate's close returned {reply!r:.200}")
        return [note if isinstance(note, bytes) and note else None for note in reply]


if TYPE_CHECKING:  # mypy proves the adapter implements its port

    def _implements_port(redis: RespClient) -> ports.PushGate:
        return RedisPushGate(redis, "p")
