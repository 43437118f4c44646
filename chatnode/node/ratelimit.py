"""Rate limits per user, across all their connections and every node, and per client address.

A limit is a token bucket (``burst`` at once, ``per_s`` sustained) shared by every node
through ``ports.RateLimits`` (Redis in a cluster, memory on the embedded node). Asking the
store on every message would add a Redis round trip to each send, on top of the publish
script; so a node leases tokens in batches and spends them locally.

Rules:

1. **Leases.** A node takes up to ``Rate.lease`` tokens of a key at once (an eighth of the
   burst, at most half a second's worth) and spends them with no await: a send costs a dict
   lookup and a decrement; the store is asked once per lease (docs/security.md, figures).
2. **Never more than the bucket.** Every token spent was taken from the shared bucket first,
   so all nodes together spend at most ``burst + per_s * t`` in any ``t`` seconds, plus what
   they leased earlier and had not spent yet: at most one lease per node and key. A lease
   left unspent (the user went quiet) is never given back; the user just has it later.
3. **Refusals cost no round trip.** When the store has no token, the node refuses the key by
   itself until the store said one would be there plus the time a whole lease takes to
   refill; a user hammering at the limit costs one store call per lease, not one per frame.
4. **One lease at a time** per key and node: takers of a key wait for the lease in flight.
5. **A store that fails degrades to per-node limits.** When the store raises
   ``Unavailable`` or takes longer than ``LEASE_TIMEOUT_S`` to answer, the node limits each key by itself (a bucket of its own, starting full)
   and asks the store again only ``STORE_RETRY_S`` later: during a Redis outage each node
   allows the whole rate. Without a store (``None``) a node always limits alone.
6. **Bounded memory.** The table of keys is swept when it doubled since the last sweep (at
   least ``SWEEP_MIN_KEYS``): a key not used since the previous sweep, not leasing, not
   refused and holding no local bucket still refilling is dropped (its unspent lease with
   it). So the table holds the keys in use and at most as many more.
"""

from __future__ import annotations

import ipaddress
import logging
import math
from typing import Final

import attrs
import trio

from chatnode.core.errors import Unavailable
from chatnode.core.models import Grant
from chatnode.core.ports import RateLimits

log = logging.getLogger(__name__)

STORE_RETRY_S: Final = 1.0
LEASE_TIMEOUT_S: Final = 1.0
SWEEP_MIN_KEYS: Final = 1024


@attrs.define
class TokenBucket:
    """A bucket of one node: ``rate_per_s`` sustained, ``burst`` at once."""

    rate_per_s: float
    burst: int
    tokens: float = attrs.field(init=False)
    updated_s: float | None = None

    def __attrs_post_init__(self) -> None:
        self.tokens = float(self.burst)

    def take(self, now_s: float) -> float:
        """Spend one token; return 0.0 if allowed, else the seconds until one is available."""
        self._refill(now_s)
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return 0.0
        return (1.0 - self.tokens) / self.rate_per_s

    def full(self, now_s: float) -> bool:
        self._refill(now_s)
        return self.tokens >= self.burst

    def _refill(self, now_s: float) -> None:
        if self.updated_s is not None:
            self.tokens = min(
                float(self.burst), self.tokens + (now_s - self.updated_s) * self.rate_per_s
            )
        self.updated_s = now_s


