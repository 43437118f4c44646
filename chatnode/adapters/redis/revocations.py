"""What ends tokens early, in Redis: :class:`RedisRevocations` (``ports.Revocations``).

Keys (``P`` is the deployment's key prefix)::

    P:revoked:users_deleted_at     string  epoch ms at or before which every token is revoked
                                           (every account then existing was deleted)
    P:revoked:account:{id}         string  epoch ms at or before which the account's tokens
                                           are revoked; PXAT the expiry of its last such token
    P:revoked:token:{id}           string  a revoked token; PXAT the token's expiry
    P:revoked:changes              stream  every record, in order (fields k, a, e, u, t: kind,
                                           at, expires, account, token); about the newest
                                           ``max_changes`` kept

Rules:

1. **One script per record**: the key is written and the record appended to the changes
   in one step, so a node that reads the changes and then looks a token up never sees the
   change without the state. Times only move forward (the later of the held and the new
   time is kept, and the later expiry), so two records racing, or two nodes' clocks a little
   apart, never move one back.
2. **Every node reads what any node recorded**: ``lookup`` reads the three keys of a token
   in one ``MGET``; a node follows ``changes`` from a cursor (stream ids, ``XRANGE`` exclusive
   of the cursor). Trimming drops the oldest entries first, so while the cursor's own entry
   is in the stream nothing after it was dropped; once it is gone (trimmed, or the stream lost
   with Redis's data) the read says ``complete=False`` and the follower checks again what it
   holds (a cursor of ``0-0``, a follower that began on an empty stream: complete while no
   entry was ever removed).
3. As durable as the Redis they live in (AOF in production). A Redis that loses its data
   forgets the sign-outs recorded in it (the tokens work again until they expire); password
   changes, withdrawn admin rights and deletions are also in the directory, which decides
   whenever it answers.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Final

import attrs

from chatnode.core import ports
from chatnode.core.models import Revocation, RevocationChanges, RevocationKind, RevocationState
from chatnode.wire.resp import Reply

from .client import RespClient, Script

# KEYS: the record's key, the changes stream. ARGV: kind, at ms, expires ms, account id,
# token id, changes to keep. Returns the stream id of the record.
_RECORD: Final = Script("""#!lua
local kind, at, expires = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
if kind == 'all' then
  local held = tonumber(redis.call('GET', KEYS[1]) or '0')
  if at > held then
    redis.call('SET', KEYS[1], ARGV[2])
  end
else
  local now = redis.call('TIME')
  local now_ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
  local held_expiry = tonumber(redis.call('PEXPIRETIME', KEYS[1]))
  if held_expiry > expires then
    expires = held_expiry
  end
  if expires > now_ms then
    local value = '1'
    if kind == 'account' then
      local held = tonumber(redis.call('GET', KEYS[1]) or '0')
      value = tostring(math.max(held, at))
    end
    redis.call('SET', KEYS[1], value, 'PXAT', expires)
  end
end
return redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[6], '*',
  'k', kind, 'a', ARGV[2], 'e', ARGV[3], 'u', ARGV[4], 't', ARGV[5])
""")

# KEYS: the changes stream. ARGV: cursor (a stream id), count.
# Returns {1 if nothing after the cursor can have been dropped else 0, entries after it}.
_CHANGES: Final = Script("""#!lua
local start = ARGV[1] == '0-0'
if redis.call('EXISTS', KEYS[1]) == 0 then
  return {start and 1 or 0, {}}
end
local intact = 0
if start then
  local info = redis.call('XINFO', 'STREAM', KEYS[1])
  local fields = {}
  for i = 1, #info, 2 do
    fields[info[i]] = info[i + 1]
  end
  if fields['entries-added'] == fields['length'] then
    intact = 1
  end
elseif #redis.call('XRANGE', KEYS[1], ARGV[1], ARGV[1]) == 1 then
  intact = 1
