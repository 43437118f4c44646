"""Which connections a node takes: its caps per node, per user and per client address, and
the ``Origin`` of a WebSocket upgrade (docs/security.md, "Connections and memory").

Rules:

1. **Descriptors.** The node holds at most ``max_connections`` client sockets at once, HTTP
   and WebSocket alike; at the cap its listeners stop accepting until one closes
   (``edge/server.py``), so the kernel's backlog holds the rest and ``accept`` never fails
   with EMFILE. The default is the process's ``RLIMIT_NOFILE`` less ``fd_reserve``
   (:func:`connections_for_fds`): the reserve is for the backends' connections, the
   database files, the listeners and the log.
2. **WebSockets.** They take at most ``max_websockets`` of those sockets (default 90 %), so
   that REST calls, ``/healthz`` and the refusals themselves always find one: an upgrade over
   it gets 503 ``node_full`` with ``Retry-After``.
3. **Per user, per client address.** At most ``max_websockets_per_user`` WebSockets of one
   user and ``max_websockets_per_address`` of one client address (``Request.client``) on this
   node: 429 ``too_many_connections`` with ``Retry-After``. The caps are per node, not
   cluster-wide. Addresses of this host (loopback, a Unix-socket peer that named no client)
   are not capped per address: only local processes have them, and behind nginx every
   request names the real client's (``X-Real-IP``).
4. **Origin.** A browser names the page that opens a WebSocket in ``Origin``; an upgrade whose
   ``Origin`` is neither the request's own (its ``Host``) nor one of ``allowed_origins`` is
   refused with 403 ``origin_not_allowed`` before anything else, so a page elsewhere cannot
   join with the visitor's cookies or, in insecure mode, as anyone. A client that sends no
   ``Origin`` (the CLI, servers) is not a browser and is let through.

All of it is decided before the upgrade is answered, with no await between the check and the
count (:meth:`Admission.admit`).
"""

from __future__ import annotations

import ipaddress
import resource
from urllib.parse import urlsplit

import attrs

from chatnode.core import errors

CAP_RETRY_AFTER_S = 10.0
"""``Retry-After`` of a refusal over a user's or an address's cap: WebSockets last long."""
FULL_RETRY_AFTER_S = 5.0
"""``Retry-After`` of a refusal over the node's cap (nginx sends a retry to another node)."""
_DEFAULT_PORTS = {"http": 80, "https": 443, "ws": 80, "wss": 443}


def connections_for_fds(reserve: int) -> int:
    """Rule 1's default: the soft ``RLIMIT_NOFILE`` less ``reserve`` (at least 1)."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        soft = 1 << 20
    return max(1, soft - reserve)


@attrs.frozen
class Caps:
    max_connections: int
    max_websockets: int
    per_user: int
    per_address: int

    @classmethod
    def derive(
        cls,
        *,
        max_connections: int,
        fd_reserve: int,
        max_websockets: int,
        per_user: int,
        per_address: int,
    ) -> Caps:
        """The caps with the configured zeros (derive) replaced: ``max_connections`` from
        the descriptor limit (Rule 1), ``max_websockets`` as 90 % of it (Rule 2)."""
        connections = max_connections or connections_for_fds(fd_reserve)
        websockets = max_websockets or max(1, connections - max(1, connections // 10))
        return cls(connections, min(websockets, connections), per_user, per_address)


class Admission:
    """The WebSockets open on this node, counted per user and per client address (Rule 2,
    3). Single-threaded (the node's event loop): ``admit`` and ``release`` pair up."""

    def __init__(self, caps: Caps) -> None:
        self.caps = caps
        self.websockets = 0
        self.refused = 0
        self._users: dict[str, int] = {}
        self._addresses: dict[str, int] = {}

    def admit(self, user: str, address: str) -> None:
        """Count a WebSocket of ``user`` from ``address``, or raise ``Unavailable``
        (``node_full``) or ``TooManyConnections``; nothing is counted then."""
        caps = self.caps
        if self.websockets >= caps.max_websockets:
            self.refused += 1
            raise errors.Unavailable(
                f"this node holds its most WebSockets ({caps.max_websockets}); retry later",
                retry_after_s=FULL_RETRY_AFTER_S,
                code="node_full",
            )
        if self._users.get(user, 0) >= caps.per_user:
            self.refused += 1
            raise errors.TooManyConnections(
                f"user {user!r} has {caps.per_user} WebSockets open on this node, its most;"
                " close one first",
                retry_after_s=CAP_RETRY_AFTER_S,
            )
        capped = _capped_address(address)
        if capped and self._addresses.get(address, 0) >= caps.per_address:
            self.refused += 1
            raise errors.TooManyConnections(
                f"your address has {caps.per_address} WebSockets open on this node, its most;"
                " close one first",
                retry_after_s=CAP_RETRY_AFTER_S,
            )
        self.websockets += 1
        self._users[user] = self._users.get(user, 0) + 1
        if capped:
            self._addresses[address] = self._addresses.get(address, 0) + 1

    def release(self, user: str, address: str) -> None:
        """The WebSocket ``admit`` counted has ended."""
        self.websockets -= 1
        _decrement(self._users, user)
        if _capped_address(address):
            _decrement(self._addresses, address)


def _decrement(counts: dict[str, int], key: str) -> None:
    left = counts.get(key, 0) - 1
    if left > 0:
        counts[key] = left
    else:
        counts.pop(key, None)


def _capped_address(address: str) -> bool:
    """Rule 3: every address but this host's own."""
    if address in ("", "unix"):
        return False
    try:
        return not ipaddress.ip_address(address).is_loopback
    except ValueError:
        return True


def parse_origins(text: str) -> frozenset[str]:
    """``CHATNODE_ALLOWED_ORIGINS``: comma-separated ``scheme://host[:port]``, or ``*``."""
    return frozenset(_normal(part) for part in text.split(",") if part.strip())


def check_origin(headers: dict[str, str], allowed: frozenset[str]) -> None:
    """Rule 4: raise ``Forbidden`` (``origin_not_allowed``) for an upgrade a page of another
    origin opens."""
    origin = headers.get("origin")
    if origin is None or "*" in allowed or _normal(origin) in allowed:
        return
    if not same_origin(origin, headers.get("host", "")):
        raise errors.Forbidden(
            f"a page of origin {origin[:100]!r} may not open WebSockets here (allowed: this"
            " host, and CHATNODE_ALLOWED_ORIGINS)",
            code="origin_not_allowed",
        )


def same_origin(origin: str, host: str) -> bool:
    """Whether ``origin`` names the host the request was sent to (``Host``). A ``Host``
    without a port (a proxy such as nginx's ``$host`` leaves it out) matches the origin's
    host name on any port; with a port, host and port must both match (the origin's port
    is its scheme's default when it names none)."""
    try:
        parts = urlsplit(origin.strip())
        origin_host, origin_port = parts.hostname, parts.port
        target = urlsplit("//" + host.strip())
        host_name, host_port = target.hostname, target.port
    except ValueError:
        return False
    if not origin_host or not host_name or parts.scheme not in _DEFAULT_PORTS:
        return False
    if origin_host != host_name:
        return False
    if host_port is None:
        return True
    return (origin_port or _DEFAULT_PORTS[parts.scheme]) == host_port


def _normal(origin: str) -> str:
    return origin.strip().rstrip("/").lower()