@attrs.frozen
class Rate:
    """``burst`` at once, then ``per_s`` a second."""

    per_s: float
    burst: int

    @classmethod
    def every(cls, interval_s: float, burst: int) -> Rate:
        """``burst`` at once, then one more every ``interval_s`` seconds."""
        return cls(1.0 / interval_s, burst)

    @property
    def lease(self) -> int:
        """Tokens a node takes from the store at once (rule 1): an eighth of the burst, so
        other nodes of the same user keep most of it; at most half a second's worth."""
        return max(1, min(self.burst // 8, math.ceil(self.per_s / 2)))


@attrs.frozen
class Rates:
    """The node's limits other than messages (``NodeSettings.rate_messages_per_s``); the
    defaults are ``Config``'s."""

    pings: Rate = Rate(1.0, 10)
    subscriptions: Rate = Rate(2.0, 50)
    typing_interval_s: float = 2.0
    room_creations: Rate = Rate(1.0 / 60.0, 10)
    member_changes: Rate = Rate(1.0, 30)
    logins_per_address: Rate = Rate(1.0, 20)
    login_failures_per_account: Rate = Rate(1.0 / 60.0, 10)
    signups_per_address: Rate = Rate(1.0 / 60.0, 10)


@attrs.define(eq=False)
class _Budget:
    """A key's tokens on this node: leased and not spent, or a bucket of its own (rule 5)."""

    tokens: int = 0
    refused_until: float = -math.inf  # trio time
    leasing: trio.Event | None = None
    local: TokenBucket | None = None
    used: bool = True  # since the last sweep (rule 6)


@attrs.define(eq=False)
class _StoreHealth:
    """Whether to ask the store (rule 5), shared by a node's limiters; logs each change."""

    down_until: float = -math.inf
    failing: bool = False

    def failed(self, why: str) -> None:
        self.down_until = trio.current_time() + STORE_RETRY_S
        if not self.failing:
            self.failing = True
            log.warning("rate limits: the shared store failed (%s); each node limits alone", why)

    def answered(self) -> None:
        if self.failing:
            self.failing = False
            log.info("rate limits: the shared store is back")


class Limiter:
    """One kind of limit (messages, typing, ...) for every key, leased from ``store``
    (rules in the module docstring). Owned by the node; used by any of its tasks."""

    def __init__(
        self, kind: str, rate: Rate, store: RateLimits | None, health: _StoreHealth | None = None
    ) -> None:
        self.kind = kind
        self.rate = rate
        self._store = store
        self._health = health or _StoreHealth()
        self._budgets: dict[str, _Budget] = {}
        self._sweep_at = SWEEP_MIN_KEYS
        self.leases = 0
        self.refused = 0

    async def take(self, key: str) -> float:
        """Spend one token of ``key``: 0.0 if allowed, else the seconds until one may be."""
        budget = self._budgets.get(key)
        if budget is not None and budget.tokens:
            budget.tokens -= 1  # the common case: no await, no clock (rule 1)
            budget.used = True
            return 0.0
        wait_s = await self._take_slowly(key, budget)
        if wait_s:
            self.refused += 1
        return wait_s

    def give_back(self, key: str) -> None:
        """Return one token spent on ``key`` (kept on this node)."""
        budget = self._budgets.get(key)
        if budget is None:
            return
        if budget.local is not None:
            budget.local.tokens = min(float(budget.local.burst), budget.local.tokens + 1.0)
        else:
            budget.tokens += 1

    async def _take_slowly(self, key: str, budget: _Budget | None) -> float:
        if budget is None:
            if len(self._budgets) >= self._sweep_at:
                self._sweep()
            budget = self._budgets[key] = _Budget()
        rate = self.rate
        budget.used = True
        while True:
            if budget.tokens:
                budget.tokens -= 1
                return 0.0
            now = trio.current_time()
            if now < budget.refused_until:
                return budget.refused_until - now
            if budget.leasing is not None:
                await budget.leasing.wait()
                continue
            if self._store is None or now < self._health.down_until:
                if budget.local is None:
                    budget.local = TokenBucket(rate.per_s, rate.burst)
                return budget.local.take(now)
            leasing = budget.leasing = trio.Event()
            grant: Grant | None = None
            try:
                with trio.move_on_after(LEASE_TIMEOUT_S):
                    grant = await self._store.take(
                        f"{self.kind}:{key}", rate.lease, rate_per_s=rate.per_s, burst=rate.burst
                    )
            except Unavailable as exc:
                self._health.failed(str(exc))
                continue
            finally:
                leasing.set()
                budget.leasing = None
            if grant is None:
                self._health.failed(f"no answer within {LEASE_TIMEOUT_S} s")
                continue
            self._health.answered()
            self.leases += 1
            budget.local = None
            if grant.tokens:
                budget.tokens += grant.tokens
            else:
                budget.refused_until = (
                    trio.current_time() + grant.retry_after_s + (rate.lease - 1) / rate.per_s
                )

    def _sweep(self) -> None:
        now = trio.current_time()
        self._budgets = {
            key: budget
            for key, budget in self._budgets.items()
            if budget.used
            or budget.leasing is not None
            or budget.refused_until > now
            or (budget.local is not None and not budget.local.full(now))
        }
        for budget in self._budgets.values():
            budget.used = False
        self._sweep_at = max(SWEEP_MIN_KEYS, 2 * len(self._budgets))


class NodeLimits:
    """Every limiter of a node, over one store."""

    def __init__(self, messages: Rate, rates: Rates, store: RateLimits | None) -> None:
        health = _StoreHealth()
        self.rates = rates
        self.messages = Limiter("msg", messages, store, health)
        self.pings = Limiter("ping", rates.pings, store, health)
        self.subscriptions = Limiter("subscribe", rates.subscriptions, store, health)
        self.typing = Limiter("typing", Rate.every(rates.typing_interval_s, 1), store, health)
        self.room_creations = Limiter("rooms", rates.room_creations, store, health)
        self.member_changes = Limiter("members", rates.member_changes, store, health)
        self.logins_per_address = Limiter("login-addr", rates.logins_per_address, store, health)
        self.login_failures = Limiter("login-fail", rates.login_failures_per_account, store, health)
        self.signups_per_address = Limiter("signup-addr", rates.signups_per_address, store, health)

    @property
    def all(self) -> tuple[Limiter, ...]:
        return (
            self.messages,
            self.pings,
            self.subscriptions,
            self.typing,
            self.room_creations,
            self.member_changes,
            self.logins_per_address,
            self.login_failures,
            self.signups_per_address,
        )

    def counters(self) -> dict[str, int]:
        """For ``/metrics``: refusals per kind (typing: frames dropped), and leases taken."""
        out = {
            f"rate_limited_{limiter.kind.replace('-', '_')}_total": limiter.refused
            for limiter in self.all
        }
        out["rate_leases_total"] = sum(limiter.leases for limiter in self.all)
        return out


def address_key(client: str) -> str:
    """The key of a client address for per-address limits: an IPv6 address counts as its
    /64 (what one subscriber gets; an IPv4-mapped one as its IPv4), anything else as it is."""
    try:
        ip = ipaddress.ip_address(client)
    except ValueError:
        return client
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.ip_network(f"{ip}/64", strict=False))
    return str(ip)
