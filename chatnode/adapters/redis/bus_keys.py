"""What the Redis bus keeps in Redis (:mod:`.bus`): the key layout for one prefix, the Lua
scripts that change it atomically, and the decoding of its entries. The key table and the
rules the scripts keep are in :mod:`.bus`'s docstring."""

from __future__ import annotations

from typing import Final

import attrs

from chatnode.core.models import ChatMessage
from chatnode.wire.resp import Reply

from .client import Script

# KEYS: counter, room log, archive stream[, sent key].
# ARGV: log length, channel, user, text, timestamp_ms, the archive document's head and tail,
# floor (the newest offset the node saw; -1: none), dedup window s, 1 to continue above a
# floor the counter is behind (0: refuse, so the node restores the room first)[, event, by
# of a membership change].
# Returns {offset, archive entry id}, or {0, "offset:timestamp"} for a client id already sent.
PUBLISH_LUA: Final = """#!lua
if KEYS[4] then
  local sent = redis.call('GET', KEYS[4])
  if sent then return {0, sent} end
end
local current = redis.call('GET', KEYS[1])
if current then
  current = tonumber(current)
else
  local newest = redis.call('XREVRANGE', KEYS[2], '+', '-', 'COUNT', 1)[1]
  current = newest and tonumber(string.match(newest[1], '^(%d+)')) or -1
end
local floor = tonumber(ARGV[8])
if floor > current then
  if ARGV[10] ~= '1' then return redis.error_reply('BEHIND the room offset is behind') end
  current = floor
end
if current < 0 then return redis.error_reply('NOOFFSET the room offset is unknown') end
local offset = current + 1
redis.call('SET', KEYS[1], offset)
if ARGV[11] then
  redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[1], offset .. '-0',
    'u', ARGV[3], 't', ARGV[4], 'ts', ARGV[5], 'e', ARGV[11], 'b', ARGV[12])
else
  redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[1], offset .. '-0',
    'u', ARGV[3], 't', ARGV[4], 'ts', ARGV[5])
end
local document = ARGV[6] .. offset .. ARGV[7]
local id = redis.call('XADD', KEYS[3], '*', 'd', document)
redis.call('PUBLISH', ARGV[2], 'm' .. document)
if KEYS[4] then redis.call('SET', KEYS[4], offset .. ':' .. ARGV[5], 'EX', ARGV[9]) end
return {offset, id}
"""
PUBLISH: Final = Script(PUBLISH_LUA)

# KEYS: counter, room log. The room's newest offset: the counter, else the log's newest
# entry (a counter evicted while the log survived), else -1 (lost, or never published).
HEAD: Final = Script("""#!lua
local current = redis.call('GET', KEYS[1])
if current then return tonumber(current) end
local newest = redis.call('XREVRANGE', KEYS[2], '+', '-', 'COUNT', 1)[1]
if newest then return tonumber(string.match(newest[1], '^(%d+)')) end
return -1
""")

# KEYS: counter, room log, incarnation. ARGV: last offset, log length, seed (1/0), settle ms,
# then offset, user, text, timestamp_ms, event, by ("" for a message) of each message to log,
# ascending.
# Returns {offset, 0}, or {-1, ms to wait} for a seed that comes too soon after a data loss.
RESTORE: Final = Script("""#!lua
local current = tonumber(redis.call('GET', KEYS[1]) or '-1')
local newest = redis.call('XREVRANGE', KEYS[2], '+', '-', 'COUNT', 1)[1]
local top = newest and tonumber(string.match(newest[1], '^(%d+)')) or -1
local target = tonumber(ARGV[1])
if ARGV[3] == '1' and current < 0 and top < 0 and target > 0 then
  local now = redis.call('TIME')
  local now_ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
  local since = tonumber(redis.call('GET', KEYS[3]) or '-1')
  if since < 0 then
    since = now_ms
    redis.call('SET', KEYS[3], string.format('%d', now_ms))
  end
  local wait = since + tonumber(ARGV[4]) - now_ms
  if wait > 0 then return {-1, wait} end
end
for i = 5, #ARGV, 6 do
  local offset = tonumber(ARGV[i])
  local fields = {'u', ARGV[i + 1], 't', ARGV[i + 2], 'ts', ARGV[i + 3]}
  if ARGV[i + 4] ~= '' then
    fields[7], fields[8], fields[9], fields[10] = 'e', ARGV[i + 4], 'b', ARGV[i + 5]
  end
  -- pcall: an id the stream already generated (a deleted entry's) is refused, and skipped
  if offset > top and pcall(redis.call, 'XADD', KEYS[2], 'MAXLEN', '~', ARGV[2],
      offset .. '-0', unpack(fields)) then
    top = offset
  end
end
if top > target then target = top end
if current > target then target = current end
if target ~= current then redis.call('SET', KEYS[1], target) end
return {target, 0}
""")

