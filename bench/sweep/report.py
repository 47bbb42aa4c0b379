"""What `dfuse bench sweep` writes: one point's metrics from its request records, the JSON
document, the CSV and the markdown summary (plain functions over plain data, no processes)."""

from __future__ import annotations

import csv
import os
import platform
import subprocess
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from .traces import trace_phases
from ..lib.load import UNFINISHED
from ..lib.outputs import write_json
from ..lib.libraries import package_version
from ...engine.devices import host_memory_bytes

CSV_COLUMNS = (
    "mode", "rate_rps", "trace", "submitted", "completed", "failed", "unfinished", "offered_rps", "throughput_rps",
    "goodput_rps", "latency_p50_s", "latency_p95_s", "latency_p99_s", "latency_mean_s", "slo_attainment", "moves",
    "submit_lag_max_s", "other_processes_cpu_share", "leaked_processes", "leaked_segments",
)


@dataclass
class Record:
    """One request of a point, times in seconds from the point's start (the trace's t = 0)."""

    kind: str
    arrival_s: float
    submitted_s: float | None = None
    done_s: float | None = None
    error: str | None = None  # None: served and its output checked
    stages: dict | None = None  # engine modes: stage -> [waiting s, compute s]

    @property
    def latency_s(self) -> float | None:
        """Scheduled arrival -> result received: a late driver counts against the system (and is reported)."""
        return None if self.error is not None or self.done_s is None else self.done_s - self.arrival_s


def summarize(records: list[Record], slo_s: dict[str, float], duration_s: float) -> dict:
    """Throughput, latency percentiles and SLO attainment of one (mode, rate) point."""
    served = [r for r in records if r.latency_s is not None]
    unfinished = [r for r in records if r.error is not None and r.error.startswith(UNFINISHED)]
    failed = [r for r in records if r.error is not None and not r.error.startswith(UNFINISHED)]
    span = max((r.done_s for r in served), default=0.0)  # trace start -> last completion
    within = [r for r in served if r.latency_s <= slo_s[r.kind]]
    lags = [r.submitted_s - r.arrival_s for r in records if r.submitted_s is not None]
    errors: dict[str, int] = {}
    for r in failed + unfinished:
        errors[r.error] = errors.get(r.error, 0) + 1
    return {
        "submitted": len(records),
        "completed": len(served),
        "failed": len(failed),
        "unfinished": len(unfinished),
        "errors": dict(sorted(errors.items(), key=lambda kv: -kv[1])[:10]),
        "offered_rps": _round(len(records) / duration_s),
        "throughput_rps": _round(len(served) / span) if span else None,
        "goodput_rps": _round(len(within) / span) if span else None,
        "span_s": _round(span),
        **latency_stats([r.latency_s for r in served]),
        "slo_attainment": _round(len(within) / len(records)) if records else None,
        "by_kind": by_kind(records, slo_s),
        "submit_lag_p99_s": _round(float(np.percentile(lags, 99))) if lags else None,
        "submit_lag_max_s": _round(max(lags)) if lags else None,
        "stage_ms": stage_means(served),
    }


def latency_stats(latencies: list[float]) -> dict:
    if not latencies:
        return {"latency_p50_s": None, "latency_p95_s": None, "latency_p99_s": None, "latency_mean_s": None,
                "latency_max_s": None}
    p50, p95, p99 = np.percentile(latencies, [50, 95, 99])
    return {"latency_p50_s": _round(p50), "latency_p95_s": _round(p95), "latency_p99_s": _round(p99),
            "latency_mean_s": _round(np.mean(latencies)), "latency_max_s": _round(max(latencies))}


def by_kind(records: list[Record], slo_s: dict[str, float]) -> dict:
    """Per request kind: count, p50/p95 latency and SLO attainment (the shift trace's phases)."""
    out = {}
    for kind in dict.fromkeys(r.kind for r in records):
        mine = [r for r in records if r.kind == kind]
        latencies = [r.latency_s for r in mine if r.latency_s is not None]
        stats = latency_stats(latencies)
        out[kind] = {"submitted": len(mine), "completed": len(latencies),
                     "latency_p50_s": stats["latency_p50_s"], "latency_p95_s": stats["latency_p95_s"],
                     "slo_attainment": _round(sum(x <= slo_s[kind] for x in latencies) / len(mine))}
    return out


