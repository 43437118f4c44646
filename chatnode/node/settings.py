"""What a node is made of: its settings (from ``Config``, built by ``app.py``) and its
backends (built by ``wiring.py``)."""

from __future__ import annotations

import attrs

from chatnode.core import validation
from chatnode.core.ports import (
    Archive,
    ArchiveFeed,
    Bus,
    Directory,
    Presence,
    PushGate,
    RateLimits,
    Revocations,
    Tickets,
    Webhook,
)
from chatnode.node.ratelimit import Rates

__all__ = ["Backends", "NodeSettings"]


@attrs.frozen
class NodeSettings:
    """What the node needs of the configuration (built by app.py from Config)."""

    node_id: str
    jwt_secret: str
    token_ttl_s: float
    insecure: bool
    password_cost_log2: int
    history_on_join: int
    max_replay: int
    rate_messages_per_s: float
    rate_burst: int
    presence_ttl_s: float
    limits: validation.Limits = attrs.Factory(validation.Limits)
    archive_linger_s: float = 1.0
    replay_page_messages: int = 200
    password_concurrency: int = 2
    password_queue: int = 32
    ticket_ttl_s: float = 30.0
    tickets_per_account: int = 10
    revocation_poll_s: float = 1.0
    max_connection_rooms: int = 500
    push_collapse_s: float = 30.0
    push_give_up_s: float = 120.0
    rates: Rates = attrs.Factory(Rates)


@attrs.frozen
class Backends:
    directory: Directory
    bus: Bus
    archive: Archive
    presence: Presence
    revocations: Revocations
    tickets: Tickets
    feed: ArchiveFeed | None = None
    rate_limits: RateLimits | None = None
    """The shared buckets of the rate limits; None: each node limits alone."""
    push_gate: PushGate | None = None
    webhook: Webhook | None = None
    """Push notifications (``node/push.py``), with ``push_gate``; None: off."""
