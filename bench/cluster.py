"""`dfuse bench cluster`: the price of the network. One placement over the nodes of a Ray cluster
against the same placement on this host alone, side by side in one run.

    cluster    Engine(cluster="ray", placement=P): workers on their nodes (engine/cluster.py),
               tensors between nodes over TCP (transport/tcp.py), control frames signed
    one-host   Engine(placement=P without the node names): the same devices, every hop shared
               memory, as dfuse runs on one machine

P must name devices that also exist on this host once the node names are dropped (a/cpu:0 and
b/cpu:1 -> cpu:0 and cpu:1): on a test machine whose "nodes" share its cores, the two runs then
differ only in how tensors and control cross between stages. Each round submits all requests
at once to each engine in turn (rounds interleaved, median reported); every image of both runs
is compared with diffusers' own pipeline (one thread, as the workers run) for the same seed.
"""

from __future__ import annotations

import platform
import statistics
import sys
import time
from pathlib import Path

import click
import numpy as np

from ..engine.devices import parse_placement, split_node
from .lib.libraries import package_version
from .lib.outputs import default_out, write_json
from .lib.prompts import BASE_SEED, make_prompts
from .lib.reference import generate, load_pipeline


def one_host(placement: dict[str, list[str]]) -> dict[str, list[str]]:
    """The placement with its node names dropped; ValueError if two nodes' devices then collide."""
    local: dict[str, list[str]] = {}
    for device, stages in placement.items():
        name = split_node(device)[1]
        if name in local:
            raise ValueError(f"placement: {device} is {name} again on one host; give each node different devices "
                             "(a/cpu:0, b/cpu:1) so the one-host run can use the same ones")
        local[name] = stages
    return local


def run_cluster_bench(address: str, placement: dict[str, list[str]], requests: int, steps: int, height: int,
                      width: int, rounds: int, warmup: int, model: str, progress=None) -> dict:
    from ..engine.engine import Engine

    cases = [dict(prompt=p, seed=BASE_SEED + i, num_inference_steps=steps, height=height, width=width)
             for i, p in enumerate(make_prompts(requests))]
    engines = {"cluster": dict(cluster="ray", ray_address=address, placement=placement, devices=list(placement)),
               "one-host": dict(placement=one_host(placement), devices=list(one_host(placement)))}
    started, runs, images, fetch, links = {}, {name: [] for name in engines}, {}, {}, {}
    opened = {}
    try:
        for name, fields in engines.items():
            t0 = time.perf_counter()
            opened[name] = Engine(model=model, **fields)
            started[name] = time.perf_counter() - t0
            links[name] = opened[name].stats().links
            for case in cases[:warmup]:
                opened[name].generate(**case)
        for round_ in range(rounds):
            for name, engine in opened.items():
                t0 = time.perf_counter()
                results = [f.result(timeout=600) for f in [engine.submit(**case) for case in cases]]
                runs[name].append(requests / (time.perf_counter() - t0))
                images[name] = [np.array(r.images[0]) for r in results]
                fetch[name] = {stage: statistics.median(r.timings[0][stage].fetch_s * 1000 for r in results)
                               for stage in ("dit", "decoder")}
                if progress:
                    progress(name, round_ + 1, rounds)
    finally:
        for engine in opened.values():
            engine.close()
    reference = _diffusers_images(model, cases)
    equal = {name: [bool(np.array_equal(a, b)) for a, b in zip(images[name], reference)] for name in engines}
    median = {name: statistics.median(values) for name, values in runs.items()}
    return {
        "benchmark": "cluster", "model": model, "placement": placement, "requests": requests, "steps": steps,
        "height": height, "width": width, "rounds": rounds, "warmup": warmup,
        "machine": {"platform": platform.platform(), "python": platform.python_version(),
                    "ray": package_version("ray"), "torch": package_version("torch")},
        "links": links, "startup_s": {k: round(v, 2) for k, v in started.items()},
        "throughput_rps": {name: [round(v, 3) for v in values] for name, values in runs.items()},
        "throughput_rps_median": {k: round(v, 3) for k, v in median.items()},
        "cluster_vs_one_host": round(median["cluster"] / median["one-host"], 3),
        "input_fetch_ms_median": {name: {s: round(v, 3) for s, v in f.items()} for name, f in fetch.items()},
        "images_equal_diffusers": {name: all(v) for name, v in equal.items()},
        "images_equal_between_runs": all(np.array_equal(a, b) for a, b in zip(images["cluster"], images["one-host"])),
    }


def _diffusers_images(model: str, cases: list[dict]) -> list[np.ndarray]:
    """diffusers' pipeline, one thread (as each worker runs), for the same cases."""
    import torch

    from ..engine.models import resolve_model_path

    torch.set_num_threads(1)
    pipe = load_pipeline(resolve_model_path(model))
    return [np.array(generate(pipe, **case)) for case in cases]


@click.command("cluster")
@click.option("--ray-address", required=True, help="The Ray head's HOST:PORT (the cluster must be running).")
@click.option("--placement", required=True,
              help="Node-qualified placement, e.g. a/cpu:0=encoder+decoder,b/cpu:1=dit (a, b: dfuse-node labels).")
@click.option("--requests", type=click.IntRange(1, 256), default=8, show_default=True, help="Requests per round and engine.")
@click.option("--steps", type=click.IntRange(1, 1000), default=8, show_default=True, help="Denoising steps per request.")
@click.option("--height", type=int, default=64, show_default=True, help="Image height in pixels.")
@click.option("--width", type=int, default=64, show_default=True, help="Image width in pixels.")
@click.option("--rounds", type=click.IntRange(1, 20), default=3, show_default=True, help="Interleaved rounds; the median is reported.")
@click.option("--warmup", type=click.IntRange(0, 64), default=2, show_default=True, help="Untimed requests per engine first.")
@click.option("--model", default="tiny-sd3", show_default=True, help="An SD3 model (the diffusers reference is SD3's pipeline).")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=default_out("cluster.json"), show_default=True,
              help="Where the JSON result is written.")
def cluster_command(ray_address, placement, requests, steps, height, width, rounds, warmup, model, out):
    """One placement over Ray nodes vs the same placement on this host: throughput, input fetch
    times, and every image against diffusers'."""
    try:
        parsed = parse_placement(placement)
        one_host(parsed)
    except ValueError as e:
        raise click.UsageError(str(e)) from None
    say = lambda name, done, total: click.echo(f"{name}: round {done}/{total}", err=True)  # noqa: E731
    doc = run_cluster_bench(ray_address, parsed, requests, steps, height, width, rounds, warmup, model, say)
    write_json(out, doc)
    click.echo(f"throughput (req/s, median of {rounds}): cluster {doc['throughput_rps_median']['cluster']}, "
               f"one host {doc['throughput_rps_median']['one-host']} (ratio {doc['cluster_vs_one_host']})")
    click.echo(f"images equal diffusers': {doc['images_equal_diffusers']}; equal between runs: "
               f"{doc['images_equal_between_runs']}")
    click.echo(f"Wrote {out}")
    if not all(doc["images_equal_diffusers"].values()):
        sys.exit(1)
