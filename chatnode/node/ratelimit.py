"""A token bucket: ``rate_per_s`` sustained, ``burst`` at once. Owned by one connection."""

from __future__ import annotations

import attrs


@attrs.define
class TokenBucket:
    rate_per_s: float
    burst: int
    tokens: float = attrs.field(init=False)
    updated_s: float | None = None

    def __attrs_post_init__(self) -> None:
        self.tokens = float(self.burst)

    def take(self, now_s: float) -> float:
        """Spend one token; return 0.0 if allowed, else the seconds until one is available."""
        if self.updated_s is not None:
            self.tokens = min(
                float(self.burst), self.tokens + (now_s - self.updated_s) * self.rate_per_s
            )
        self.updated_s = now_s
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return 0.0
        return (1.0 - self.tokens) / self.rate_per_s
