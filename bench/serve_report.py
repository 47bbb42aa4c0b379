"""The numbers `dfuse bench serve` and `dfuse bench serve-overhead` report, from request records:
plain functions over plain data (no HTTP, no processes), so the unit tests check them directly.

Latencies are in milliseconds: the overhead the server adds to an image is a few ms, which
seconds rounded to 4 digits would still show, but ms read at a glance. A request's latency runs
from its submission (the HTTP request sent, or Engine.submit called) to its answer received
and checked, as vLLM's `bench serve` measures end-to-end latency; the driver's lateness against
the trace is reported apart (submit lag).
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from .lib.load import UNFINISHED

PERCENTILES = (50, 95, 99)
SUMMARY_COLUMNS = (
    "rate_rps", "trace", "submitted", "completed", "failed", "unfinished", "offered_rps", "throughput_rps",
    "images_per_s", "latency_p50_ms", "latency_p95_ms", "latency_p99_ms", "latency_mean_ms", "slo_attainment",
    "goodput_rps", "submit_lag_max_ms", "errors",
)
OVERHEAD_COLUMNS = (
    "phase", "rate_rps", "side", "requests", "completed", "latency_p50_ms", "latency_p95_ms", "latency_p99_ms",
    "latency_mean_ms", "images_per_s", "p50_overhead_ms", "p95_overhead_ms", "paired_median_overhead_ms",
    "other_processes_cpu_share",
)


@dataclass
class Record:
    """One request; times in seconds from its run's start (the trace's t = 0)."""

    kind: str
    arrival_s: float
    submitted_s: float | None = None
    done_s: float | None = None
    status: int | None = None  # the HTTP status; None for the in-process engine, or when no answer came
    error: str | None = None  # None: served (HTTP 200 with its images checked, or the engine's result)
    images: int = 1

    @property
    def ok(self) -> bool:
        return self.error is None and self.submitted_s is not None and self.done_s is not None

    @property
    def latency_ms(self) -> float | None:
        return 1000.0 * (self.done_s - self.submitted_s) if self.ok else None


def error_class(record: Record) -> str | None:
    """What a failed request is counted under: its HTTP status ("429", "503"), "bad_output" (a 200
    whose body is not the images asked for), "unfinished" (no answer by the drain limit) or the
    client's exception type (ConnectError, ReadTimeout; the engine's RequestFailed). None: served."""
    if record.ok:
        return None
    error = record.error or "no answer"
    if error.startswith(UNFINISHED):
        return "unfinished"
    if record.status == 200:
        return "bad_output"
    if record.status is not None:
        return str(record.status)
    return error.split(":", 1)[0].strip() or "error"


def percentiles(values: Sequence[float], qs: Iterable[float] = PERCENTILES) -> list[float | None]:
    """numpy's linear-interpolation percentiles (what vLLM's bench reports); None for no values."""
    qs = list(qs)
    if not len(values):
        return [None] * len(qs)
    return [float(x) for x in np.percentile(np.asarray(values, dtype=float), qs)]


def latency_stats(latencies_ms: Sequence[float]) -> dict:
    p50, p95, p99 = percentiles(latencies_ms)
    mean = float(np.mean(latencies_ms)) if len(latencies_ms) else None
    return {"latency_p50_ms": _round(p50), "latency_p95_ms": _round(p95), "latency_p99_ms": _round(p99),
            "latency_mean_ms": _round(mean), "latency_max_ms": _round(max(latencies_ms, default=None))}


def slo_met(record: Record, slo_ms: dict[str, float]) -> bool:
    return record.ok and record.latency_ms <= slo_ms[record.kind]


def summarize(records: Sequence[Record], duration_s: float, slo_ms: dict[str, float] | None = None) -> dict:
    """One run's throughput, latency percentiles, SLO attainment and errors by class.

    Throughput counts what was served over the span from the trace's start to the last answer
    (a run that falls behind takes longer than its trace). SLO attainment is the share of all
    submitted requests served within their kind's SLO: failed and unfinished ones are misses."""
    served = [r for r in records if r.ok]
    classes = [error_class(r) for r in records]
    errors: dict[str, int] = {}
    examples: dict[str, str] = {}
    for record, cls in zip(records, classes):
        if cls is not None:
            errors[cls] = errors.get(cls, 0) + 1
            examples.setdefault(cls, record.error or "")
    span = max((r.done_s for r in served), default=0.0)
    lags = [r.submitted_s - r.arrival_s for r in records if r.submitted_s is not None]
    within = [r for r in served if slo_ms is not None and slo_met(r, slo_ms)]
    doc = {
        "submitted": len(records),
        "completed": len(served),
        "failed": sum(c not in (None, "unfinished") for c in classes),
        "unfinished": errors.get("unfinished", 0),
        "errors_by_status": dict(sorted(errors.items(), key=lambda kv: (-kv[1], kv[0]))),
        "error_examples": examples,
        "offered_rps": _round(len(records) / duration_s, 3) if duration_s > 0 else None,
        "throughput_rps": _round(len(served) / span, 3) if span else None,
        "images_per_s": _round(sum(r.images for r in served) / span, 3) if span else None,
        "span_s": _round(span, 3),
        **latency_stats([r.latency_ms for r in served]),
        "slo_attainment": _round(len(within) / len(records), 4) if slo_ms is not None and records else None,
        "goodput_rps": _round(len(within) / span, 3) if slo_ms is not None and span else None,
        "submit_lag_max_ms": _round(1000 * max(lags)) if lags else None,
    }
    kinds = list(dict.fromkeys(r.kind for r in records))
    if len(kinds) > 1:  # the shift trace: each phase's own numbers
        doc["by_kind"] = {k: _kind_summary([r for r in records if r.kind == k], slo_ms) for k in kinds}
    return doc