def stage_means(served: list[Record]) -> dict | None:
    """Engine modes: mean waiting and compute ms per stage (where the queue builds is the bottleneck)."""
    timed = [r.stages for r in served if r.stages]
    if not timed:
        return None
    stages = list(timed[0])
    return {s: {"wait_ms": _round(1000 * float(np.mean([t[s][0] for t in timed])), 2),
                "compute_ms": _round(1000 * float(np.mean([t[s][1] for t in timed])), 2)} for s in stages}


def compact_requests(records: list[Record], kinds: list[str]) -> dict:
    """Every request of a point as columns (small JSON): kind index, arrival, submit, latency."""
    index = {k: i for i, k in enumerate(kinds)}
    return {
        "kinds": kinds,
        "kind": [index[r.kind] for r in records],
        "arrival_s": [round(r.arrival_s, 4) for r in records],
        "submitted_s": [None if r.submitted_s is None else round(r.submitted_s, 4) for r in records],
        "latency_s": [None if r.latency_s is None else round(r.latency_s, 4) for r in records],
        "errors": {i: r.error for i, r in enumerate(records) if r.error is not None},
    }


def csv_row(doc: dict, point: dict) -> dict:
    row = {k: point.get(k) for k in CSV_COLUMNS}
    row["trace"] = doc["config"]["trace"]
    row["moves"] = len(point.get("moves") or [])
    row["leaked_processes"] = len(point.get("leaked_processes") or [])
    row["leaked_segments"] = len(point.get("leaked_segments") or [])
    return row


def write_csv(doc: dict, path: Path) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        for point in doc["points"]:
            writer.writerow(csv_row(doc, point))


