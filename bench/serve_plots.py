"""Plots of `dfuse bench serve` and `dfuse bench serve-overhead` results (matplotlib, the `bench` extra)."""

from __future__ import annotations

from pathlib import Path

from .lib.outputs import pyplot

from .serve_report import percentiles

SIDE_COLORS = {"http": "#d62728", "engine": "#1f77b4"}
PERCENTILE_STYLES = (("latency_p50_ms", "p50", "-"), ("latency_p95_ms", "p95", "--"), ("latency_p99_ms", "p99", ":"))


def plot_serve(doc: dict, out: Path) -> Path:
    """Latency percentiles, SLO attainment and images/s against the arrival rate."""
    plt = pyplot()
    points = sorted(doc["points"], key=lambda p: p["rate_rps"])
    rates = [p["rate_rps"] for p in points]
    fig, (latency, slo, served) = plt.subplots(1, 3, figsize=(15, 4.2), constrained_layout=True)
    for key, name, style in PERCENTILE_STYLES:
        xy = [(p["rate_rps"], p[key]) for p in points if p[key] is not None]
        if xy:
            latency.plot(*zip(*xy), style, marker="o", ms=3, color="#d62728", label=name)
    latency.set(xlabel="arrival rate (requests/s)", ylabel="latency (ms, sent -> answer)", yscale="log",
                title="latency percentiles vs rate")
    latency.legend(fontsize=8)
    if any(p["slo_attainment"] is not None for p in points):
        slo.plot(rates, [p["slo_attainment"] or 0 for p in points], "o-", ms=3, color="#d62728")
    slo.axhline(0.9, ls=":", color="black", lw=1)
    slo.set(xlabel="arrival rate (requests/s)", ylabel="SLO attainment", ylim=(0, 1.02),
            title=f"SLO attainment ({_slo_label(doc['slo'])})")
    offered = [p["offered_rps"] or 0 for p in points]
    served.plot(offered, [p["images_per_s"] or 0 for p in points], "o-", ms=3, color="#d62728", label="served")
    top = max(offered + [p["images_per_s"] or 0 for p in points] + [1e-9])
    served.plot([0, top], [0, top], color="black", lw=0.8, ls=":", label="served = offered")
    served.set(xlabel="offered rate (requests/s, as sent)", ylabel="images/s", title="throughput vs offered rate")
    served.legend(fontsize=8)
    config = doc["config"]
    fig.suptitle(f"dfuse bench serve {config['url']}  |  {config['trace']} trace  |  size {config['size'] or 'default'}, "
                 f"steps {config['steps'] or 'default'}", fontsize=9)
    return _save(plt, fig, out)


def _slo_label(slo: dict) -> str:
    if "factor" in slo:
        return f"{slo['factor']:g}x isolated latency"
    return ", ".join(f"{k} {v:g} ms" for k, v in slo["slo_ms"].items())


def plot_overhead(doc: dict, out: Path) -> Path:
    """Left: the isolated phase's latency distribution per side. Middle: p50 and p95 per phase and
    side. Right: the per-request overhead (http - engine, same request) per phase."""
    plt = pyplot()
    phases = doc["phases"]
    fig, (cdf, bars, paired) = plt.subplots(1, 3, figsize=(16, 4.4), constrained_layout=True)
    isolated = next((p for p in phases if p["phase"] == "isolated"), None)
    if isolated is not None:
        for side in ("http", "engine"):
            latencies = sorted(x for x in isolated["requests"][side][0]["latency_ms"] if x is not None)
            cdf.step(latencies, [(i + 1) / len(latencies) for i in range(len(latencies))], where="post",
                     color=SIDE_COLORS[side], label=f"{side} (p50 {isolated[side]['latency_p50_ms']:.1f} ms)")
        cdf.set(xlabel="latency (ms)", ylabel="share of requests", ylim=(0, 1.02),
                title=f"one at a time, alternating sides (p50 overhead {isolated['overhead']['p50_overhead_ms']:.2f} ms)")
        cdf.legend(fontsize=8)
    names = [p["phase"] for p in phases]
    width = 0.2
    for j, (side, key, hatch) in enumerate([("engine", "latency_p50_ms", ""), ("http", "latency_p50_ms", ""),
                                            ("engine", "latency_p95_ms", "//"), ("http", "latency_p95_ms", "//")]):
        values = [p[side][key] or 0 for p in phases]
        bars.bar([i + (j - 1.5) * width for i in range(len(phases))], values, width, color=SIDE_COLORS[side],
                 alpha=0.85 if key.endswith("p50_ms") else 0.45, hatch=hatch,
                 label=f"{side} {key.split('_')[1]}")
    for i, phase in enumerate(phases):
        o = phase["overhead"]["p50_overhead_ms"]
        if o is not None:
            top = max(phase[s]["latency_p95_ms"] or 0 for s in ("http", "engine"))
            bars.annotate(f"p50 +{o:.1f} ms" if o >= 0 else f"p50 {o:.1f} ms", (i, top), ha="center", va="bottom",
                          fontsize=7)
    highest = max([p[s]["latency_p95_ms"] or 0 for p in phases for s in ("http", "engine")] + [1.0])
    bars.set_xticks(range(len(phases)), names)
    bars.set(ylabel="latency (ms)", title="p50 / p95 latency per phase", ylim=(0, highest * 1.35))
    bars.legend(fontsize=7, ncol=4, loc="upper left")
    diffs = []
    for phase in phases:
        pairs = []
        for h_run, e_run in zip(phase["requests"]["http"], phase["requests"]["engine"]):
            pairs += [h - e for h, e in zip(h_run["latency_ms"], e_run["latency_ms"]) if h is not None and e is not None]
        diffs.append(pairs or [0.0])
    paired.boxplot(diffs, tick_labels=names, showfliers=False)
    paired.axhline(0, color="black", lw=0.8)
    paired.axhline(doc["target"]["p50_overhead_ms_max"], color="#2ca02c", lw=0.8, ls="--", label="target p50 5 ms")
    medians = [percentiles(d, (50,))[0] for d in diffs]
    paired.plot(range(1, len(diffs) + 1), medians, "o", color="#d62728", ms=4, label="median")
    paired.set(ylabel="http - engine, same request (ms)", title="per-request overhead (whiskers: 1.5 IQR)")
    paired.legend(fontsize=7)
    config = doc["config"]
    fig.suptitle(f"dfuse serve overhead: {config['model']}, {config['size'] or 'default size'}, "
                 f"{config['steps'] or 'default'} steps, {config['trace']} trace, {config['instances']}, "
                 f"{doc['machine']['cpu_count']} CPUs", fontsize=9)
    return _save(plt, fig, out)


def _save(plt, fig, out: Path) -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