def _kind_summary(records: list[Record], slo_ms: dict[str, float] | None) -> dict:
    latencies = [r.latency_ms for r in records if r.ok]
    p50, p95 = percentiles(latencies, (50, 95))
    attainment = None if slo_ms is None else _round(sum(slo_met(r, slo_ms) for r in records) / len(records), 4)
    return {"submitted": len(records), "completed": len(latencies), "latency_p50_ms": _round(p50),
            "latency_p95_ms": _round(p95), "slo_attainment": attainment}


def overhead(http: Sequence[Record], engine: Sequence[Record]) -> dict:
    """What HTTP adds to the same requests through the in-process engine: the differences of the
    two sides' percentiles, and the median of the per-request differences (request i is the same
    prompt, seed and arrival on both sides; only requests both sides served are paired)."""
    http_ms = [r.latency_ms for r in http if r.ok]
    engine_ms = [r.latency_ms for r in engine if r.ok]
    (h50, h95), (e50, e95) = percentiles(http_ms, (50, 95)), percentiles(engine_ms, (50, 95))
    paired = [h.latency_ms - e.latency_ms for h, e in zip(http, engine) if h.ok and e.ok]
    median_pair, p95_pair = percentiles(paired, (50, 95))
    return {
        "p50_overhead_ms": _round(_minus(h50, e50)),
        "p95_overhead_ms": _round(_minus(h95, e95)),
        "paired_median_overhead_ms": _round(median_pair),
        "paired_p95_overhead_ms": _round(p95_pair),
        "pairs": len(paired),
    }


# --- CSV ---------------------------------------------------------------------------------------
def errors_text(errors_by_status: dict[str, int]) -> str:
    """{"429": 3, "unfinished": 1} -> "429:3;unfinished:1" (one CSV cell)."""
    return ";".join(f"{cls}:{n}" for cls, n in errors_by_status.items())


def summary_rows(doc: dict) -> list[dict]:
    """`dfuse bench serve`'s CSV: one row per rate."""
    rows = []
    for point in doc["points"]:
        row = {k: point.get(k) for k in SUMMARY_COLUMNS}
        row["trace"] = doc["config"]["trace"]
        row["errors"] = errors_text(point["errors_by_status"])
        rows.append(row)
    return rows


def overhead_rows(doc: dict) -> list[dict]:
    """`dfuse bench serve-overhead`'s CSV: per phase (isolated, then each rate) one row per side,
    the overhead columns on the http row."""
    rows = []
    for phase in doc["phases"]:
        for side in ("http", "engine"):
            stats = phase[side]
            row = {k: stats.get(k) for k in OVERHEAD_COLUMNS}
            row.update(phase=phase["phase"], rate_rps=phase.get("rate_rps"), side=side,
                       requests=stats["submitted"])
            if side == "http":
                row.update({k: phase["overhead"][k] for k in ("p50_overhead_ms", "p95_overhead_ms",
                                                               "paired_median_overhead_ms")})
            rows.append(row)
    return rows


def write_csv(out: Path, columns: Sequence[str], rows: list[dict]) -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(columns))
        writer.writeheader()
        for row in rows:
            writer.writerow({k: "" if row.get(k) is None else row.get(k) for k in columns})
    return out


def compact_requests(records: Sequence[Record]) -> dict:
    """Every request of a run as columns (a small JSON): kind, arrival, submit, latency, status."""
    kinds = list(dict.fromkeys(r.kind for r in records))
    return {
        "kinds": kinds,
        "kind": [kinds.index(r.kind) for r in records],
        "arrival_s": [round(r.arrival_s, 4) for r in records],
        "submitted_s": [None if r.submitted_s is None else round(r.submitted_s, 4) for r in records],
        "latency_ms": [None if r.latency_ms is None else round(r.latency_ms, 2) for r in records],
        "status": [r.status for r in records],
        "errors": {i: r.error for i, r in enumerate(records) if r.error is not None},
    }


def _minus(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a - b


def _round(x: float | None, digits: int = 2) -> float | None:
    return None if x is None else round(float(x), digits)
