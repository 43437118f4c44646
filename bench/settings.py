"""What the benchmark runs and what it must meet: the modes, the workloads, the targets of
issue 5 (they live here and nowhere else: no unit test asserts a timing)."""

from __future__ import annotations

from typing import Any

MODES: dict[str, dict[str, Any]] = {
    "quick": {
        "steps": [1000, 5000],
        "step_s": 8.0,
        "rounds": 1,
        "warmup_s": 3.0,
        "idle_per_node": 1000,
        "history_msgs": 20_000,
        "archiver_rounds": 1,
        "join_samples": 100,
        "search_samples": 200,
        "rest_s": 5,
    },
    "full": {
        "steps": [1000, 5000, 20000, 40000],
        "step_s": 15.0,
        "rounds": 3,
        "warmup_s": 5.0,
        "idle_per_node": 5000,
        "history_msgs": 100_000,
        "archiver_rounds": 3,
        "join_samples": 300,
        "search_samples": 500,
        "rest_s": 10,
    },
}

CLUSTER_WORKLOAD = {"rooms": 10, "members": 100, "senders": 10}
SINGLE_WORKLOAD = {"rooms": 3, "members": 100, "senders": 10}
P99_LIMIT_MS = 100.0
OVERLOAD_P99_MS = 2000.0  # past this a step is overloaded and higher steps are skipped

TARGETS = {
    "cpu_vs_websockets": 1.0,
    "cpu_vs_socketio": 0.33,
    "cpu_single_vs_lws": 1.5,
    "knee_min": 40_000,
    "idle_kib": 10.0,
    "rest_ratio": 0.05,
    "join_log_p99_ms": 25.0,
    "join_es_p99_ms": 60.0,
    "search_added_p50_ms": 2.0,
    "archiver_ratio": 0.8,
    # the messenger workload (issue 16): p99 at this offered load, and the nodes' CPU per
    # message against today's per-message cost in a busy room (the fan-out's per delivery x
    # members, at MESSENGER_BUSY_ROOM_STEP deliveries/s)
    "messenger_p99_ms": 100.0,
    "messenger_at_msgs": 2000,
    "messenger_cpu_vs_busy_room": 1.5,
    # the messenger's receipts variant (issue 17): the nodes' CPU per message with receipts
    # (received for every message, read within 1 s) over without, at RECEIPTS_TARGET_AT
    "receipts_cpu_ratio": 1.30,
}
WORDS = [
    "apple",
    "banana",
    "cherry",
    "delta",
    "echo",
    "falcon",
    "garnet",
    "harbor",
    "indigo",
    "jasper",
    "kestrel",
    "lagoon",
    "marble",
    "nectar",
    "orchid",
    "pepper",
]


EXTRAS = ("archiver", "join", "search", "idle", "rest", "peers")
"""The extras on chatnode's cluster, in the order they run (``--extras`` picks some)."""


# The messenger workload (issue 16, "Scale"; ``bench/run --messenger``): users, each on one
# /v1/connect WebSocket; direct rooms; private groups of ``group_size`` (bench/messenger.py).
MESSENGER_WORKLOAD = {"users": 2000, "dms": 5000, "groups": 200, "group_size": 10}
MESSENGER_MODES: dict[str, dict[str, Any]] = {
    "quick": {"steps": [200, 1000, 2000], "step_s": 5.0, "warmup_s": 2.0},
    "full": {"steps": [200, 500, 1000, 2000, 3000], "step_s": 10.0, "warmup_s": 3.0},
}
MESSENGER_BUSY_ROOM_STEP = 5000  # the fan-out step (deliveries/s) of the busy-room reference

# The messenger's receipts variant (issue 17; ``bench/run --messenger-receipts``,
# bench/receipts.py): the messenger workload without and with receipts, alternating, on the
# same connections. ``settle_s``: the least time in each step's window after its drain (last
# reads, the nodes' 1 s cursor flush; then until receipts and cursor writes stopped);
# ``read_s``: each client's read timer.
RECEIPTS_MODES: dict[str, dict[str, Any]] = {
    "quick": {
        "steps": [500, 1000, 2000],
        "step_s": 5.0,
        "rounds": 1,
        "warmup_s": 2.0,
        "settle_s": 2.5,
        "read_s": 1.0,
    },
    "full": {
        "steps": [500, 1000, 2000],
        "step_s": 10.0,
        "rounds": 2,
        "warmup_s": 3.0,
        "settle_s": 2.5,
        "read_s": 1.0,
    },
}
RECEIPTS_TARGET_AT = 2000  # msgs/s: the step the headline ratio is taken at

# The messenger's push variant (issue 17; ``bench/run --messenger-push``, bench/push.py): 20 %
# of the users offline, the webhook off / up / down (refused) / hanging, alternating per round;
# ``collapse_s``: the nodes' CHATNODE_PUSH_COLLAPSE_S (and each step's settle after its drain);
# a step's send time is two windows or more.
PUSH_MODES: dict[str, dict[str, Any]] = {
    "quick": {
        "steps": [500, 1000],
        "step_s": 8.0,
        "rounds": 2,
        "warmup_s": 6.0,
        "collapse_s": 4.0,
    },
    "full": {
        "steps": [500, 1000, 2000],
        "step_s": 15.0,
        "rounds": 2,
        "warmup_s": 3.0,
        "collapse_s": 5.0,
    },
}
