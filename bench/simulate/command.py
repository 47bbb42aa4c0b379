"""`dfuse bench simulate`: the scheduler's policies compared on a simulated cluster (see policy_comparison.py)."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from ..lib.outputs import default_out, require_matplotlib, write_json

SCENARIO_NAMES = ("wan-480p-8xa10g", "flux-1024-4xh100-4xl4", "sd35-shift-8xl40s", "sd35-shift-reverse-8xl40s",
                  "sd35-shift-4xl40s-4xrtx4090")


@click.command()
@click.option("--scenario", type=click.Choice(SCENARIO_NAMES), required=True, help="Cluster, model and trace.")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="JSON result [default: ./dfuse-bench/simulate-SCENARIO.json].")
@click.option("--plot", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Also draw latency / attainment against arrival rate and device roles over time (PNG; needs "
                   "matplotlib: pip install matplotlib).")
@click.option("--policies", default=None,
              help="Comma-separated subset of monolithic, monolithic-offload, static, threshold, elastic, "
                   "elastic-nofb, oracle, auto [default: all].")
@click.option("--seed", type=int, default=0, show_default=True, help="Trace and noise seed.")
def simulate(scenario, out, plot, policies, seed):
    """Replay one scenario's trace under each placement policy on a virtual clock and compare them.

    Throughput is measured closed-loop (saturated); latency and SLO attainment open-loop at the
    scenario's nominal load; the highest rate with >= 90 % attainment from a sweep of loads.
    """
    from tqdm import tqdm

    from .scenarios import SCENARIOS
    from .policy_comparison import EXTRA_POLICIES, LOADS, POLICIES, format_table, run_scenario

    chosen = POLICIES if policies is None else tuple(p.strip() for p in policies.split(",") if p.strip())
    unknown = [p for p in chosen if p not in POLICIES + EXTRA_POLICIES]
    if unknown or not chosen:
        raise click.UsageError(f"--policies: unknown {unknown}; known: {', '.join(POLICIES + EXTRA_POLICIES)}")
    if plot is not None:
        require_matplotlib("--plot")  # before the simulation, not after it
    out = out or Path(default_out(f"simulate-{scenario}.json"))
    with tqdm(total=len(chosen) * (len(LOADS) + 1), desc=scenario, unit="run", file=sys.stderr, disable=None) as bar:
        def progress(policy, load):
            bar.set_postfix_str(f"{policy} {'closed loop' if load is None else f'load {load:.2f}'}")
            bar.update(1)

        doc = run_scenario(SCENARIOS[scenario], chosen, seed=seed, progress=progress)
    write_json(out, doc, indent=1)
    click.echo(format_table(doc))
    click.echo(f"Wrote {out} (simulated {doc['horizon_s'] / 3600:.1f} h x {doc['runs']} runs in {doc['wall_s']:.1f} s)")
    if plot is not None:
        from .plots import plot as draw

        try:
            draw(doc, plot)
        except RuntimeError as e:
            raise click.ClickException(str(e)) from None
        click.echo(f"Wrote {plot}")
