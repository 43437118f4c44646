"""Small figures helpers shared by the scenarios and the report."""

from __future__ import annotations

import statistics
from collections.abc import Iterable
from typing import Any


def fmt(v: float | None, nd: int = 1) -> str:
    return "-" if v is None else f"{v:.{nd}f}"


def median(values: list[float]) -> float | None:
    vals = [v for v in values if v is not None]
    return statistics.median(vals) if vals else None


def pct(values: list[float], p: float) -> float | None:
    if not values:
        return None
    v = sorted(values)
    return v[min(len(v) - 1, int(p * len(v)))]


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def medians_by(
    steps: list[dict[str, Any]],
    offered: int,
    field: str,
    labels: Iterable[str],
    keys: Iterable[str],
) -> dict[str, dict[str, Any]]:
    """For one offered load, per label of ``field`` (a variant, a configuration): the
    medians over rounds of ``keys``, p50 and p99, the rounds, and whether every round was
    clean (nothing lost, duplicated, reordered or in the wrong room)."""
    keys = tuple(keys)
    per: dict[str, dict[str, Any]] = {}
    for label in labels:
        ran = [s for s in steps if s["offered"] == offered and s[field] == label and "sent" in s]
        if not ran:
            continue
        per[label] = {k: median([s[k] for s in ran]) for k in keys}
        per[label]["p99_ms"] = median([s["latency_ms"]["p99"] for s in ran])
        per[label]["p50_ms"] = median([s["latency_ms"]["p50"] for s in ran])
        per[label]["rounds"] = len(ran)
        per[label]["clean"] = all(s["clean"] and not s["wrong_room"] for s in ran)
    return per
