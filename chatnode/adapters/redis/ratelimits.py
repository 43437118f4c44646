"""Rate-limit buckets in Redis: :class:`RedisRateLimits` (``ports.RateLimits``).

Keys (``P`` is the deployment's key prefix)::

    P:rate:{kind}:{key}    string  "<level>:<ms>": the bucket held <level> tokens at Redis
                                   time <ms>; PX until it is full again

Rules:

1. **One script per take.** Reading the bucket, refilling it to Redis' own clock (``TIME``:
   the nodes' clocks never meet) and taking from it happen in one script, so nodes taking
   from one bucket at once never hand out more than it held.
2. **A full bucket is no key.** Each write sets the key to expire when the bucket would be
   full again; a missing key is a full bucket. Memory follows the keys used within their
   refill time; nothing needs sweeping.
3. **Refusing writes nothing.** A take that gets no token leaves the key as it is.

The node calls it once per lease of a batch of tokens (``node/ratelimit.py``), not per
message. Its client should be its own (a lease never waits behind the bus's publishes); the
client belongs to the caller.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Final

import attrs

from chatnode.core import ports
from chatnode.core.models import Grant

from .client import RespClient, Script

# KEYS: the bucket. ARGV: tokens wanted, rate per second, burst.
# Returns {tokens taken, ms until one token is there (when none was taken)}.
_TAKE_LUA: Final = """#!lua
local time = redis.call('TIME')
local now = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
local want, rate, burst = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local level = burst
local held = redis.call('GET', KEYS[1])
if held then
  local was, at = string.match(held, '^([^:]+):(%d+)$')
  if was then
    level = math.min(burst, tonumber(was) + math.max(0, now - tonumber(at)) * rate / 1000)
  end
end
local taken = math.min(want, math.floor(level))
if taken < 1 then
  return {0, math.ceil((1 - level) * 1000 / rate)}
end
level = level - taken
redis.call('SET', KEYS[1], string.format('%.6f:%d', level, now),
  'PX', math.ceil((burst - level) * 1000 / rate) + 1)
return {taken, 0}
"""
_TAKE: Final = Script(_TAKE_LUA)


@attrs.define(eq=False)
class RedisRateLimits:
    """``ports.RateLimits`` in Redis (rules in the module docstring). Redis failures raise
    ``Unavailable``."""

    _redis: RespClient
    prefix: str

    async def take(self, key: str, count: int, *, rate_per_s: float, burst: int) -> Grant:
        reply = await _TAKE.run(
            self._redis, [f"{self.prefix}:rate:{key}"], [count, repr(rate_per_s), burst]
        )
        match reply:
            case [int(taken), int(wait_ms)]:
                return Grant(taken, wait_ms / 1000)
        raise TypeError(f"the rate-limit script returned {reply!r:.200}")


if TYPE_CHECKING:  # mypy proves the adapter implements its port

    def _implements_port(redis: RespClient) -> ports.RateLimits:
        return RedisRateLimits(redis, "p")
