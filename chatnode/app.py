"""The application: config -> backends (``wiring.py``) -> node -> edge, run and drained.

``wiring.py`` picks and builds the backends; this module builds the node and the edge on them.
``App.run`` owns everything in nested nurseries (node tasks, then the edge). ``request_stop``
(SIGTERM/SIGINT in the CLI, tests call it directly) drains: stop accepting, close WebSockets
with 4000 (reconnect elsewhere), wait for connections up to ``drain_timeout_s``, flush the
archiver, then cancel the node's tasks and close the backends.
"""

from __future__ import annotations

import functools
import logging
import os
import socket

import trio

from chatnode.config import Config, resolve_secret
from chatnode.edge import admission, http
from chatnode.edge.metrics import Metrics
from chatnode.edge.server import EdgeServer
from chatnode.edge.ws_writer import WsSettings
from chatnode.node.ratelimit import Rate, Rates
from chatnode.node.service import ChatNode
from chatnode.node.settings import NodeSettings
from chatnode.wire.frames import CloseCode
from chatnode.wire.http import TrustedProxies
from chatnode.wiring import open_backends

log = logging.getLogger(__name__)


def node_settings(config: Config, secret: str) -> NodeSettings:
    return NodeSettings(
        node_id=config.node_id or f"{socket.gethostname()}-{os.getpid()}",
        jwt_secret=secret,
        token_ttl_s=config.token_ttl_s,
        insecure=config.insecure,
        password_cost_log2=config.password_cost_log2,
        history_on_join=config.history_on_join,
        max_replay=config.max_replay,
        rate_messages_per_s=config.rate_messages_per_s,
        rate_burst=config.rate_burst,
        presence_ttl_s=config.presence_ttl_s,
        limits=config.limits,
        archive_linger_s=config.archive_linger_s,
        replay_page_messages=config.replay_page_messages,
        password_concurrency=config.password_concurrency,
        password_queue=config.password_queue,
        ticket_ttl_s=config.ticket_ttl_s,
        tickets_per_account=config.tickets_per_account,
        revocation_poll_s=config.revocation_poll_s,
        max_connection_rooms=config.max_connection_rooms,
        push_collapse_s=config.push_collapse_s,
        push_give_up_s=config.push_give_up_s,
        rates=rates(config),
    )


def rates(config: Config) -> Rates:
    return Rates(
        pings=Rate(config.rate_pings_per_s, config.rate_ping_burst),
        subscriptions=Rate(config.rate_subscribes_per_s, config.rate_subscribe_burst),
        typing_interval_s=config.typing_interval_s,
        room_creations=Rate.every(config.room_create_interval_s, config.room_create_burst),
        member_changes=Rate.every(config.member_change_interval_s, config.member_change_burst),
        logins_per_address=Rate.every(config.login_address_interval_s, config.login_address_burst),
        login_failures_per_account=Rate.every(
            config.login_failures_interval_s, config.login_failures_burst
        ),
        signups_per_address=Rate.every(
            config.signup_address_interval_s, config.signup_address_burst
        ),
    )


def connection_caps(config: Config) -> admission.Caps:
    """The node's connection caps, ``max_connections`` derived from ``RLIMIT_NOFILE`` unless
    set (``edge/admission.py``)."""
    return admission.Caps.derive(
        max_connections=config.max_connections,
        fd_reserve=config.fd_reserve,
        max_websockets=config.max_websockets,
        per_user=config.max_websockets_per_user,
        per_address=config.max_websockets_per_address,
    )


class App:
    def __init__(self, config: Config) -> None:
        self.config = config
        self._stop = trio.Event()
        self.node: ChatNode | None = None
        self.edge: EdgeServer | None = None

    def request_stop(self) -> None:
        self._stop.set()

    async def run(
        self, *, task_status: trio.TaskStatus[list[int]] = trio.TASK_STATUS_IGNORED
    ) -> None:
        config = self.config
        settings = node_settings(config, resolve_secret(config))
        if config.insecure:
            log.warning(
                "INSECURE MODE: anyone may join as any existing user with ?user=, and admin "
                "operations need no token. Do not expose this node."
            )
        async with open_backends(config, settings.node_id) as backends:
            node = self.node = ChatNode(settings, backends)
            metrics = Metrics()
            edge = self.edge = EdgeServer(
                node,
                http_limits=http.Limits(
                    max_header_bytes=config.max_header_bytes,
                    max_body_bytes=config.max_body_bytes,
                    handshake_timeout_s=config.handshake_timeout_s,
                    idle_timeout_s=config.idle_timeout_s,
                    max_json_depth=config.max_json_depth,
                ),
                ws_settings=WsSettings(
                    send_backlog_bytes=config.send_backlog_bytes,
                    max_message_bytes=config.max_message_bytes,
                    ping_interval_s=config.ws_ping_interval_s,
                    idle_timeout_s=config.ws_idle_timeout_s,
                    replay_timeout_s=config.replay_timeout_s,
                    allowed_origins=admission.parse_origins(config.allowed_origins),
                ),
                metrics=metrics,
                proxies=TrustedProxies.parse(config.trusted_proxies),
                caps=connection_caps(config),
            )
            async with trio.open_nursery() as node_nursery:
                await node_nursery.start(node.run)
                async with trio.open_nursery() as edge_nursery:
                    ports = await edge_nursery.start(
                        functools.partial(
                            edge.serve,
                            config.host,
                            config.port,
                            unix_socket=config.unix_socket,
                            unix_socket_mode=int(config.unix_socket_mode, 8),
                        )
                    )
                    log.info(
                        "chatnode %s listening on %s:%s%s (%s); at most %d connections,"
                        " %d of them WebSockets",
                        settings.node_id,
                        config.host,
                        ports[0],
                        f" and {config.unix_socket}" if config.unix_socket else "",
                        "embedded SQLite" if config.embedded else "cluster",
                        edge.admission.caps.max_connections,
                        edge.admission.caps.max_websockets,
                    )
                    task_status.started(ports)
                    await self._stop.wait()
                    log.info("draining: closing connections (up to %.1fs)", config.drain_timeout_s)
                    deadline = trio.current_time() + config.drain_timeout_s
                    edge.stop_accepting()
                    node.hub.close_all(CloseCode.SERVER_SHUTDOWN, "node shutting down; reconnect")
                    for member in list(edge.batcher.members):  # /v1/connect ones in no room too
                        member.close_nowait(
                            CloseCode.SERVER_SHUTDOWN, "node shutting down; reconnect"
                        )
                    edge_nursery.cancel_scope.deadline = deadline
                if node.archiver is not None:
                    with trio.move_on_at(deadline + 1.0):
                        await node.archiver.drain()
                node_nursery.cancel_scope.cancel()
        log.info("stopped")
