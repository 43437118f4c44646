"""Small figures helpers shared by the scenarios and the report."""

from __future__ import annotations

import statistics


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
