"""WebSocket tickets in Redis: :class:`RedisTickets` (``ports.Tickets``).

Keys (``P`` is the deployment's key prefix)::

    P:ticket:{ticket}              string  the token the ticket stands for; PX its lifetime
    P:tickets:account:{id}         string  tickets issued to the account in the current
                                           window; PX one lifetime from the window's first

Rules: issuing counts and stores in one script, so the per-account bound holds against any
number of nodes; redeeming is one ``GETDEL``, so a ticket is handed out once, to the first
node that asks, and never after Redis expired it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Final

import attrs

from chatnode.core import ports

from .client import RespClient, Script

# KEYS: the ticket, the account's counter. ARGV: token, lifetime ms, max per account.
# Returns 1 if the ticket was stored, 0 if the account is over its bound.
_ISSUE: Final = Script("""#!lua
local issued = redis.call('INCR', KEYS[2])
if issued == 1 then
  redis.call('PEXPIRE', KEYS[2], ARGV[2])
end
if issued > tonumber(ARGV[3]) then
  return 0
end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return 1
""")


@attrs.define(eq=False)
class RedisTickets:
    """``ports.Tickets`` in Redis (layout and rules in the module docstring). Redis failures
    raise ``Unavailable``. The client belongs to the caller."""

    _redis: RespClient
    prefix: str

    async def issue(
        self, ticket: str, token: str, *, account_id: int, ttl_ms: int, max_per_account: int
    ) -> bool:
        keys = [f"{self.prefix}:ticket:{ticket}", f"{self.prefix}:tickets:account:{account_id}"]
        stored = await _ISSUE.run(self._redis, keys, [token, max(1, ttl_ms), max_per_account])
        if not isinstance(stored, int):
            raise TypeError(f"the ticket script returned {stored!r:.200}")
        return stored == 1

    async def redeem(self, ticket: str) -> str | None:
        token = await self._redis.call("GETDEL", f"{self.prefix}:ticket:{ticket}")
        if token is not None and not isinstance(token, bytes):
            raise TypeError(f"GETDEL returned {token!r:.200}")
        return None if token is None else token.decode()


if TYPE_CHECKING:  # mypy proves the adapter implements its port

    def _implements_port(redis: RespClient) -> ports.Tickets:
        return RedisTickets(redis, "p")
