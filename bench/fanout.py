"""Fan-out: one system under the open-loop load of the offered steps, and the medians over
rounds (latency, CPU per delivery, loss/duplication/reordering, the knee)."""

from __future__ import annotations

import time
from typing import Any

from common import LoadGenProc, backend_pids, cpu_seconds, log, machine_busy_s
from settings import OVERLOAD_P99_MS, P99_LIMIT_MS
from stats import fmt, median
from systems import System


def run_fanout(system: System, workload: dict[str, int], mode: dict[str, Any]) -> dict[str, Any]:
    """Start ``system``, connect every member, warm up, run the steps; return the figures."""
    members = workload["members"]
    out: dict[str, Any] = {"system": system.name, "workload": workload, "steps": []}
    t0 = time.monotonic()
    system.start()
    lg: LoadGenProc | None = None
    try:
        specs = system.prepare(workload["rooms"], members, workload["senders"])
        lg = LoadGenProc()
        conn = lg.call({"cmd": "connect", "clients": specs, "concurrency": 64, "timeout_s": 60})
        out["connect"] = conn
        if conn["failed"]:
            raise RuntimeError(
                f"{conn['failed']} of {len(specs)} clients did not connect: {conn['errors']}"
            )
        time.sleep(1.0)
        warm_rate = 1000 / members
        out["warmup"] = lg.call(
            {
                "cmd": "step",
                "rate_msgs": warm_rate,
                "count": int(warm_rate * mode["warmup_s"]),
                "drain_s": 3.0,
            }
        )
        skip_reason = None
        for offered in mode["steps"]:
            if skip_reason:
                out["steps"].append({"offered": offered, "skipped": skip_reason})
                continue
            rate = offered / members
            count = int(rate * mode["step_s"])
            servers, infra = system.server_pids(), system.infra_pids()
            c_srv, c_inf = cpu_seconds(servers), cpu_seconds(infra)
            c_nodes = [cpu_seconds(g) for g in system.node_pid_groups()]
            c_lg, c_all = cpu_seconds([lg.pid]), machine_busy_s()
            backends = backend_pids() if system.name == "chatnode-cluster" else []
            c_be = cpu_seconds(backends)
            r = lg.call(
                {
                    "cmd": "step",
                    "rate_msgs": rate,
                    "count": count,
                    "drain_s": 5.0,
                    "max_drain_s": 60.0,
                }
            )
            d_srv = cpu_seconds(servers) - c_srv
            d_inf = cpu_seconds(infra) - c_inf
            d_nodes = [
                cpu_seconds(g) - c for g, c in zip(system.node_pid_groups(), c_nodes, strict=True)
            ]
            d_lg, d_all = cpu_seconds([lg.pid]) - c_lg, machine_busy_s() - c_all
            d_be = cpu_seconds(backends) - c_be
            system.check_alive()
            received = max(1, r["received"])
            step = {
                "offered": offered,
                "msgs_per_s": rate,
                "messages": count,
                **r,
                "server_cpu_s": d_srv,
                "server_cpu_per_node_s": d_nodes,
                "infra_cpu_s": d_inf,
                "server_cpu_us_per_delivery": d_srv / received * 1e6,
                "infra_cpu_us_per_delivery": d_inf / received * 1e6,
                "server_util": d_srv / r["wall_s"],
                # CPU of everything else on the machine during the step (other users' work):
                # a noisy neighbour shows here.
                "foreign_util": max(0.0, d_all - d_srv - d_inf - d_lg - d_be) / r["wall_s"],
                # Elasticsearch + MariaDB (shared services, unpinned; chatnode cluster only)
                "backend_cpu_us_per_delivery": d_be / received * 1e6,
                "achieved_deliveries_per_s": r["received"] / r["wall_s"],
            }
            step["clean"] = r["lost"] == 0 and r["dups"] == 0 and r["reorders"] == 0
            out["steps"].append(step)
            lat = r["latency_ms"]
            log(
                f"  {system.name:17s} {offered:>6}/s  p50 {fmt(lat['p50'])} p99 {fmt(lat['p99'])}"
                f" ms  cpu {step['server_cpu_us_per_delivery']:.1f} us/delivery"
                f" (+infra {step['infra_cpu_us_per_delivery']:.1f})  lost {r['lost']} dup"
                f" {r['dups']} reord {r['reorders']}  loadgen {r['loadgen_cpu_util']:.0%}"
                f"  other {step['foreign_util']:.0%}"
            )
            if (lat["p99"] or 0) > OVERLOAD_P99_MS or r["lost"] > 0:
                skip_reason = (
                    f"overloaded at {offered}/s (p99 {fmt(lat['p99'])} ms, lost {r['lost']})"
                )
    finally:
        if lg is not None:
            lg.close()
        system.stop()
    out["elapsed_s"] = time.monotonic() - t0
    return out


def aggregate(runs: list[dict[str, Any]], steps: list[int]) -> dict[str, Any]:
    """Per offered load: medians over rounds, sums of loss/dup/reorder, the knee."""
    per_step: dict[int, dict[str, Any]] = {}
    for offered in steps:
        ran = [
            s for r in runs for s in r["steps"] if s["offered"] == offered and "skipped" not in s
        ]
        skipped = [
            s for r in runs for s in r["steps"] if s["offered"] == offered and "skipped" in s
        ]
        if not ran:
            per_step[offered] = {
                "offered": offered,
                "rounds": 0,
                "skipped": skipped[0]["skipped"] if skipped else "not run",
            }
            continue
        per_step[offered] = {
            "offered": offered,
            "rounds": len(ran),
            "skipped_rounds": len(skipped),
            "p50_ms": median([s["latency_ms"]["p50"] for s in ran]),
            "p99_ms": median([s["latency_ms"]["p99"] for s in ran]),
            "max_ms": median([s["latency_ms"]["max"] for s in ran]),
            "cpu_us_per_delivery": median([s["server_cpu_us_per_delivery"] for s in ran]),
            "infra_cpu_us_per_delivery": median([s["infra_cpu_us_per_delivery"] for s in ran]),
            "backend_cpu_us_per_delivery": median([s["backend_cpu_us_per_delivery"] for s in ran]),
            "server_util": median([s["server_util"] for s in ran]),
            "loadgen_util": median([s["loadgen_cpu_util"] for s in ran]),
            "foreign_util": max(s["foreign_util"] for s in ran),
            "achieved_deliveries_per_s": median([s["achieved_deliveries_per_s"] for s in ran]),
            "deliveries": sum(s["received"] for s in ran),
            "lost": sum(s["lost"] for s in ran),
            "dups": sum(s["dups"] for s in ran),
            "reorders": sum(s["reorders"] for s in ran),
            "disconnects": sum(s["disconnects"] for s in ran),
        }
    knee = 0
    for offered in steps:
        st = per_step[offered]
        if (
            st.get("rounds")
            and not st.get("skipped_rounds")
            and st["p99_ms"] is not None
            and st["p99_ms"] <= P99_LIMIT_MS
            and st["lost"] == 0
            and st["dups"] == 0
            and st["reorders"] == 0
        ):
            knee = offered
        else:
            break
    return {"steps": per_step, "knee": knee, "knee_is_lower_bound": knee == steps[-1]}
