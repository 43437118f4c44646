"""The messenger workload's receipts variant (issue 17, "Real parts and scale").

The messenger workload (``messenger.py``: 2,000 users on one ``/v1/connect`` each, 5,000 DMs,
200 private groups of 10) on chatnode's cluster, run twice per offered load on the same
connections: without receipts, and with them. With receipts every client acknowledges as a
messenger app does (``loadgen.py``, command ``receipts``): ``{"type": "received",
"chatroom", "offset"}`` for every message frame it gets, one each, not batched (its own
echo included: it is a message it got), and a per-connection timer sends ``{"type": "read",
"chatroom", "offset"}`` every ``read_s`` (1 s) for each room with something new, so every
message is read within a second. The ``receipt`` frames the nodes send back are counted and
otherwise ignored.

The two variants alternate per step and round (without/with, then with/without), so the
ratio comes from one invocation on one setup. Each step's window covers the sends, the
drain and a settle after it: at least ``settle_s``, then until the receipt frames and the
nodes' cursor writes stopped for 1.2 s (the last reads, the one-second cursor flush and the
coalesced receipts land inside the step's window, not in the next step's); both variants get
the same rule.

Per step and variant: delivered msgs/s, p50/p99, the nodes' CPU per message (each node),
Redis's, nginx's, MariaDB's (where the cursors are written) and Elasticsearch's (the archiver;
both shared services, unpinned); the directory writes from the nodes' ``/metrics``
(``chatnode_cursor_writes_total``: batches, ``chatnode_cursors_written_total``: rows, and
``chatnode_cursor_advances_total``), summed over the nodes, per second of the window; the
``received``/``read`` frames sent and ``receipt`` frames received per second.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from common import ROOT, Http, LoadGenProc, cpu_seconds, log, machine_busy_s
from messenger import MessengerCluster
from report import figure_row
from settings import MESSENGER_WORKLOAD, OVERLOAD_P99_MS, RECEIPTS_TARGET_AT, TARGETS
from stats import fmt, medians_by, ratio
from systems import HOST, Redis

VARIANTS = ("without", "with")
METRICS = (
    "chatnode_cursor_writes_total",
    "chatnode_cursors_written_total",
    "chatnode_cursor_advances_total",
)
COUNTERS = ("received_out", "read_out", "receipt_in", "error_in")


def service_pid(rel: str) -> list[int]:
    """The pid of a ``scripts/services`` service (``rel``: its pid file under the run dir)."""
    services = Path(os.environ.get("CHATNODE_SERVICES_RUN", ROOT / ".services"))
    try:
        pid = int((services / rel).read_text().strip())
    except (OSError, ValueError):
        return []
    return [pid] if Path(f"/proc/{pid}").exists() else []


def cursor_metrics(ports: list[int]) -> dict[str, float]:
    """The cursor counters of ``/metrics``, summed over the nodes (straight to each node)."""
    out = dict.fromkeys(METRICS, 0.0)
    for port in ports:
        status, body = Http(HOST, port, timeout=10).request("GET", "/metrics")
        if status != 200 or not isinstance(body, str):
            raise RuntimeError(f"GET /metrics on {port}: {status}")
        for line in body.splitlines():
            name, _, rest = line.partition("{")
            if name in out:
                out[name] += float(rest.rsplit(" ", 1)[1])
    return out


def settle(
    system: MessengerCluster, lg: LoadGenProc, least_s: float, most_s: float = 20.0
) -> float:
    """Wait ``least_s``, then until neither the receipt frames the clients got nor the cursors
    the nodes wrote moved for 1.2 s (the nodes flush every second), at most ``most_s``: a
    step's receipts must not spill into the next step's window. Returns the time waited."""
    t0 = time.monotonic()
    time.sleep(least_s)

    def probe() -> tuple[float, float]:
        m = cursor_metrics(system.node_ports)
        return lg.call({"cmd": "counters"})["receipt_in"], m["chatnode_cursors_written_total"]

    last, still_since = probe(), time.monotonic()
    while time.monotonic() - t0 < most_s:
        time.sleep(0.4)
        now = probe()
        if now != last:
            last, still_since = now, time.monotonic()
        elif time.monotonic() - still_since >= 1.2:
            break
    return time.monotonic() - t0


def _measure(
    system: MessengerCluster,
    redis: Redis,
    lg: LoadGenProc,
    offered: int,
    mode: dict[str, Any],
    seed: int,
    variant: str,
) -> dict[str, Any]:
    lg.call({"cmd": "receipts", "on": variant == "with", "read_s": mode["read_s"]})
    groups = system.node_pid_groups()
    nginx, rpids = system.nginx.pids(), redis.pids()  # type: ignore[union-attr]
    maria = service_pid("mariadb/mariadbd.pid")
    es = service_pid("elasticsearch/run/elasticsearch.pid")
    pidsets = {"nginx": nginx, "redis": rpids, "mariadb": maria, "es": es, "lg": [lg.pid]}
    c0 = {k: cpu_seconds(v) for k, v in pidsets.items()}
    n0 = [cpu_seconds(g) for g in groups]
    m0, k0 = cursor_metrics(system.node_ports), lg.call({"cmd": "counters"})
    all0, t0 = machine_busy_s(), time.monotonic()
    r = lg.call(
        {
            "cmd": "step",
            "rate_msgs": offered,
            "count": int(offered * mode["step_s"]),
            "drain_s": 5.0,
            "max_drain_s": 60.0,
            "shuffle": seed,
            "min_sleep_ms": 1.0,
        }
    )
    settled = settle(system, lg, mode["settle_s"])
    window = time.monotonic() - t0
    d_all = machine_busy_s() - all0
    d = {k: cpu_seconds(v) - c0[k] for k, v in pidsets.items()}
    d_nodes = [cpu_seconds(g) - c for g, c in zip(groups, n0, strict=True)]
    m1, k1 = cursor_metrics(system.node_ports), lg.call({"cmd": "counters"})
    system.check_alive()
    sent, wall = max(1, r["sent"]), r["wall_s"]
    fanout = r["expected"] / sent if r["expected"] else 0.0
    per_msg = {f"{k}_cpu_us_per_msg": v / sent * 1e6 for k, v in d.items() if k != "lg"}
    st = {
        "offered": offered,
        "variant": variant,
        **{k: r[k] for k in ("sent", "expected", "received", "lost", "dups", "reorders")},
        "wrong_room": r["wrong_room"],
        "frame_types": r["frame_types"],
        "latency_ms": r["latency_ms"],
        "wall_s": r["wall_s"],
        "window_s": window,
        "settle_s": settled,
        "delivered_msgs_per_s": (r["received"] / fanout / r["wall_s"]) if fanout else 0.0,
        "node_cpu_us_per_msg": [x / sent * 1e6 for x in d_nodes],
        "server_cpu_us_per_msg": sum(d_nodes) / sent * 1e6,
        **per_msg,
        # counts over the whole window (the settle included: what the step's messages caused)
        # per second of sending and draining; the cursor counters summed over the nodes
        **{f"{k.removeprefix('chatnode_')}_per_s": (m1[k] - m0[k]) / wall for k in METRICS},
        **{f"{k}_per_s": (k1[k] - k0[k]) / wall for k in COUNTERS},
        "errors_in": k1["error_in"] - k0["error_in"],
        "loadgen_cpu_util": d["lg"] / window,
        "foreign_util": max(0.0, d_all - sum(d_nodes) - sum(d.values())) / window,
    }
    st["clean"] = r["lost"] == 0 and r["dups"] == 0 and r["reorders"] == 0
    st["server_plus_cpu_us_per_msg"] = (
        st["server_cpu_us_per_msg"]
        + st["redis_cpu_us_per_msg"]
        + st["nginx_cpu_us_per_msg"]
        + st["mariadb_cpu_us_per_msg"]
    )
    lat = r["latency_ms"]
    log(
        f"  receipts {variant:7s} {offered:>5} msgs/s: delivered {st['delivered_msgs_per_s']:.0f}"
        f" p50 {fmt(lat['p50'])} p99 {fmt(lat['p99'])} ms; nodes"
        f" {st['server_cpu_us_per_msg']:.0f} us/msg ("
        + " + ".join(f"{x:.0f}" for x in st["node_cpu_us_per_msg"])
        + f"), redis {st['redis_cpu_us_per_msg']:.1f}, nginx {st['nginx_cpu_us_per_msg']:.0f},"
        f" mariadb {st['mariadb_cpu_us_per_msg']:.0f}, es {st['es_cpu_us_per_msg']:.0f};"
        f" dir writes {st['cursor_writes_total_per_s']:.1f}/s"
        f" ({st['cursors_written_total_per_s']:.0f} rows/s, advances"
        f" {st['cursor_advances_total_per_s']:.0f}/s); received {st['received_out_per_s']:.0f}/s"
        f" read {st['read_out_per_s']:.0f}/s receipt frames {st['receipt_in_per_s']:.0f}/s"
        f" errors {st['errors_in']}; settle {settled:.1f}s; lost {r['lost']} dup {r['dups']} reord {r['reorders']};"
        f" loadgen {st['loadgen_cpu_util']:.0%} other {st['foreign_util']:.0%}"
    )
    return st


def run_receipts(
    system: MessengerCluster, workload: dict[str, int], mode: dict[str, Any], redis: Redis
) -> dict[str, Any]:
    out: dict[str, Any] = {"system": system.name, "workload": workload, "steps": []}
    t0 = time.monotonic()
    system.start()
    lg: LoadGenProc | None = None
    try:
        specs, setup = system.prepare_messenger(workload)
        out["setup"] = setup
        log(f"  receipts: setup {setup['total_s']:.1f}s, {len(specs)} connections to open")
        lg = LoadGenProc()
        conn = lg.call({"cmd": "connect", "clients": specs, "concurrency": 64, "timeout_s": 120})
        out["connect"] = conn
        if conn["failed"]:
            raise RuntimeError(f"{conn['failed']} clients did not connect: {conn['errors']}")
        log(f"  receipts: {conn['connected']} connected in {conn['elapsed_s']:.1f}s")
        for on in (False, True):  # warm both paths, discarded
            lg.call({"cmd": "receipts", "on": on, "read_s": mode["read_s"]})
            lg.call(
                {
                    "cmd": "step",
                    "rate_msgs": mode["steps"][0],
                    "count": int(mode["steps"][0] * mode["warmup_s"]),
                    "drain_s": 3.0,
                    "shuffle": 0,
                    "min_sleep_ms": 1.0,
                }
            )
            settle(system, lg, mode["settle_s"])
        seed = 0
        for rnd in range(mode["rounds"]):
            skip = None
            for i, offered in enumerate(mode["steps"]):
                order = VARIANTS if (rnd + i) % 2 == 0 else VARIANTS[::-1]
                for variant in order:
                    if skip:
                        row = {"round": rnd + 1, "offered": offered, "variant": variant}
                        out["steps"].append({**row, "skipped": skip})
                        continue
                    seed += 1
                    st = _measure(system, redis, lg, offered, mode, seed, variant)
                    st["round"] = rnd + 1
                    out["steps"].append(st)
                    if (st["latency_ms"]["p99"] or 0) > OVERLOAD_P99_MS or st["lost"] > 0:
                        skip = f"overloaded at {offered}/s {variant} receipts"
        lg.call({"cmd": "receipts", "on": False})
    finally:
        if lg is not None:
            lg.close()
        system.stop()
    out["summary"] = summarize(out["steps"], mode["steps"])
    out["elapsed_s"] = time.monotonic() - t0
    return out


def summarize(steps: list[dict[str, Any]], offered: list[int]) -> dict[str, Any]:
    """Per offered load and variant, medians over rounds; the ratios with ÷ without."""
    keys = (
        "server_cpu_us_per_msg",
        "server_plus_cpu_us_per_msg",
        "redis_cpu_us_per_msg",
        "mariadb_cpu_us_per_msg",
        "cursor_writes_total_per_s",
        "cursors_written_total_per_s",
        "receipt_in_per_s",
        "delivered_msgs_per_s",
    )
    out: dict[str, Any] = {}
    for o in offered:
        per: dict[str, Any] = medians_by(steps, o, "variant", VARIANTS, keys)
        if len(per) == 2:
            per["cpu_ratio"] = ratio(
                per["with"]["server_cpu_us_per_msg"], per["without"]["server_cpu_us_per_msg"]
            )
            per["cpu_plus_ratio"] = ratio(
                per["with"]["server_plus_cpu_us_per_msg"],
                per["without"]["server_plus_cpu_us_per_msg"],
            )
        out[str(o)] = per
    return out


def run_receipts_all(redis: Redis, make_cluster: Any, mode: dict[str, Any]) -> dict[str, Any]:
    log(
        f"messenger receipts: chatnode-cluster ({mode['steps']} msgs/s x {mode['rounds']}"
        f" round(s), {mode['step_s']}s each, without and with receipts)"
    )
    res: dict[str, Any] = {"workload": MESSENGER_WORKLOAD, "mode": mode}
    try:
        res["run"] = run_receipts(make_cluster(messenger=True), MESSENGER_WORKLOAD, mode, redis)
    except Exception as exc:
        res["error"] = f"{type(exc).__name__}: {exc}"
        log(f"messenger receipts FAILED: {exc}")
    return res


# -- report ----------------------------------------------------------------------------------


def receipts_rows(res: dict[str, Any]) -> list[dict[str, Any]]:
    at = RECEIPTS_TARGET_AT
    per = res.get("run", {}).get("summary", {}).get(str(at), {})
    r, target = per.get("cpu_ratio"), TARGETS["receipts_cpu_ratio"]
    w, wo = per.get("with", {}), per.get("without", {})
    summary = res.get("run", {}).get("summary", {})
    others = ", ".join(
        f"{o}/s {fmt(x.get('cpu_ratio'), 2)}x" for o, x in summary.items() if "cpu_ratio" in x
    )
    return [
        figure_row(
            f"messenger receipts: nodes' CPU per message with ÷ without receipts at {at} msgs/s",
            f"<= {target:.2f}x",
            f"{fmt(w.get('server_cpu_us_per_msg'), 0)} ÷ {fmt(wo.get('server_cpu_us_per_msg'), 0)}"
            f" µs = {fmt(r, 2)}x"
            if r is not None
            else "-",
            None if r is None else r <= target,
            f"p99 {fmt(w.get('p99_ms'))} ms with, {fmt(wo.get('p99_ms'))} without; directory"
            f" writes {fmt(w.get('cursor_writes_total_per_s'))}/s"
            f" ({fmt(w.get('cursors_written_total_per_s'), 0)} cursors/s); every step: {others}"
            if r is not None
            else str(res.get("error", "")),
        )
    ]


def receipts_markdown(res: dict[str, Any]) -> str:
    if "error" in res:
        return f"Messenger receipts variant: failed: {res['error']}\n"
    run, mode = res["run"], res["mode"]
    lines = [
        f"Messenger receipts variant: {mode['step_s']:.0f} s per step, {mode['rounds']}"
        f" round(s); each step's window = sends + drain + settle (>= {mode['settle_s']:.1f} s,"
        " then until receipts and cursor writes stopped); CPU per message ="
        " utime+stime ÷ messages sent; counts (directory writes ="
        " `chatnode_cursor_writes_total` batches / `chatnode_cursors_written_total` rows, both"
        " nodes; frames) over the window ÷ the step's send + drain time:",
        "",
        "| round | offered msgs/s | receipts | delivered msgs/s | p50 ms | p99 ms |"
        " nodes CPU µs/msg (n1 + n2) | Redis µs/msg | nginx µs/msg | MariaDB µs/msg |"
        " ES µs/msg | dir writes/s (rows/s) | received / read sent/s | receipt frames/s |"
        " lost / dup / reord / errors | load gen CPU | other CPU |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for st in run["steps"]:
        head = f"| {st['round']} | {st['offered']} | {st['variant']} |"
        if "skipped" in st:
            lines.append(head + f" {st['skipped']} |" + " - |" * 13)
            continue
        lat = st["latency_ms"]
        lines.append(
            head + f" {st['delivered_msgs_per_s']:.0f} | {fmt(lat['p50'])} | {fmt(lat['p99'])} |"
            f" {st['server_cpu_us_per_msg']:.0f} ("
            + " + ".join(f"{x:.0f}" for x in st["node_cpu_us_per_msg"])
            + f") | {st['redis_cpu_us_per_msg']:.1f} | {st['nginx_cpu_us_per_msg']:.0f} |"
            f" {st['mariadb_cpu_us_per_msg']:.0f} | {st['es_cpu_us_per_msg']:.0f} |"
            f" {st['cursor_writes_total_per_s']:.1f} ({st['cursors_written_total_per_s']:.0f}) |"
            f" {st['received_out_per_s']:.0f} / {st['read_out_per_s']:.0f} |"
            f" {st['receipt_in_per_s']:.0f} |"
            f" {st['lost']} / {st['dups']} / {st['reorders']} / {st['errors_in']} |"
            f" {st['loadgen_cpu_util'] * 100:.0f}% | {st['foreign_util'] * 100:.0f}% |"
        )
    lines.append("")
    target = TARGETS["receipts_cpu_ratio"]
    for o, per in run["summary"].items():
        if "cpu_ratio" not in per:
            continue
        w, wo = per["with"], per["without"]
        lines.append(
            f"- {o} msgs/s (median of {w['rounds']}): nodes' CPU per message"
            f" {fmt(w['server_cpu_us_per_msg'], 0)} µs with receipts vs"
            f" {fmt(wo['server_cpu_us_per_msg'], 0)} without = **{fmt(per['cpu_ratio'], 2)}x**"
            f" (target ≤ {target:.2f}x); nodes + Redis + nginx + MariaDB"
            f" {fmt(w['server_plus_cpu_us_per_msg'], 0)} vs"
            f" {fmt(wo['server_plus_cpu_us_per_msg'], 0)} = {fmt(per['cpu_plus_ratio'], 2)}x;"
            f" p99 {fmt(w['p99_ms'])} vs {fmt(wo['p99_ms'])} ms; directory writes"
            f" {fmt(w['cursor_writes_total_per_s'])}/s ({fmt(w['cursors_written_total_per_s'], 0)}"
            f" cursors/s); receipt frames {fmt(w['receipt_in_per_s'], 0)}/s; delivered"
            f" {fmt(w['delivered_msgs_per_s'], 0)} msgs/s with, {fmt(wo['delivered_msgs_per_s'], 0)}"
            " without."
        )
    return "\n".join(lines) + "\n"