end
return {intact, redis.call('XRANGE', KEYS[1], '(' .. ARGV[1], '+', 'COUNT', ARGV[2])}
""")

MAX_CHANGES: Final = 10_000


@attrs.define(eq=False)
class RedisRevocations:
    """``ports.Revocations`` in Redis (layout and rules in the module docstring). Redis
    failures raise ``Unavailable``. The client belongs to the caller."""

    _redis: RespClient
    prefix: str
    max_changes: int = attrs.field(default=MAX_CHANGES, kw_only=True)

    @property
    def _users_deleted_key(self) -> str:
        return f"{self.prefix}:revoked:users_deleted_at"

    @property
    def _changes_key(self) -> str:
        return f"{self.prefix}:revoked:changes"

    def _account_key(self, account_id: int) -> str:
        return f"{self.prefix}:revoked:account:{account_id}"

    def _token_key(self, token_id: str) -> str:
        return f"{self.prefix}:revoked:token:{token_id}"

    async def record(self, revocation: Revocation) -> None:
        if revocation.kind is RevocationKind.TOKEN:
            key = self._token_key(revocation.token_id)
        elif revocation.kind is RevocationKind.ACCOUNT:
            key = self._account_key(revocation.account_id)
        else:
            key = self._users_deleted_key
        args = [
            revocation.kind.value,
            revocation.at_ms,
            revocation.expires_at_ms,
            revocation.account_id,
            revocation.token_id,
            self.max_changes,
        ]
        await _RECORD.run(self._redis, [key, self._changes_key], args)

    async def lookup(self, *, account_id: int, token_id: str) -> RevocationState:
        keys = [self._token_key(token_id), self._account_key(account_id), self._users_deleted_key]
        match await self._redis.call("MGET", *keys):
            case [token, account, everyone]:
                return RevocationState(
                    token_revoked=token is not None,
                    account_before_ms=_int_or_zero(account),
                    all_before_ms=_int_or_zero(everyone),
                )
            case reply:
                raise TypeError(f"MGET returned {reply!r:.200}")

    async def changes(self, cursor: str | None, *, limit: int = 1000) -> RevocationChanges:
        if cursor is None:
            newest = await self._redis.call("XREVRANGE", self._changes_key, "+", "-", "COUNT", 1)
            match newest:
                case [[bytes(identifier), _]]:
                    return RevocationChanges((), identifier.decode())
                case []:
                    return RevocationChanges((), "0-0")
            raise TypeError(f"XREVRANGE returned {newest!r:.200}")
        reply = await _CHANGES.run(self._redis, [self._changes_key], [cursor, max(1, limit)])
        match reply:
            case [int(intact), list(entries)]:
                pass
            case _:
                raise TypeError(f"the changes script returned {reply!r:.200}")
        revocations = []
        for entry in entries:
            match entry:
                case [bytes(identifier), list(fields)] if len(fields) % 2 == 0:
                    values = dict(zip(fields[::2], fields[1::2], strict=True))
                case _:
                    raise TypeError(f"a malformed revocation entry: {entry!r:.200}")
            revocations.append(
                Revocation(
                    RevocationKind(_text(values[b"k"])),
                    at_ms=int(_text(values[b"a"])),
                    expires_at_ms=int(_text(values[b"e"])),
                    account_id=int(_text(values[b"u"])),
                    token_id=_text(values[b"t"]),
                )
            )
            cursor = identifier.decode()
        return RevocationChanges(tuple(revocations), cursor, complete=intact == 1)


def _text(value: Reply) -> str:
    if not isinstance(value, bytes):
        raise TypeError(f"a revocation field that is not a string: {value!r:.200}")
    return value.decode()


def _int_or_zero(value: Reply) -> int:
    return 0 if value is None else int(_text(value))


if TYPE_CHECKING:  # mypy proves the adapter implements its port

    def _implements_port(redis: RespClient) -> ports.Revocations:
        return RedisRevocations(redis, "p")
