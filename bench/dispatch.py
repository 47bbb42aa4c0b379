"""`dfuse bench dispatch`: which worker takes a task, on a pool where one device is slower.

Two one-core CPU devices; the first hosts encoder, DiT and decoder, the second a second DiT that
the synthetic model makes `--slow` times slower (as a cheaper GPU would be). The same Poisson
arrivals are sent to an engine that dispatches by earliest predicted finish (the default) and to
one that sends each task to the worker with the fewest in flight (blind to speed), one after the
other, `--rounds` times alternating; latency percentiles, throughput and the slow DiT's share of
the work are reported side by side. Stages sleep (mode=sleep): what is measured is where the
engine sends work, not two cores' contention.
"""

from __future__ import annotations

import os
import statistics
from pathlib import Path

import click
import numpy as np

from .lib.load import OpenLoop, drive
from .lib.outputs import default_out, write_json

RULES = ("fewest-in-flight", "earliest-finish")
COSTS = "encoder=5ms,dit=60ms,decoder=5ms,mode=sleep"
WARMUP = 8  # requests before the timed ones: every worker has measured its speed


def pool_devices() -> tuple[str, str]:
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < 2:
        raise click.UsageError("dfuse bench dispatch needs two usable CPUs (two one-core devices)")
    return f"cpu:{cores[0]}", f"cpu:{cores[1]}"


def run_rule(rule: str, arrivals_s: list[float], slow: float) -> dict:
    """One engine with dispatch `rule`, fed `arrivals_s`; its latencies and where the DiTs worked."""
    from ..engine.config import EngineConfig
    from ..engine.engine import Engine

    fast, slower = pool_devices()
    config = EngineConfig(model=f"synthetic:{COSTS},device.{slower}={slow:g}x",
                          devices=[fast, slower], placement={fast: ["encoder", "dit", "decoder"], slower: ["dit"]},
                          dispatch=rule)
    with Engine(config=config) as engine:
        for future in [engine.submit("warm-up", seed=i) for i in range(WARMUP)]:
            future.result(timeout=120)
        slow_dit = next(w.id for w in engine.stats().workers if w.stage == "dit" and w.device == slower)
        load = drive(lambda i: engine.submit("a fox", seed=1000 + i), len(arrivals_s), OpenLoop(arrivals_s),
                     drain_s=60.0)
    latencies = [o.latency_s for o in load.outcomes if o.latency_s is not None]
    on_slow = sum(o.value.timings[0]["dit"].worker_id == slow_dit for o in load.outcomes if o.error is None)
    failed = [o.error for o in load.outcomes if o.error is not None]
    return {
        "rule": rule, "requests": len(arrivals_s), "served": len(latencies), "failed": len(failed),
        "errors": sorted(set(failed))[:5], "throughput_rps": round(len(latencies) / load.wall_s, 3),
        "latency_ms": {q: round(1000 * float(np.percentile(latencies, p)), 1) if latencies else None
                       for q, p in (("p50", 50), ("p95", 95), ("p99", 99))},
        "slow_dit_share": round(on_slow / max(1, len(latencies)), 3),
    }


def run_dispatch(rate: float, requests: int, slow: float, rounds: int, seed: int, progress=None) -> dict:
    rng = np.random.default_rng(seed)
    arrivals = np.cumsum(rng.exponential(1.0 / rate, requests)).round(4).tolist()
    runs = []
    for r in range(rounds):
        for rule in (RULES if r % 2 == 0 else RULES[::-1]):  # alternate which goes first
            if progress:
                progress(f"round {r + 1}/{rounds}: {rule}")
            runs.append(dict(run_rule(rule, arrivals, slow), round=r + 1))
    summary = {}
    for rule in RULES:
        mine = [x for x in runs if x["rule"] == rule]
        summary[rule] = {q: round(statistics.median(x["latency_ms"][q] for x in mine), 1) for q in ("p50", "p95", "p99")}
        summary[rule]["throughput_rps"] = round(statistics.median(x["throughput_rps"] for x in mine), 3)
        summary[rule]["slow_dit_share"] = round(statistics.median(x["slow_dit_share"] for x in mine), 3)
    base, ours = summary["fewest-in-flight"], summary["earliest-finish"]
    fast, slower = pool_devices()
    return {
        "benchmark": "dispatch", "model": f"synthetic:{COSTS},device.{slower}={slow:g}x",
        "placement": {fast: ["encoder", "dit", "decoder"], slower: ["dit"]},
        "trace": {"kind": "poisson", "rate_rps": rate, "requests": requests, "seed": seed},
        "capacity_rps": round(1 / 0.060 + 1 / (0.060 * slow), 2),  # the two DiTs, the bottleneck stage
        "runs": runs, "median_of_rounds": summary,
        "p99_ratio_fewest_over_earliest": round(base["p99"] / ours["p99"], 3) if ours["p99"] else None,
        "command": f"dfuse bench dispatch --rate {rate:g} --requests {requests} --slow {slow:g} --rounds {rounds} --seed {seed}",
        "note": "two one-core CPU devices, synthetic stages that sleep; median over rounds, each rule on the same arrivals",
    }


def format_report(doc: dict) -> str:
    lines = [f"{doc['model']}, Poisson {doc['trace']['rate_rps']:g} req/s x {doc['trace']['requests']} "
             f"(capacity ~{doc['capacity_rps']} req/s)",
             f"{'rule':<18}{'p50 ms':>9}{'p95 ms':>9}{'p99 ms':>9}{'req/s':>8}{'slow DiT share':>16}"]
    for rule, s in doc["median_of_rounds"].items():
        lines.append(f"{rule:<18}{s['p50']:>9}{s['p95']:>9}{s['p99']:>9}{s['throughput_rps']:>8}{s['slow_dit_share']:>16}")
    lines.append(f"p99 fewest-in-flight / earliest-finish: {doc['p99_ratio_fewest_over_earliest']}")
    return "\n".join(lines)


@click.command("dispatch")
@click.option("--rate", type=click.FloatRange(0.1, 100), default=14.0, show_default=True, help="Poisson arrivals per second.")
@click.option("--requests", type=click.IntRange(10, 5000), default=300, show_default=True, help="Timed requests per run.")
@click.option("--slow", type=click.FloatRange(1, 20), default=3.0, show_default=True, help="How many times slower the second device's DiT is.")
@click.option("--rounds", type=click.IntRange(1, 10), default=2, show_default=True, help="Runs of each rule, alternating which goes first.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the arrival times.")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=default_out("dispatch.json"),
              show_default=True, help="Where the JSON result goes.")
def dispatch_command(rate, requests, slow, rounds, seed, out):
    """Earliest-predicted-finish vs fewest-in-flight dispatch on a pool with one slow device."""
    pool_devices()
    doc = run_dispatch(rate, requests, slow, rounds, seed, progress=lambda text: click.echo(text, err=True))
    write_json(out, doc)
    click.echo(format_report(doc))
    click.echo(f"wrote {out}")
