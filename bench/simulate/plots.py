"""Plots of a `dfuse bench simulate` result (matplotlib, installed with the `bench` extra)."""

from __future__ import annotations

from pathlib import Path

COLORS = {"monolithic": "#7f7f7f", "monolithic-offload": "#bcbcbc", "static": "#1f77b4", "threshold": "#d62728",
          "elastic": "#2ca02c", "elastic-nofb": "#98df8a", "oracle": "#9467bd", "auto": "#ff7f0e"}
ROLE_COLORS = {"T": "#ff7f0e", "E+D": "#17becf", "E": "#1f77b4", "D": "#2ca02c", "E+T": "#8c564b",
               "T+D": "#e377c2", "E+T+D": "#7f7f7f", "fused": "#bcbd22", "moving": "#d62728", "idle": "#dddddd"}
ALLOCATION_POLICIES = ("auto", "elastic", "threshold", "oracle")


def plot(doc: dict, out: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise RuntimeError("--plot needs matplotlib: pip install matplotlib (or pip install -e '.[bench]')") from None

    shown = [p for p in ALLOCATION_POLICIES if p in doc["allocation"]]
    fig = plt.figure(figsize=(11, 4 + 2.2 * len(shown)), constrained_layout=True)
    grid = fig.add_gridspec(1 + len(shown), 2, height_ratios=[2.2] + [1] * len(shown))
    attainment, latency = fig.add_subplot(grid[0, 0]), fig.add_subplot(grid[0, 1])
    for policy, sweep in doc["sweep"].items():
        rate = [p["rate_rps"] for p in sweep]
        color = COLORS.get(policy)
        attainment.plot(rate, [p["slo_attainment"] for p in sweep], "o-", ms=3, label=policy, color=color)
        points = [(p["rate_rps"], p["p95_s"]) for p in sweep if p["p95_s"] is not None]
        if points:
            latency.plot(*zip(*points), "o-", ms=3, label=policy, color=color)
    attainment.axhline(0.9, ls=":", color="black", lw=1)
    attainment.set(xlabel="mean arrival rate (requests/s)", ylabel="SLO attainment (SLO = 3x isolated latency)",
                   ylim=(0, 1.02), title="SLO attainment vs arrival rate")
    latency.set(xlabel="mean arrival rate (requests/s)", ylabel="p95 latency (s)", yscale="log",
                title="p95 latency vs arrival rate")
    attainment.legend(fontsize=8)
    starts, t = [], 0.0
    for phase in doc["phases"]:
        starts.append((t, phase["name"]))
        t += phase["duration_s"]
    for row, policy in enumerate(shown, start=1):
        ax = fig.add_subplot(grid[row, :])
        alloc = doc["allocation"][policy]
        times = [x / 60 for x in alloc["t"]]
        roles = [r for r in ROLE_COLORS if any(r in a for a in alloc["devices"])]
        ax.stackplot(times, [[a.get(r, 0) for a in alloc["devices"]] for r in roles], labels=roles,
                     colors=[ROLE_COLORS[r] for r in roles], step="post")
        for start, name in starts:
            ax.axvline(start / 60, color="black", lw=0.8, ls="--")
            ax.text(start / 60 + 0.3, sum(doc["cluster"].values()) * 1.02, name, fontsize=8, va="bottom")
        ax.set(xlim=(0, doc["horizon_s"] / 60), ylim=(0, sum(doc["cluster"].values()) * 1.15), ylabel="devices",
               title=f"{policy}: device roles over time at {doc['nominal_load']:.0%} of the oracle's capacity "
                     f"({len(alloc['moves'])} moves)")
        ax.legend(loc="lower right", fontsize=7, ncol=len(roles))
    ax.set_xlabel("time (minutes)")
    fig.suptitle(f"{doc['scenario']}: {doc['description']}", fontsize=9)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