def format_markdown(doc: dict) -> str:
    """The summary: what ran, the SLO reference, one row per mode x rate (and per kind for shift)."""
    config, slo = doc["config"], doc["slo"]
    lines = [
        f"# dfuse bench sweep: `{config['model']}`, {config['trace']} trace, {config['duration_s']:g} s per point",
        "",
        f"- engine: {layout_line(config)}; static and elastic use the same layout"
        + ("; auto places the pool itself" if "auto" in doc["modes"] else ""),
        f"- mono: {doc['modes'].get('mono', '(not run)')}",
        f"- SLO = {slo['factor']:g} x isolated latency ({slo['reference']}): "
        + ", ".join(f"{k} {v:.3f} s -> {slo['slo_s'][k]:.3f} s" for k, v in slo['isolated_latency_s'].items()),
        "- throughput = completed / (trace start -> last completion); latency = scheduled arrival -> result",
        "",
        "| mode | rate req/s | offered req/s | done / sent | failed | unfinished | throughput req/s | p50 s | p95 s "
        "| p99 s | SLO attainment | goodput req/s | moves |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for p in doc["points"]:
        lines.append(
            f"| {p['mode']} | {p['rate_rps']:g} | {_num(p['offered_rps'])} | {p['completed']} / {p['submitted']} "
            f"| {p['failed']} | {p['unfinished']} | {_num(p['throughput_rps'])} | {_num(p['latency_p50_s'])} "
            f"| {_num(p['latency_p95_s'])} | {_num(p['latency_p99_s'])} | {_num(p['slo_attainment'])} "
            f"| {_num(p['goodput_rps'])} | {len(p.get('moves') or [])} |"
        )
    kinds = list(slo["isolated_latency_s"])
    if len(kinds) > 1:
        lines += ["", "p95 latency s / SLO attainment per request kind:", "",
                  "| mode | rate req/s | " + " | ".join(kinds) + " |", "|---|---|" + "---|" * len(kinds)]
        for p in doc["points"]:
            cells = [f"{_num(p['by_kind'][k]['latency_p95_s'])} / {_num(p['by_kind'][k]['slo_attainment'])}"
                     if k in p["by_kind"] else "-" for k in kinds]
            lines.append(f"| {p['mode']} | {p['rate_rps']:g} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _instances(instances: dict) -> str:
    return ",".join(f"{s}={n}" for s, n in instances.items())


def layout_line(config: dict) -> str:
    """Where the engine's workers run: instances on a device (or one per stage), or a device pool
    and its placement, as `dfuse run` takes them (--devices cpu:0,cpu:1 --placement cpu:0=encoder+dit,...)."""
    placement = config.get("placement")
    if not placement:
        return f"{_instances(config['instances'])} on {config['devices']}"
    stages = ",".join(f"{d}={'+'.join(s)}" for d, s in placement.items())
    return (f"device pool {','.join(config['devices'])}, placement {stages} "
            f"({_instances(config['instances'])}, one worker per device and stage)")


def _num(x) -> str:
    if x is None:
        return "-"
    return f"{x:.3f}" if abs(x) < 10 else f"{x:.1f}"


def _round(x, digits: int = 4):
    return None if x is None else round(float(x), digits)


def document(config, info, kind_params, workloads, slo, points, modes, *, created, load_before, wall_s,
             command) -> dict:
    """The JSON-ready result of a sweep: config, machine, versions, trace, SLO reference, every point."""
    from ...engine.transport.shm_files import list_segments

    steps, size = config.steps or info.num_inference_steps, config.size or info.default_size
    phases, start = [], 0.0
    for phase in trace_phases(config.trace, config.duration_s, steps, size):
        phases.append({"name": phase.name, "start_s": start, "duration_s": phase.duration_s})
        start += phase.duration_s
    mono_info = modes.get("mono")
    return {
        "benchmark": "sweep",
        "created": created,
        "command": command,
        "config": {**asdict(config), "instances": dict(config.instances), "steps": steps, "size": size,
                   "devices": _devices(config.devices),
                   "placement": None if config.placement is None else {d: list(s) for d, s in config.placement.items()}},
        "machine": _machine(load_before),
        "versions": _versions(),
        "trace": {
            "name": config.trace, "phases": phases,
            "kinds": {k: {f: getattr(p, f) for f in ("num_inference_steps", "guidance_scale", "height", "width")}
                      for k, p in kind_params.items()},
            "requests_per_rate": {f"{w.rate:g}": len(w.params) for w in workloads},
            "interarrival_cv": {f"{w.rate:g}": w.interarrival_cv for w in workloads},
        },
        "modes": {m: (v["description"] if isinstance(v, dict) else v) for m, v in modes.items()},
        "mono": mono_info,
        "slo": slo,
        "points": points,
        "totals": {
            "submitted": sum(p["submitted"] for p in points),
            "completed": sum(p["completed"] for p in points),
            "failed": sum(p["failed"] for p in points),
            "unfinished": sum(p["unfinished"] for p in points),
            "leaked_processes": sorted({pid for p in points for pid in p.get("leaked_processes", [])}
                                       | set(slo["reference_engine"].get("leaked_processes", []))),
            "leaked_segments": sorted(set(list_segments(f"dfuse_{os.getpid()}_"))
                                      | {s for p in points for s in p.get("leaked_segments", [])}),
            "run_dir_left": (any(p.get("run_dir_left") for p in points)
                             or bool(slo["reference_engine"].get("run_dir_left"))),
        },
        "wall_s": round(wall_s, 1),
    }


def _devices(devices) -> str | dict | list:
    """The engine device (str), one per stage (dict), or the pool (list)."""
    if isinstance(devices, str):
        return devices
    return list(devices) if isinstance(devices, tuple) else dict(devices)


def _machine(load_before) -> dict:
    import torch

    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return {"cpu_count": os.cpu_count(), "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(), "gpus": gpus,
            "memory_gib": round(host_memory_bytes() / 2**30, 1),
            "loadavg_1_5_15_before": [round(x, 2) for x in load_before],
            "loadavg_1_5_15_after": [round(x, 2) for x in os.getloadavg()]}


def _versions() -> dict:
    import torch

    root = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=10).stdout.strip() or None
        dirty = bool(subprocess.run(["git", "-C", str(root), "status", "--porcelain"], capture_output=True,
                                    text=True, timeout=10).stdout.strip())
    except (OSError, subprocess.SubprocessError):
        commit, dirty = None, None
    return {"python": platform.python_version(), "torch": torch.__version__, "diffusers": package_version("diffusers"),
            "transformers": package_version("transformers"), "dfuse": package_version("dfuse"), "git_commit": commit,
            "git_dirty": dirty}


def write_outputs(doc: dict, out: Path, plots: bool) -> list[Path]:
    """sweep.json, sweep.csv, summary.md and (if `plots`) latency.png and allocation.png in `out`."""
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "sweep.json", doc, indent=1)
    write_csv(doc, out / "sweep.csv")
    (out / "summary.md").write_text(format_markdown(doc))
    written = [out / "sweep.json", out / "sweep.csv", out / "summary.md"]
    if plots:
        from .plots import plot_allocation, plot_latency

        written.append(plot_latency(doc, out / "latency.png"))
        if any(p["mode"] != "mono" for p in doc["points"]):
            written.append(plot_allocation(doc, out / "allocation.png"))
    return written
