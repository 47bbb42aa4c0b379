"""`dfuse bench pipeline`: does the real engine run at the speed of its slowest stage?

The engine serves a synthetic model (stages that take a configured time per request) and is fed
faster than it can serve (every request submitted at once). The bottleneck capacity is
min over stages of instances / cost; the steady-state throughput is measured between the
completion of the first `warmup` requests (pipeline filled) and the last one. Efficiency =
throughput / capacity: 1.0 means the engine adds nothing to the slowest stage.
"""

from __future__ import annotations

import os
import platform
from pathlib import Path

import click

from ..engine.config import parse_instances
from ..scheduler.core import STAGES
from ..engine.models.synthetic import parse_spec
from .lib.load import ClosedLoop, drive
from .lib.outputs import default_out, write_json

REQUEST_TIMEOUT_S = 600.0  # no request completing for this long: the engine is stuck

DEFAULT_MODEL = "synthetic:encoder=20ms,dit=100ms,decoder=60ms"
DEFAULT_LAYOUTS = "1:1:1,1:2:1"


def parse_layout(text: str) -> dict[str, int]:
    parts = text.split(":")
    if len(parts) != len(STAGES) or not all(p.isdecimal() and int(p) > 0 for p in parts):
        raise ValueError(f"--layouts: {text!r} is not encoder:dit:decoder instance counts like 1:2:1")
    return parse_instances(",".join(f"{s}={p}" for s, p in zip(STAGES, parts)))


def bottleneck(costs: dict[str, float], instances: dict[str, int]) -> tuple[str, float]:
    capacity = {s: instances[s] / costs[s] for s in STAGES if costs[s] > 0}
    stage = min(capacity, key=capacity.get)
    return stage, capacity[stage]


def run_layout(model: str, instances: dict[str, int], requests: int, warmup: int, progress=None) -> dict:
    from ..engine.engine import Engine

    costs, mode = parse_spec(model)
    stage, capacity = bottleneck(costs, instances)
    with Engine(model=model, instances=instances, cpu_threads=1) as engine:
        engine.generate("warm up", seed=0)  # first-task costs (imports, lazy init) stay out
        run = drive(lambda i: engine.submit("a synthetic request", seed=i), requests, ClosedLoop(requests),
                    read=lambda i, future: future.result().images[0].getpixel((0, 0))[0],
                    stall_s=REQUEST_TIMEOUT_S, progress=progress)
    if run.stalled:
        raise RuntimeError(run.stalled)
    for i, outcome in enumerate(run.outcomes):
        if outcome.error is not None:
            raise RuntimeError(f"request {i} failed: {outcome.error}")
        if outcome.value != i % 251:  # each request got its own output
            raise RuntimeError(f"request {i} came back with another request's image")
    # The clock starts once the first `warmup` requests are all done (the pipeline is full) and
    # stops when the last one is: requests may finish out of order with several instances.
    filled = max(o.done_s for o in run.outcomes[:warmup])
    last = max(o.done_s for o in run.outcomes)
    steady = (requests - warmup) / (last - filled)
    return {
        "layout": ":".join(str(instances[s]) for s in STAGES),
        "instances": dict(instances),
        "mode": mode,
        "costs_ms": {s: round(c * 1000, 3) for s, c in costs.items()},
        "bottleneck_stage": stage,
        "bottleneck_capacity_rps": round(capacity, 3),
        "throughput_rps": round(steady, 3),
        "efficiency": round(steady / capacity, 4),
        "requests": requests,
        "warmup_requests": warmup,
        "wall_s": round(last, 3),
    }


@click.command("pipeline")
@click.option("--model", default=DEFAULT_MODEL, show_default=True,
              help="synthetic:encoder=..ms,dit=..ms,decoder=..ms[,mode=sleep|burn]")
@click.option("--layouts", default=DEFAULT_LAYOUTS, show_default=True, help="Instance layouts encoder:dit:decoder.")
@click.option("--requests", type=click.IntRange(4, 10_000), default=100, show_default=True,
              help="Requests per layout, all submitted at once (the first --warmup completions are not timed).")
@click.option("--warmup", type=click.IntRange(1, 1000), default=10, show_default=True,
              help="Completions that fill the pipeline before the steady-state clock starts.")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=default_out("pipeline.json"),
              show_default=True, help="Where the JSON result is written.")
def pipeline_command(model, layouts, requests, warmup, out):
    """The real engine on a synthetic model, fed faster than it serves: throughput vs bottleneck."""
    from tqdm import tqdm

    try:
        if not model.startswith("synthetic:"):
            raise ValueError(f"--model: the pipeline benchmark takes a synthetic:... model (got {model!r})")
        parse_spec(model)
        parsed = [parse_layout(text.strip()) for text in layouts.split(",") if text.strip()]
        if warmup >= requests:
            raise ValueError(f"--warmup: must be below --requests ({requests}), got {warmup}")
    except ValueError as e:
        raise click.UsageError(str(e)) from None
    runs = []
    for instances in parsed:
        label = ":".join(str(instances[s]) for s in STAGES)
        with tqdm(total=requests, desc=f"layout {label}", unit="req", leave=False, disable=None) as bar:
            runs.append(run_layout(model, instances, requests, warmup, lambda n: bar.update(n - bar.n)))
    report = {
        "benchmark": "pipeline",
        "model": model,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "note": "steady-state throughput of the real engine (3+ spawned workers, zmq, shared-memory slots) "
                "on a synthetic model; mode=sleep models device time (a GPU stage's process mostly waits), "
                "so 2 CPU cores are not oversubscribed by the stages themselves",
        "runs": runs,
    }
    if len(runs) == 1:
        report |= {k: runs[0][k] for k in ("bottleneck_capacity_rps", "throughput_rps", "efficiency")}
    click.echo(f"{'layout':>7} {'mode':>6} {'bottleneck':>11} {'capacity':>9} {'measured':>9} {'efficiency':>10}")
    for r in runs:
        click.echo(f"{r['layout']:>7} {r['mode']:>6} {r['bottleneck_stage']:>11} {r['bottleneck_capacity_rps']:>9.2f} "
                   f"{r['throughput_rps']:>9.2f} {r['efficiency']:>10.3f}")
    write_json(out, report)
    click.echo(f"Wrote {out}")
