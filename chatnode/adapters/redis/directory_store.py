"""What the Redis cached directory (:mod:`.directory`) runs and keeps in Redis: the Lua
scripts that read under version tokens (rule 1) and confirm memberships (rule 6), and the
JSON rows of rooms and members."""

from __future__ import annotations

from typing import Any, Final

from chatnode.core.models import PUBLIC, Member, Room

from .client import Script

_TOKENS: Final = """\
local tokens = {}
for i, key in ipairs(KEYS) do
  local token = redis.call('GET', key)
  if not token then
    redis.call('SET', key, ARGV[1])
    token = ARGV[1]
  end
  tokens[i] = token
end
"""
"""Lua: ``tokens``, the current version token of each key of ``KEYS``; a missing one is set
to ``ARGV[1]``, a fresh token (rule 2)."""

# KEYS: version keys. ARGV: fresh token (for a missing version), cache key head, cache key tail.
# Returns {cache key, cached value or false}.
READ: Final = Script(
    "#!lua\n"
    + _TOKENS
    + """\
local cache_key = ARGV[2] .. table.concat(tokens, ':') .. ARGV[3]
return {cache_key, redis.call('GET', cache_key)}
"""
)

# KEYS: version keys. ARGV: fresh token (for a missing version), set key head, set key tail,
# user. Returns {set key, 1 if the user is in the set else 0}.
CONFIRMED: Final = Script(
    "#!lua\n"
    + _TOKENS
    + """\
local set_key = ARGV[2] .. table.concat(tokens, ':') .. ARGV[3]
return {set_key, redis.call('SISMEMBER', set_key, ARGV[4])}
"""
)

# KEYS: the set of a room's confirmed members. ARGV: user, ttl ms.
CONFIRM: Final = Script("""#!lua
redis.call('SADD', KEYS[1], ARGV[1])
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return 1
""")


def room_fields(room: Room) -> list[object]:
    return [room.id, room.name, room.created_at_ms, room.visibility, room.created_by]


def room_of(fields: list[Any]) -> Room:
    """A room as kept in Redis; one kept before rooms had a visibility is public."""
    room_id, name, created_at_ms, *rest = fields
    visibility = str(rest[0]) if rest else PUBLIC
    created_by = rest[1] if len(rest) > 1 and isinstance(rest[1], str) else None
    return Room(int(room_id), str(name), int(created_at_ms), visibility, created_by)


def member_of(fields: list[Any]) -> Member:
    user, role, joined_at_ms = fields
    return Member(str(user), str(role), int(joined_at_ms))


def confirmed_reply(found: object) -> tuple[bytes | None, bool]:
    """``CONFIRMED``'s reply: (the set's key, whether the user is in it); (None, False)
    when Redis did not answer."""
    if isinstance(found, list) and len(found) == 2 and isinstance(found[0], bytes):
        return found[0], found[1] == 1
    return None, False
