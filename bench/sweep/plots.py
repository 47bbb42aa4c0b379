"""Plots of a `dfuse bench sweep` result (matplotlib, installed with the `bench` extra)."""

from __future__ import annotations

from pathlib import Path

from ...scheduler.core import FUSED
from ..lib.outputs import pyplot
from .report import layout_line

COLORS = {"mono": "#7f7f7f", "static": "#1f77b4", "elastic": "#2ca02c", "auto": "#9467bd"}
STAGE_COLORS = {"encoder": "#1f77b4", "dit": "#ff7f0e", "decoder": "#2ca02c", FUSED: "#9467bd"}
PERCENTILES = (("latency_p50_s", "p50", "-"), ("latency_p95_s", "p95", "--"), ("latency_p99_s", "p99", ":"))


def _by_mode(doc: dict) -> dict[str, list[dict]]:
    modes: dict[str, list[dict]] = {}
    for point in doc["points"]:
        modes.setdefault(point["mode"], []).append(point)
    return {m: sorted(ps, key=lambda p: p["rate_rps"]) for m, ps in modes.items()}


def plot_latency(doc: dict, out: Path) -> Path:
    """Latency percentiles, SLO attainment and throughput against the arrival rate, per mode."""
    plt = pyplot()
    fig, (latency, slo, served) = plt.subplots(1, 3, figsize=(15, 4.2), constrained_layout=True)
    top = 0.0
    for mode, points in _by_mode(doc).items():
        rates, color = [p["rate_rps"] for p in points], COLORS.get(mode)
        for key, name, style in PERCENTILES:
            xy = [(p["rate_rps"], p[key]) for p in points if p[key] is not None]
            if xy:
                latency.plot(*zip(*xy), style, marker="o", ms=3, color=color, label=f"{mode} {name}")
        slo.plot(rates, [p["slo_attainment"] for p in points], "o-", ms=3, color=color, label=mode)
        served.plot([p["offered_rps"] for p in points], [p["throughput_rps"] or 0 for p in points], "o-", ms=3,
                    color=color, label=mode)
        top = max([top] + [p["offered_rps"] for p in points] + [p["throughput_rps"] or 0 for p in points])
    latency.set(xlabel="arrival rate (requests/s)", ylabel="latency (s)", yscale="log",
                title="latency percentiles vs rate")
    latency.legend(fontsize=7, ncol=len(_by_mode(doc)))
    slo.axhline(0.9, ls=":", color="black", lw=1)
    slo.set(xlabel="arrival rate (requests/s)", ylabel=f"SLO attainment (SLO = {doc['slo']['factor']:g}x isolated)",
            ylim=(0, 1.02), title="SLO attainment vs rate")
    slo.legend(fontsize=8)
    served.plot([0, top], [0, top], color="black", lw=0.8, ls=":", label="served = offered")
    served.set(xlabel="offered rate (requests/s, as sent)", ylabel="throughput (completed/s)",
               title="throughput vs offered rate")
    served.legend(fontsize=8)
    config = doc["config"]
    fig.suptitle(f"{config['model']}  |  {config['trace']} trace, {config['duration_s']:g} s per point  |  "
                 f"engine {layout_line(config)}", fontsize=9)
    return _save(plt, fig, out)


def plot_allocation(doc: dict, out: Path) -> Path:
    """Workers per stage over time (stacked areas, left axis) and requests queued per stage (lines,
    right axis): one row per engine mode, one column per rate; moves as red lines, phases dotted."""
    plt = pyplot()
    engine_modes = {m: ps for m, ps in _by_mode(doc).items() if m != "mono"}
    rates = sorted({p["rate_rps"] for ps in engine_modes.values() for p in ps})
    fig, axes = plt.subplots(len(engine_modes), len(rates), figsize=(4.2 * len(rates), 2.8 * len(engine_modes)),
                             squeeze=False, sharey=True, constrained_layout=True)
    workers = sum(doc["config"]["instances"].values())
    for row, (mode, points) in enumerate(engine_modes.items()):
        for point in points:
            ax = axes[row][rates.index(point["rate_rps"])]
            _allocation_panel(ax, point, doc["trace"]["phases"], workers, first_row=row == 0)
            ax.set_title(f"{mode} @ {point['rate_rps']:g} req/s ({len(point.get('moves') or [])} moves)", fontsize=9)
        axes[row][0].set_ylabel("workers")
    for ax in axes[-1]:
        ax.set_xlabel("time since the first arrival (s)")
    handles = [h for ax in (axes[0][-1], *axes[0][-1].figure.axes) for h in ax.get_legend_handles_labels()[0]]
    labels = [x for ax in (axes[0][-1], *axes[0][-1].figure.axes) for x in ax.get_legend_handles_labels()[1]]
    unique = dict(zip(labels, handles))
    fig.legend(unique.values(), unique.keys(), loc="outside lower center", ncol=len(unique), fontsize=7)
    fig.suptitle(f"{doc['config']['model']}: allocation and queues over time ({doc['config']['trace']} trace)",
                 fontsize=9)
    return _save(plt, fig, out)


def _allocation_panel(ax, point: dict, phases: list[dict], workers: int, first_row: bool) -> None:
    alloc = point["allocation"]
    stages = list(alloc["placement"])
    ax.stackplot(alloc["t_s"], [alloc["placement"][s] for s in stages], labels=[f"{s} workers" for s in stages],
                 colors=[STAGE_COLORS.get(s) for s in stages], alpha=0.35, step="post")
    queues = ax.twinx()
    for stage in alloc["queues"]:  # per stage (a fused worker takes from the encoder's)
        queues.plot(alloc["t_s"], alloc["queues"][stage], color=STAGE_COLORS.get(stage), lw=1.0, label=f"{stage} queue")
    for move in point.get("moves") or []:
        ax.axvline(move.get("t_point_s", move["t_s"]), color="#d62728", lw=0.8)
    for phase in phases[1:]:
        ax.axvline(phase["start_s"], color="black", lw=0.8, ls=":")
    if first_row and len(phases) > 1:
        for phase in phases:
            ax.text(phase["start_s"], workers + 0.1, phase["name"], fontsize=7, va="bottom")
    ax.set_ylim(0, workers + 0.8)
    top = max([max(q, default=0) for q in alloc["queues"].values()] + [1])
    queues.set_ylim(0, top * 1.15)
    queues.set_ylabel("requests queued (lines)", fontsize=7)
    queues.tick_params(labelsize=7)


def _save(plt, fig, out: Path) -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