# KEYS: incarnation. Note when this Redis began holding the deployment's data; 1 if now.
MARK: Final = Script("""#!lua
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
local now = redis.call('TIME')
redis.call('SET', KEYS[1], string.format('%d', tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)))
return 1
""")

# KEYS: archive stream. ARGV: documents. Append each again; returns their new entry ids.
WRITE_BACK: Final = Script("""#!lua
local ids = {}
for i, document in ipairs(ARGV) do ids[i] = redis.call('XADD', KEYS[1], '*', 'd', document) end
return ids
""")


@attrs.frozen
class BusKeys:
    """The key layout of the module docstring for one prefix."""

    prefix: str
    _channel_head: bytes = attrs.field(init=False, eq=False, repr=False)

    def __attrs_post_init__(self) -> None:
        object.__setattr__(self, "_channel_head", f"{self.prefix}:room:".encode())

    def offset(self, room_id: int) -> str:
        return f"{self.prefix}:room:{room_id}:offset"

    def log(self, room_id: int) -> str:
        return f"{self.prefix}:room:{room_id}:log"

    def sent(self, room_id: int, user: str, client_id: str) -> str:
        return f"{self.prefix}:room:{room_id}:sent:{user}:{client_id}"

    def channel(self, room_id: int) -> bytes:
        return self._channel_head + b"%d" % room_id

    @property
    def archive(self) -> str:
        return f"{self.prefix}:archive"

    @property
    def archive_lease(self) -> str:
        return f"{self.prefix}:archive:lease"

    @property
    def incarnation(self) -> str:
        return f"{self.prefix}:incarnation"

    def room_of_channel(self, channel: bytes) -> int | None:
        head = self._channel_head
        tail = channel[len(head) :]
        if not channel.startswith(head) or not tail.isdigit():
            return None
        return int(tail)


def _offset_of(entry_id: bytes | str) -> int:
    raw = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
    return int(raw.split("-", 1)[0])


def stream_id(raw: bytes) -> tuple[int, int]:
    ms, _, seq = raw.partition(b"-")
    return int(ms), int(seq)


def logged_message(room_id: int, entry: Reply) -> ChatMessage:
    """One XRANGE entry of a room log, ``[id, [field, value, ...]]``, as its message."""
    match entry:
        case [bytes(entry_id), [*pairs]] if len(pairs) % 2 == 0:
            fields = dict(zip(pairs[::2], pairs[1::2], strict=True))
            user, text, ts = fields.get(b"u"), fields.get(b"t"), fields.get(b"ts")
            event, by = fields.get(b"e"), fields.get(b"b")
            if isinstance(user, bytes) and isinstance(text, bytes) and isinstance(ts, bytes):
                if isinstance(event, bytes):  # a membership change
                    return ChatMessage(
                        room_id,
                        _offset_of(entry_id),
                        user.decode(),
                        text.decode(),
                        int(ts),
                        event.decode(),
                        by.decode() if isinstance(by, bytes) else "",
                    )
                return ChatMessage(
                    room_id, _offset_of(entry_id), user.decode(), text.decode(), int(ts)
                )
    raise ValueError(f"malformed room log entry: {entry!r:.200}")
