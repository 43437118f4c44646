"""The messenger workload's figures against their targets, and its markdown section."""

from __future__ import annotations

from typing import Any

from settings import P99_LIMIT_MS, TARGETS
from stats import fmt, ratio

OURS, PEER = "chatnode-cluster", "websockets-ref"


def _step(run: dict[str, Any], offered: int) -> dict[str, Any]:
    for st in run.get("steps", []):
        if st["offered"] == offered and "skipped" not in st:
            return st
    return {}


def _cpu_step(run: dict[str, Any]) -> dict[str, Any]:
    """The step the CPU figure is taken at: the target's load if it ran, else the highest."""
    st = _step(run, TARGETS["messenger_at_msgs"])
    if st:
        return st
    ran = [s for s in run.get("steps", []) if "skipped" not in s]
    return ran[-1] if ran else {}


def _types(run: dict[str, Any]) -> str:
    ran = [s for s in run.get("steps", []) if "skipped" not in s]
    types = ran[-1].get("frame_types", {}) if ran else {}
    return ", ".join(f"{k} {v}" for k, v in sorted(types.items())) or "none"


def messenger_rows(m: dict[str, Any]) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []

    def row(figure: str, target: str, value: str, met: bool | None, note: str = "") -> None:
        rows.append(
            {
                "figure": figure,
                "target": target,
                "value": value,
                "met": "met" if met else ("not met" if met is False else "not measured"),
                "note": note,
            }
        )

    ours = m.get("systems", {}).get(OURS, {})
    at = TARGETS["messenger_at_msgs"]
    st = _step(ours, at)
    p99 = st.get("latency_ms", {}).get("p99")
    row(
        f"messenger: p99 at {at} msgs/s (2,000 /v1/connect users, 5,000 DMs, 200 groups)",
        f"<= {TARGETS['messenger_p99_ms']:.0f} ms, nothing lost",
        f"p99 {fmt(p99)} ms (p50 {fmt(st.get('latency_ms', {}).get('p50'))});"
        f" headline {ours.get('knee', '-')} msgs/s with p99 <= {P99_LIMIT_MS:.0f} ms"
        if st
        else "-",
        None
        if not st
        else (p99 is not None and p99 <= TARGETS["messenger_p99_ms"] and st["clean"]),
        ours.get("error", "")
        if not st
        else f"lost {st['lost']} dup {st['dups']} reord {st['reorders']}",
    )
    busy = m.get("busy_room", {})
    cs = _cpu_step(ours)
    mine, ref = cs.get("server_cpu_us_per_msg"), busy.get("cpu_us_per_message")
    r = ratio(mine, ref)
    row(
        "messenger: nodes' CPU per message vs a busy room's",
        f"<= {TARGETS['messenger_cpu_vs_busy_room']}x",
        f"{fmt(mine, 0)} vs {fmt(ref, 0)} us = {fmt(r, 2)}x" if r is not None else "-",
        None if r is None else r <= TARGETS["messenger_cpu_vs_busy_room"],
        (
            f"at {cs.get('offered')} msgs/s; busy room: {fmt(busy.get('cpu_us_per_delivery'))}"
            f" us/delivery x {busy.get('members')} members at"
            f" {busy.get('offered_deliveries_per_s')} deliveries/s, from {busy.get('source')}"
        )
        if r is not None
        else str(busy.get("error", ours.get("error", ""))),
    )
    return rows


