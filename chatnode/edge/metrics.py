"""Counters for ``/metrics`` (Prometheus text format)."""

from __future__ import annotations

from collections.abc import Callable, Mapping

import attrs

from chatnode.node.service import ChatNode


@attrs.define
class Metrics:
    http_requests: int = 0
    ws_accepted: int = 0
    draining: bool = False
    ws_closes: Mapping[int, int] = attrs.Factory(dict)
    """WebSocket closes the node started, by close code (the edge's ``WriteBatcher.closes``)."""
    ws_refused: Callable[[], int] = lambda: 0
    """Upgrades refused over a connection cap (``Admission.refused``)."""

    def render(self, node: ChatNode) -> str:
        hub = node.hub
        archiver = node.archiver
        values = [
            ("chatnode_http_requests_total", "counter", self.http_requests),
            ("chatnode_websocket_accepted_total", "counter", self.ws_accepted),
            ("chatnode_connections", "gauge", hub.connections),
            ("chatnode_rooms_subscribed", "gauge", hub.rooms),
            ("chatnode_deliveries_total", "counter", hub.deliveries),
            ("chatnode_history_loads_total", "counter", hub.history_loads_total),
            ("chatnode_archive_history_reads_total", "counter", hub.archive_reads),
            ("chatnode_history_holes_total", "counter", hub.history_holes),
            ("chatnode_archived_total", "counter", archiver.archived if archiver else 0),
            ("chatnode_archive_failures_total", "counter", archiver.failures if archiver else 0),
            ("chatnode_archive_refused_total", "counter", archiver.refused if archiver else 0),
            ("chatnode_archive_conflicts_total", "counter", archiver.conflicts if archiver else 0),
            ("chatnode_draining", "gauge", int(self.draining)),
            ("chatnode_login_failures_total", "counter", node.login_failures),
            ("chatnode_password_work_refused_total", "counter", node.passwords.refused),
            ("chatnode_revoked_connections_total", "counter", node.revoked_connections),
            ("chatnode_rooms_created_total", "counter", node.rooms_created),
        ]
        cursors = node.cursors  # node/receipts.py
        values += [
            ("chatnode_cursor_advances_total", "counter", cursors.advanced_total),
            ("chatnode_cursor_writes_total", "counter", cursors.writes_total),
            ("chatnode_cursors_written_total", "counter", cursors.written_total),
        ]
        push = node.push  # node/push.py
        values += [
            ("chatnode_push_sent_total", "counter", push.sent_total if push else 0),
            ("chatnode_push_failed_total", "counter", push.failed_total if push else 0),
            ("chatnode_push_dropped_total", "counter", push.dropped_total if push else 0),
        ]
        for name, value in node.limits.counters().items():
            values.append((f"chatnode_{name}", "counter", value))
        for name, value in node.backends.bus.counters().items():
            values.append(
                (f"chatnode_{name}", "counter" if name.endswith("_total") else "gauge", value)
            )
        values.append(("chatnode_websocket_refused_total", "counter", self.ws_refused()))
        lines = []
        for name, kind, value in values:
            lines += [f"# TYPE {name} {kind}", f'{name}{{node="{node.settings.node_id}"}} {value}']
        lines.append("# TYPE chatnode_websocket_closes_total counter")
        for code, count in sorted(self.ws_closes.items()):
            lines.append(
                f'chatnode_websocket_closes_total{{node="{node.settings.node_id}",code="{code}"}}'
                f" {count}"
            )
        return "\n".join(lines) + "\n"
