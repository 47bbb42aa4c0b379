"""Service metrics of a simulated (or recorded) run: throughput, latency percentiles, SLO attainment, cost."""

from __future__ import annotations

import math
from typing import Sequence

from .core import STAGES, Shape
from .predictor import Predictor


def isolated_latency(world: Predictor, shape: Shape, kinds: Sequence[str]) -> float:
    """Seconds for one request alone on the cluster: each stage on its best device kind, dedicated."""
    return sum(min(world.latency(s, k, shape) for k in kinds if world.knows(s, k)) for s in STAGES)


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile; inf (unfinished requests) sorts last."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


def summarize(arrival_t: Sequence[float], done_t: Sequence[float], slo_s: Sequence[float], horizon_s: float,
              price_usd_h: float) -> dict:
    """Metrics of one run. Unfinished requests count as SLO misses with infinite latency.

    throughput_rps: requests finished inside [0, horizon] / horizon.
    usd_per_1k: the cluster's price over the horizon / requests finished inside it x 1000.
    """
    latencies = [d - a if not math.isnan(d) else math.inf for a, d in zip(arrival_t, done_t)]
    finished = sum(1 for d in done_t if not math.isnan(d) and d <= horizon_s)
    met = sum(1 for lat, slo in zip(latencies, slo_s) if lat <= slo)
    n = len(latencies)
    usd = price_usd_h * horizon_s / 3600
    return {
        "requests": n,
        "completed": sum(1 for d in done_t if not math.isnan(d)),
        "throughput_rps": finished / horizon_s,
        "p50_s": _finite(percentile(latencies, 50)),
        "p95_s": _finite(percentile(latencies, 95)),
        "p99_s": _finite(percentile(latencies, 99)),
        "slo_attainment": met / n if n else math.nan,
        "usd_per_1k": usd / finished * 1000 if finished else None,
    }


def crossing(points: Sequence[tuple[float, float]], level: float) -> float:
    """Largest x at which y (falling with x) is still >= level, linearly interpolated; 0 if never."""
    best = 0.0
    for (x0, y0), (x1, y1) in zip(points, points[1:]):
        if y0 >= level > y1:
            best = x0 + (x1 - x0) * (y0 - level) / (y0 - y1)
    if points and points[-1][1] >= level:
        best = points[-1][0]
    elif points and all(y < level for _, y in points):
        best = 0.0
    return best


def _finite(x: float) -> float | None:
    return None if math.isinf(x) or math.isnan(x) else x
