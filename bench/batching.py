"""`dfuse bench batching`: throughput with per-stage batching on vs off, side by side in one run.

Real tiny models on the CPU (not the synthetic family: its stages have no batch cost model).
Each workload submits N requests at once (distinct prompts and seeds, one shape, so every stage
may batch them) to an engine with batching off, then to one with batching on, alternating for
`rounds` rounds; the median round per mode is reported, and their ratio. A cheap DiT config
(few steps, small images) makes the per-call overhead of the encoder and decoder (and of the
DiT's pipeline call) a large share of each request: that is where batching pays. A heavier
config shows how the gain shrinks as per-request math dominates, and `serial` (one request at a
time) shows what batching costs when there is nothing to batch (max_wait_ms 0: nothing added).
"""

from __future__ import annotations

import os
import platform
import statistics
from pathlib import Path

import click

from ..scheduler.core import STAGES
from .lib.load import ClosedLoop, drive
from .lib.outputs import default_out, write_json

WORKLOADS = {
    "light": dict(num_inference_steps=2, height=64, width=64, guidance_scale=4.5),
    "heavy": dict(num_inference_steps=8, height=256, width=256, guidance_scale=4.5),
}
REQUEST_TIMEOUT_S = 600.0  # no request completing for this long: the engine is stuck
PROMPTS = ["a red fox in the snow", "a photo of a cat", "an astronaut riding a horse", "a dog in the forest"]


def _engine(model: str, threads: int, batching: bool, max_batch: int):
    from ..engine.config import BatchConfig, EngineConfig
    from ..engine.engine import Engine

    config = EngineConfig(model=model, cpu_threads=threads,
                          batching=BatchConfig(enabled=batching, max_batch=max_batch))
    return Engine(config=config)


def _run(engine, params: dict, requests: int, serial: bool) -> dict:
    """Submit `requests` at once (or one after the other when serial); time to the last done."""
    run = drive(lambda i: engine.submit(PROMPTS[i % len(PROMPTS)], seed=i, **params), requests,
                ClosedLoop(1 if serial else requests), stall_s=REQUEST_TIMEOUT_S)
    failed = [(i, o.error) for i, o in enumerate(run.outcomes) if o.error is not None]
    if run.stalled or failed:
        raise RuntimeError(run.stalled or f"request {failed[0][0]} failed: {failed[0][1]}")
    wall = max(o.done_s for o in run.outcomes)
    results = [o.value for o in run.outcomes]
    timings = [r.timings[0] for r in results]
    return {
        "wall_s": round(wall, 3),
        "throughput_rps": round(requests / wall, 3),
        # Per request: a batch's compute time shared among its requests.
        "compute_ms_per_request": {s: round(1000 * statistics.mean(t[s].compute_s / t[s].batch_size for t in timings), 2)
                                   for s in STAGES},
        "mean_batch_size": {s: round(statistics.mean(t[s].batch_size for t in timings), 2) for s in STAGES},
    }


def run_batching(model: str, requests: int, rounds: int, threads: int, max_batch: int, workloads: list[str],
                 progress=None) -> dict:
    runs = []
    cases = [(name, WORKLOADS[name], False) for name in workloads] + [("serial", WORKLOADS["light"], True)]
    for name, params, serial in cases:
        n = max(4, requests // 4) if serial else requests
        rounds_by_mode: dict[str, list[dict]] = {"off": [], "on": []}
        for _ in range(rounds):
            for mode in ("off", "on"):  # alternating: a drift of the machine hits both alike
                with _engine(model, threads, mode == "on", max_batch) as engine:
                    _run(engine, params, min(n, 4), serial)  # warm-up: first-call costs stay out
                    rounds_by_mode[mode].append(_run(engine, params, n, serial))
                if progress:
                    progress(f"{name} {mode}")
        median = {mode: sorted(rs, key=lambda r: r["throughput_rps"])[len(rs) // 2] for mode, rs in rounds_by_mode.items()}
        runs.append({
            "workload": name,
            "params": params,
            "requests": n,
            "submitted": "one after the other" if serial else "all at once",
            "off": median["off"],
            "on": median["on"],
            "throughput_ratio_on_over_off": round(median["on"]["throughput_rps"] / median["off"]["throughput_rps"], 3),
            "rounds_rps": {mode: [r["throughput_rps"] for r in rs] for mode, rs in rounds_by_mode.items()},
        })
    return {
        "benchmark": "batching",
        "model": model,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "threads_per_worker": threads,
        "max_batch": max_batch,
        "max_wait_ms": 0,
        "rounds": rounds,
        "note": "real tiny model, 3 CPU worker processes; throughput = requests / time from first submit to last "
                "result; median of the rounds per mode, modes alternated; compute_ms_per_request divides a "
                "batch's compute time by its size",
        "runs": runs,
    }


@click.command("batching")
@click.option("--model", default="tiny-sd3", show_default=True, help="Built-in tiny model or a local diffusers folder.")
@click.option("--requests", type=click.IntRange(2, 1000), default=32, show_default=True, help="Requests per timed round.")
@click.option("--rounds", type=click.IntRange(1, 20), default=3, show_default=True, help="Timed rounds per mode (median).")
@click.option("--threads", type=click.IntRange(1, 1024), default=1, show_default=True, help="Torch threads per worker.")
@click.option("--max-batch", type=click.IntRange(2, 64), default=8, show_default=True, help="Batch limit of every stage.")
@click.option("--workloads", default="light,heavy", show_default=True, help=f"Comma list of {', '.join(WORKLOADS)}; a `serial` case (light requests one after the other) always runs too.")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=default_out("batching.json"),
              show_default=True, help="Where the JSON result is written.")
def batching_command(model, requests, rounds, threads, max_batch, workloads, out):
    """Throughput with per-stage batching on vs off (same engine, same requests, one run)."""
    names = [w.strip() for w in workloads.split(",") if w.strip()]
    unknown = [w for w in names if w not in WORKLOADS]
    if unknown or not names:
        raise click.UsageError(f"--workloads: expected a comma list of {', '.join(WORKLOADS)} (got {workloads!r})")
    doc = run_batching(model, requests, rounds, threads, max_batch, names,
                       progress=lambda label: click.echo(f"  done: {label}", err=True))
    click.echo(f"{'workload':>9} {'off rps':>8} {'on rps':>8} {'ratio':>6}  mean batch (enc/dit/dec)")
    for r in doc["runs"]:
        sizes = "/".join(str(r["on"]["mean_batch_size"][s]) for s in STAGES)
        click.echo(f"{r['workload']:>9} {r['off']['throughput_rps']:>8.2f} {r['on']['throughput_rps']:>8.2f} "
                   f"{r['throughput_ratio_on_over_off']:>6.2f}  {sizes}")
    write_json(out, doc)
    click.echo(f"Wrote {out}")
