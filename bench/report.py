"""The report of a run: the machine and code measured, the figures against their targets,
the markdown table and the p99 plot."""

from __future__ import annotations

import os
import platform
import statistics
import subprocess
from pathlib import Path
from typing import Any

from common import LOADGEN_CPUS, ROOT, SERVER_CPUS
from settings import P99_LIMIT_MS, TARGETS
from stats import fmt, ratio


def machine() -> dict[str, Any]:
    def cmd(*argv: str) -> str:
        try:
            out = subprocess.run(argv, capture_output=True, text=True, timeout=20, check=False)
            return (out.stdout or out.stderr).strip()
        except OSError:
            return ""

    model = ""
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            model = line.split(":", 1)[1].strip()
            break
    mem_kib = int(Path("/proc/meminfo").read_text().split()[1])
    pkgs = {}
    for name in ("picows", "websockets", "python-socketio", "uvicorn", "redis"):
        try:
            from importlib.metadata import version

            pkgs[name] = version(name)
        except Exception:
            pkgs[name] = "?"
    chatnode_py = ROOT / ".venv" / "bin" / "python"
    return {
        "cpu": model,
        "cores": os.cpu_count(),
        "memory_gib": round(mem_kib / 1024 / 1024, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "chatnode_deps": cmd(
            str(chatnode_py),
            "-c",
            "import importlib.metadata as m; print(', '.join(f'{p} '+m.version(p) "
            "for p in ('trio','h11','hiredis','elasticsearch')))",
        ),
        "nginx": cmd("nginx", "-v").replace("nginx version: ", ""),
        "redis": cmd("redis-server", "--version").split(" sha=")[0],
        "libwebsockets": cmd("dpkg-query", "-W", "-f=${Version}", "libwebsockets-test-server"),
        "bench_packages": pkgs,
        "server_cpus": sorted(SERVER_CPUS),
        "loadgen_cpus": sorted(LOADGEN_CPUS),
        "git": cmd("git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"),
    }


def code_state() -> dict[str, Any]:
    """The chatnode code measured: HEAD and a hash of uncommitted changes under chatnode/."""

    def git(*argv: str) -> str:
        out = subprocess.run(
            ["git", "-C", str(ROOT), *argv], capture_output=True, text=True, timeout=30, check=False
        )
        return out.stdout

    import hashlib

    diff = git("diff", "HEAD", "--", "chatnode")
    return {
        "head": git("rev-parse", "--short", "HEAD").strip(),
        # what is compared before and after a run: a commit of docs alone changes HEAD only
        "tree": git("rev-parse", "--short", "HEAD:chatnode").strip(),
        "dirty_files": [
            line[3:] for line in git("status", "--porcelain", "--", "chatnode").splitlines()
        ],
        "diff_sha1": hashlib.sha1(diff.encode()).hexdigest()[:12] if diff else None,
    }


def headline_step(agg: dict[str, dict[str, Any]], names: list[str], steps: list[int]) -> int:
    """The highest offered load every system of the comparison ran cleanly within the p99
    limit; else the lowest step."""
    best = steps[0]
    for offered in steps:
        ok = True
        for n in names:
            st = agg.get(n, {}).get("steps", {}).get(offered, {})
            if (
                not st.get("rounds")
                or st.get("p99_ms") is None
                or st["p99_ms"] > P99_LIMIT_MS
                or st["lost"]
                or st["dups"]
                or st["reorders"]
            ):
                ok = False
        if ok:
            best = offered
    return best


def figure_row(
    figure: str, target: str, value: str, met: bool | None, note: str = ""
) -> dict[str, Any]:
    """One row of the figures table: ``met`` None when the figure was not measured."""
    return {
        "figure": figure,
        "target": target,
        "value": value,
        "met": "met" if met else ("not met" if met is False else "not measured"),
        "note": note,
    }


def figures(
    agg: dict[str, Any], extras: dict[str, Any], mode_name: str, steps: list[int]
) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []

    def cpu(name: str, offered: int) -> float | None:
        return agg.get(name, {}).get("steps", {}).get(offered, {}).get("cpu_us_per_delivery")

    def row(figure: str, target: str, value: str, met: bool | None, note: str = "") -> None:
        rows.append(figure_row(figure, target, value, met, note))

    cl = ["chatnode-cluster", "websockets-ref", "python-socketio"]
    if all(n in agg for n in cl):
        h = headline_step(agg, cl, steps)
        ours, ws, sio = cpu(cl[0], h), cpu(cl[1], h), cpu(cl[2], h)
        r1, r2 = ratio(ours, ws), ratio(ours, sio)
        row(
            "server CPU per delivery, cluster vs websockets-ref",
            f"<= {TARGETS['cpu_vs_websockets']}x",
            f"{fmt(ours)} vs {fmt(ws)} us = {fmt(r1, 2)}x",
            None if r1 is None else r1 <= TARGETS["cpu_vs_websockets"],
            f"at {h}/s offered",
        )
        row(
            "server CPU per delivery, cluster vs python-socketio",
            f"<= {TARGETS['cpu_vs_socketio']}x",
            f"{fmt(ours)} vs {fmt(sio)} us = {fmt(r2, 2)}x",
            None if r2 is None else r2 <= TARGETS["cpu_vs_socketio"],
            f"at {h}/s offered",
        )
    else:
        row(
            "server CPU per delivery, cluster comparison",
            "<= 1.0x ws-ref, <= 0.33x socketio",
            "-",
            None,
            "a system of the comparison did not run",
        )
    sn = ["chatnode-single", "libwebsockets"]
    if all(n in agg for n in sn):
        h = headline_step(agg, sn, steps)
        ours, lws = cpu(sn[0], h), cpu(sn[1], h)
        r = ratio(ours, lws)
        row(
            "server CPU per delivery, single node vs libwebsockets",
            f"<= {TARGETS['cpu_single_vs_lws']}x",
            f"{fmt(ours)} vs {fmt(lws)} us = {fmt(r, 2)}x",
            None if r is None else r <= TARGETS["cpu_single_vs_lws"],
            f"at {h}/s offered, 3 rooms",
        )
    else:
        row(
            "server CPU per delivery, single node vs libwebsockets",
            "<= 1.5x",
            "-",
            None,
            "a system of the comparison did not run",
        )
    if "chatnode-cluster" in agg:
        k = agg["chatnode-cluster"]["knee"]
        kb = agg["chatnode-cluster"]["knee_is_lower_bound"]
        wk = agg.get("websockets-ref", {}).get("knee")
        wkb = agg.get("websockets-ref", {}).get("knee_is_lower_bound")
        value = f"{'>= ' if kb else ''}{k}/s (websockets-ref {'>= ' if wkb else ''}{wk}/s)"
        if k >= TARGETS["knee_min"] and (wk is None or k >= wk or kb):
            met: bool | None = True
        elif kb and k < TARGETS["knee_min"]:
            met = None  # the steps stopped below the target: not measured
        else:
            met = False
        row(
            "knee (p99 <= 100 ms, zero loss), cluster through nginx",
            f">= {TARGETS['knee_min']}/s and >= websockets-ref",
            value,
            met,
            f"steps {steps}"
            + (" (quick mode stops at 5k: run --full)" if mode_name == "quick" else ""),
        )
    idle = extras.get("idle", {})
    if idle.get("kib_per_connection") is not None:
        v = idle["kib_per_connection"]
        peers = ", ".join(
            f"{n} {fmt(d.get('kib_per_connection'))}"
            for n, d in extras.get("idle_peers", {}).items()
        )
        row(
            "memory per idle connection",
            f"<= {TARGETS['idle_kib']} KiB",
            f"{v:.1f} KiB",
            v <= TARGETS["idle_kib"],
            f"{idle['per_node']} per node x {idle['nodes']} nodes"
            + (f"; peers, KiB: {peers}" if peers else ""),
        )
    else:
        row("memory per idle connection", "<= 10 KiB", "-", None, extras.get("error", ""))
    rest = extras.get("rest", {})
    if rest.get("ratio_per_node_cpu") is not None:
        ngx = rest["nginx_return_200"]
        row(
            "GET /v1/chatrooms through nginx, per node process",
            f">= {TARGETS['rest_ratio']}x nginx return 200",
            f"{rest['rps_per_node_cpu']:.0f} vs {rest['nginx_rps_per_cpu']:.0f} req per CPU-second"
            f" = {rest['ratio_per_node_cpu']:.3f}x",
            rest["ratio_per_node_cpu"] >= TARGETS["rest_ratio"],
            f"per CPU-second: nodes' requests ÷ their CPU ({fmt(rest['node_cpu_us_per_request'], 0)}"
            f" us/request, /proc) vs nginx's (its req/s at least); raw, with both nodes and nginx"
            f" on CPU 0: all nodes {rest['chatrooms']['rps']:.0f} req/s, per node"
            f" {rest['per_node_rps']:.0f} = {rest['ratio_per_node']:.3f}x nginx's"
            f" {ngx['rps']:.0f} req/s (nginx used {fmt(rest.get('nginx_cores'), 2)} cores);"
            f" p99 {fmt(rest['chatrooms'].get('p99_ms'))} ms",
        )
    else:
        row(
            "GET /v1/chatrooms through nginx, per node process",
            ">= 0.05x",
            "-",
            None,
            str(rest.get("chatrooms", {}).get("error", "")),
        )
    join = extras.get("join", {})
    for key, label, tkey in (
        ("room_log", "Redis room log", "join_log_p99_ms"),
        ("elasticsearch", "Elasticsearch", "join_es_p99_ms"),
    ):
        j = join.get(key, {})
        p99 = j.get("latency_ms", {}).get("p99")
        if p99 is not None:
            row(
                f"join with 100 messages of history, from the {label}",
                f"p99 <= {TARGETS[tkey]:.0f} ms",
                f"p99 {p99:.1f} ms (p50 {j['latency_ms']['p50']:.1f})",
                p99 <= TARGETS[tkey] and j.get("failures", 0) == 0,
                f"room with {join['archived_messages']} archived",
            )
        else:
            row(
                f"join with 100 messages of history, from the {label}",
                f"p99 <= {TARGETS[tkey]:.0f} ms",
                "-",
                None,
            )
    s = extras.get("search", {})
    if s.get("added_p50_ms") is not None:
        row(
            "search through the API vs straight to Elasticsearch",
            f"<= {TARGETS['search_added_p50_ms']:.0f} ms added at p50",
            f"+{s['added_p50_ms']:.2f} ms ({s['api_p50_ms']:.2f} vs {s['es_p50_ms']:.2f})",
            s["added_p50_ms"] <= TARGETS["search_added_p50_ms"] and not s["errors"],
        )
    else:
        row(
            "search through the API vs straight to Elasticsearch", "<= 2 ms added at p50", "-", None
        )
    a = extras.get("archiver", {})
    if a.get("ratio_vs_raw") is not None:
        row(
            "archiver indexing rate vs Elasticsearch raw bulk",
            f">= {TARGETS['archiver_ratio']}x",
            f"{a['docs_per_s']:.0f} vs {a['raw_docs_per_s']:.0f} docs/s = "
            f"{a['ratio_vs_raw']:.2f}x"
            + (
                f" (median of {len(a['rounds'])} rounds: "
                + ", ".join(f"{x:.2f}x" for x in a["ratio_vs_raw_rounds"])
                + ")"
                if len(a.get("rounds", [])) > 1
                else ""
            )
            + f"; ES {extras['es_raw_bulk']['streams']} streams"
            f" (in ES afterwards: {a['indexed']} of {a['messages']})"
            + (
                f"; until 2026-12-07's method (5-95 % window vs raw runs never refreshed): "
                f"{statistics.median(old):.2f}x"
                if (
                    old := [
                        r["window_ratio_vs_raw_unrefreshed"]
                        for r in a.get("rounds", [])
                        if "window_ratio_vs_raw_unrefreshed" in r
                    ]
                )
                else ""
            ),
            a["ratio_vs_raw"] >= TARGETS["archiver_ratio"] and a["indexed"] >= a["messages"],
        )
    else:
        row("archiver indexing rate vs Elasticsearch raw bulk", ">= 0.8x", "-", None)
    return rows


def integrity_row(agg: dict[str, Any]) -> dict[str, Any]:
    bad = []
    for name, a in agg.items():
        for offered, st in a["steps"].items():
            if st.get("rounds") and (st["lost"] or st["dups"] or st["reorders"]):
                bad.append(
                    f"{name}@{offered}: lost {st['lost']} dup {st['dups']} reord {st['reorders']}"
                )
    ours_bad = [b for b in bad if b.startswith("chatnode")]
    return {
        "figure": "loss / duplication / reordering (every step)",
        "target": "0",
        "value": "0 for chatnode" if not ours_bad else "; ".join(ours_bad),
        "met": "met" if not ours_bad else "not met",
        "note": ("peers: " + "; ".join(b for b in bad if not b.startswith("chatnode")))
        if len(bad) > len(ours_bad)
        else "peers: 0",
    }


def markdown(result: dict[str, Any]) -> str:
    lines = []
    m = result["machine"]
    code = result.get("code", {})
    state = f"commit {code.get('head', m['git'])}" + (
        f" + uncommitted changes to {', '.join(code['dirty_files'])} (diff {code['diff_sha1']})"
        if code.get("dirty_files")
        else ""
    )
    lines.append(
        f"Run: `bench/run --{result['mode']}{' --messenger' if result.get('messenger') else ''}"
        f"{' --messenger-receipts' if result.get('receipts') else ''}` on {result['date']} ({state}); "
        f"{m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB, Linux {m['kernel']}; "
        f"servers pinned to CPU {m['server_cpus']}, load generator to CPU "
        f"{m['loadgen_cpus']}; nginx reaches the processes behind it over "
        f"{'Unix sockets' if result['settings'].get('upstream', 'tcp') == 'unix' else 'TCP'}."
    )
    lines.append("")
    lines.append("| figure | target | measured | |")
    lines.append("|---|---|---|---|")
    for r in result["figures"]:
        note = f" ({r['note']})" if r.get("note") else ""
        lines.append(f"| {r['figure']} | {r['target']} | {r['value']}{note} | {r['met']} |")
    if not result["fanout"]:  # e.g. bench/run --messenger alone
        if result.get("missing"):
            lines += ["", "Missing from this run: " + "; ".join(result["missing"]) + "."]
        return "\n".join(lines) + "\n"
    lines.append("")
    lines.append(
        "Fan-out per offered load (medians over rounds; CPU = server processes' "
        "utime+stime ÷ deliveries; infra = nginx + Redis):"
    )
    lines.append("")
    lines.append(
        "| system | offered deliveries/s | p50 ms | p99 ms | server CPU µs/delivery | "
        "+ infra µs | lost / dup / reord | load gen CPU | other CPU |"
    )
    lines.append("|---|---|---|---|---|---|---|---|---|")
    for name, a in result["fanout"].items():
        for offered, st in a["steps"].items():
            if not st.get("rounds"):
                lines.append(
                    f"| {name} | {offered} | - | - | - | - | {st.get('skipped', '')} | - | - |"
                )
                continue
            lines.append(
                f"| {name} | {offered} | {fmt(st['p50_ms'])} | {fmt(st['p99_ms'])} | "
                f"{fmt(st['cpu_us_per_delivery'])} | {fmt(st['infra_cpu_us_per_delivery'])} | "
                f"{st['lost']} / {st['dups']} / {st['reorders']} | "
                f"{st['loadgen_util'] * 100:.0f}% | {st['foreign_util'] * 100:.0f}% |"
            )
    lines.append("")
    knees = ", ".join(
        f"{n} {'>= ' if a['knee_is_lower_bound'] else ''}{a['knee']}/s"
        for n, a in result["fanout"].items()
    )
    be = [
        f"{fmt(st['backend_cpu_us_per_delivery'])} µs at {o}/s"
        for o, st in result["fanout"].get("chatnode-cluster", {}).get("steps", {}).items()
        if st.get("rounds")
    ]
    lines.append(
        f'Knees (p99 ≤ 100 ms, zero loss): {knees}. "other CPU": the busiest '
        "round's CPU of processes outside the benchmark (a noisy neighbour), in % of "
        "one core."
        + (
            f" Elasticsearch + MariaDB (unpinned, archiver and directory of "
            f"chatnode's cluster): {', '.join(be)} per delivery."
            if be
            else ""
        )
    )
    if result.get("missing"):
        lines.append("")
        lines.append("Missing from this run: " + "; ".join(result["missing"]) + ".")
    return "\n".join(lines) + "\n"


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, grid = plt.subplots(2, 2, figsize=(11, 8), sharex="col")
    groups = [
        (
            "cluster: 10 rooms x 100, 2 processes behind nginx + Redis",
            ["chatnode-cluster", "websockets-ref", "python-socketio"],
        ),
        ("single node: 3 rooms x 100, direct", ["chatnode-single", "libwebsockets"]),
    ]
    styles = {
        "chatnode-cluster": "o-",
        "chatnode-single": "o-",
        "websockets-ref": "s--",
        "python-socketio": "^--",
        "libwebsockets": "d--",
    }
    for col, (title, names) in enumerate(groups):
        for row_i, (key, label) in enumerate(
            (
                ("p99_ms", "p99 latency, ms (log)"),
                ("cpu_us_per_delivery", "server CPU, µs per delivery (log)"),
            )
        ):
            ax = grid[row_i][col]
            for n in names:
                a = result["fanout"].get(n)
                if not a:
                    continue
                xs, ys = [], []
                for offered, st in sorted(a["steps"].items(), key=lambda kv: int(kv[0])):
                    if st.get("rounds") and st.get(key) is not None:
                        xs.append(int(offered))
                        ys.append(max(st[key], 0.1))
                if xs:
                    ax.plot(xs, ys, styles.get(n, "o-"), label=n)
            if key == "p99_ms":
                ax.axhline(P99_LIMIT_MS, color="grey", lw=0.8, ls=":")
                ax.set_title(title, fontsize=9)
            else:
                ax.set_xlabel("offered deliveries/s (log)")
            ax.set_xscale("log")
            ax.set_yscale("log")
            for axis in (ax.xaxis, ax.yaxis):
                axis.set_major_locator(matplotlib.ticker.LogLocator(subs=(1.0, 2.0, 5.0)))
                axis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
                axis.set_minor_formatter(matplotlib.ticker.NullFormatter())
            ax.set_ylabel(label, fontsize=8)
            ax.grid(True, which="both", lw=0.3)
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=8)
    fig.suptitle(f"chatnode fan-out benchmark ({result['mode']}, {result['date']})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