def messenger_markdown(m: dict[str, Any]) -> str:
    w = m["workload"]
    lines = [
        f"Messenger (issue 16): {w['users']} users on one `/v1/connect` each, {w['dms']} DMs,"
        f" {w['groups']} private groups of {w['group_size']}; {m['mode']['step_s']:.0f} s per"
        " step; CPU per message = processes' utime+stime ÷ messages sent; deliveries = messages"
        " x members connected (sender included):",
        "",
        "| system | offered msgs/s | delivered msgs/s | deliveries/s | p50 ms | p99 ms |"
        " server CPU µs/msg (per node) | Redis µs/msg | nginx µs/msg | ES+MariaDB µs/msg |"
        " lost / dup / reord | load gen CPU | other CPU |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, run in m["systems"].items():
        if "error" in run:
            lines.append(f"| {name} | failed: {run['error']} |" + " |" * 11)
            continue
        for st in run["steps"]:
            if "skipped" in st:
                lines.append(f"| {name} | {st['offered']} | {st['skipped']} |" + " - |" * 10)
                continue
            lat = st["latency_ms"]
            lines.append(
                f"| {name} | {st['offered']} | {st['delivered_msgs_per_s']:.0f} |"
                f" {st['deliveries_per_s']:.0f} | {fmt(lat['p50'])} | {fmt(lat['p99'])} |"
                f" {st['server_cpu_us_per_msg']:.0f} ("
                + " + ".join(f"{x:.0f}" for x in st["node_cpu_us_per_msg"])
                + f") | {st['redis_cpu_us_per_msg']:.1f} | {st['nginx_cpu_us_per_msg']:.0f} |"
                f" {st.get('backend_cpu_us_per_msg', 0):.0f} |"
                f" {st['lost']} / {st['dups']} / {st['reorders']} |"
                f" {st['loadgen_cpu_util'] * 100:.0f}% | {st['foreign_util'] * 100:.0f}% |"
            )
    lines.append("")
    ours, peer = m["systems"].get(OURS, {}), m["systems"].get(PEER, {})
    ratios = []
    for st in ours.get("steps", []):
        ps = _step(peer, st["offered"])
        if "skipped" in st or not ps:
            continue
        ratios.append(
            f"{st['offered']}/s {fmt(ratio(st['server_cpu_us_per_msg'], ps['server_cpu_us_per_msg']), 2)}x"
            f" (+Redis {fmt(ratio(st['server_cpu_us_per_msg'] + st['redis_cpu_us_per_msg'], ps['server_cpu_us_per_msg'] + ps['redis_cpu_us_per_msg']), 2)}x)"
        )
    if ratios:
        lines.append("CPU per message, chatnode ÷ websockets-ref: " + ", ".join(ratios) + ".")
        lines.append("")
    for name, run in m["systems"].items():
        if "error" in run:
            continue
        red, setup, conn = run["redis"], run["setup"], run["connect"]
        subs = "; ".join(
            f"`{c['name'] or c['addr']}` sub={c['sub']} psub={c['psub']}"
            for c in red["pubsub"]["clients"]
        )
        lines.append(
            f"- {name}: setup {setup['total_s']:.1f} s ({setup['requests']} REST requests"
            + (
                f": users {setup['users_s']:.1f} s, rooms {setup['rooms_s']:.1f} s"
                if "rooms_s" in setup
                else ""
            )
            + f"); {conn['connected']} connections subscribed in {conn['elapsed_s']:.1f} s;"
            f" Redis pub/sub connections: {subs} ({red['pubsub']['channels']} channels);"
            f" Redis used_memory {red['before_connect']['used_memory'] / 2**20:.1f} →"
            f" {red['after_connect']['used_memory'] / 2**20:.1f} MiB on connecting (keys"
            f" {red['before_connect']['keys']} → {red['after_connect']['keys']}) ="
            f" {fmt(red['bytes_per_subscription'], 0)} B per subscription,"
            f" {fmt(red['overhead_bytes_per_subscription'], 0)} B of it outside the dataset;"
            f" new keys {red['new_keys']['count']} (~{red['new_keys']['estimated_bytes'] / 2**20:.1f}"
            f" MiB by MEMORY USAGE of {red['new_keys']['sampled']}), the rest ="
            f" {fmt(red['pubsub_bytes_per_subscription'], 0)} B per subscription;"
            f" servers idle with everyone connected: {run.get('idle_cores', 0) * 100:.1f} % of"
            f" a core; frames besides messages in the last step: {_types(run)}; headline"
            f" {run['knee']} msgs/s with p99 ≤ {P99_LIMIT_MS:.0f} ms and nothing lost."
        )
    busy = m.get("busy_room", {})
    if busy.get("cpu_us_per_message") is not None:
        lines.append(
            f"- busy-room reference ({busy['source']}): chatnode-cluster, 10 rooms x 100 at"
            f" {busy['offered_deliveries_per_s']} deliveries/s: {fmt(busy['cpu_us_per_delivery'])}"
            f" µs per delivery x {busy['members']} = {fmt(busy['cpu_us_per_message'], 0)} µs"
            " per message."
        )
    return "\n".join(lines) + "\n"
