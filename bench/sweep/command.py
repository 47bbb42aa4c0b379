"""`dfuse bench sweep`: an open-loop serving benchmark (like vLLM's and SGLang's bench_serving).

For every mode and arrival rate, one driver thread submits a seeded trace's requests at their
arrival times whatever has completed (open loop); a done-callback on each future records when
its result came back, and the main thread samples the allocation every SAMPLE_S seconds:

    mono     the monolithic baseline (bench/sweep/monolithic.py): whole requests, one process per device
    static   dfuse Engine(policy="static"): every worker keeps its stage
    elastic  dfuse Engine(policy="elastic"): the engine may move workers between stages
    auto     dfuse Engine(placement="auto", policy="elastic") over the --devices pool: the
             planner's placement, fused or split per device, then elastic moves (fused allowed)

Every (engine mode, rate) point gets a fresh engine, warmed up with one request per kind, so an
elastic engine's moves at one rate do not carry over to the next; the monolithic processes hold
no state between requests and serve every rate of the sweep (each warmed up before READY).
Before each point the sweep waits (at most --quiet-wait s) for an idle machine and measures the
CPU time other processes used during it (bench/lib/meter.py).

SLO: SLO_FACTOR x the isolated latency of the request's kind, one reference for every mode: a
static engine with the sweep's layout, one request at a time (the median of ISOLATED_REPEATS
after a warm-up). The first static point's fresh engine measures it before its trace (saving an
engine start); without static among the modes, a static engine of its own measures it after the
sweep (the metrics are computed from the request records at the end). A request meets its SLO when it
is served (output checked) within that time of its scheduled arrival; failed and unfinished
requests count as misses. Requests still unfinished --drain-timeout seconds after the last arrival
are cancelled and reported as unfinished. Every engine and process the sweep starts is closed and
checked for leftovers (processes, /dev/shm segments, socket folders).
"""

from __future__ import annotations

import os
import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping

import click

from ...engine.protocol import RequestParams
from ...scheduler.core import STAGES
from ...engine.models.synthetic import PREFIX as SYNTHETIC_PREFIX
from ..lib import outputs
from ..lib.load import OpenLoop
from ..lib.load import drive as drive_load
from ..lib.meter import CpuMeter, wait_quiet
from ..lib.outputs import INSTALL_MATPLOTLIB, default_out, progress_bar, require_matplotlib
from ..lib.prompts import BASE_SEED, make_prompts
from .report import Record, compact_requests, document, summarize
from .runners import (ISOLATED_REPEATS, REQUEST_TIMEOUT_S, EngineRunner, MonoRunner, measure_isolated,
                            served_or_raise)
from .traces import TRACES, interarrival_cv, kind_of, make_trace, parse_modes, parse_rates, trace_kinds

SLO_FACTOR = 3.0
SAMPLE_S = 0.25
Progress = Callable[[str, int], None]  # (what runs now, requests of it completed)


@dataclass(frozen=True)
class SweepConfig:
    """One sweep: the model and layout, the trace, the modes and rates (validated by the CLI)."""

    model: str
    """A built-in tiny model, a diffusers folder or a synthetic:... spec."""
    rates: tuple[float, ...]
    """Mean arrival rates in requests/s."""
    trace: str = "poisson"
    """poisson, bursty or shift (bench/sweep/traces.py)."""
    modes: tuple[str, ...] = ("mono", "static", "elastic")
    """Which of mono, static, elastic run, in this order."""
    duration_s: float = 30.0
    """Length of each point's arrival trace."""
    instances: Mapping[str, int] = field(default_factory=lambda: {s: 1 for s in STAGES})
    """Engine workers per stage (static and elastic); with a `placement`, the counts it makes."""
    devices: str | Mapping[str, str] | tuple[str, ...] = "cpu"
    """Engine device, or one per stage; with a `placement`, the device pool (canonical names)."""
    placement: Mapping[str, tuple[str, ...]] | None = None
    """The pool form (engine/devices.py): the stages of each device, one worker per device and
    stage, e.g. {"cpu:0": ("encoder", "decoder"), "cpu:1": ("dit",)}; None: devices + instances."""
    cluster: str | None = None
    """"ray": the engine modes run their workers on the Ray cluster at `ray_address` (devices may
    name nodes: engine/cluster.py); mono runs on this host, on the same devices without the node names."""
    ray_address: str | None = None
    threads: int | None = None
    """Torch threads per engine worker (None: the engine's default, cores / CPU workers)."""
    mono_threads: int | None = None
    """Torch threads of a CPU monolithic process (None: every core)."""
    steps: int | None = None
    """Base request's denoising steps (None: the model's default)."""
    size: int | None = None
    """Base request's height and width (None: the model's default)."""
    seed: int = 0
    """Seed of the arrival trace (the same arrivals for every mode at a rate)."""
    drain_s: float = 120.0
    """After the last arrival, wait at most this long for outstanding requests."""
    quiet_wait_s: float = 10.0
    """Before each point, wait at most this long for an idle machine."""

    @property
    def synthetic(self) -> bool:
        return self.model.startswith(SYNTHETIC_PREFIX)


# --- the open-loop run of one point ------------------------------------------------------------
def drive_trace(runner, kinds: list[str], arrivals_s: list[float], params: list[RequestParams], *, drain_s: float,
          progress: Callable[[int], None] | None = None) -> tuple[list[Record], list[dict], float]:
    """Submit request i at arrivals_s[i] (seconds from start), whatever has completed (bench/lib/load.py);
    sample the runner every SAMPLE_S s until every request has an outcome or drain_s after the last
    arrival; then cancel what is left (recorded as unfinished). Returns the records, the samples
    and the start (time.monotonic())."""
    samples: list[dict] = []

    def sample(load, _completed: int) -> None:
        samples.append({"t_s": round(time.monotonic() - load.start, 3), **runner.sample()})

    run = drive_load(lambda i: runner.submit(params[i]), len(params), OpenLoop(arrivals_s),
                     read=lambda i, future: runner.outcome(future, params[i]), tick=sample, tick_s=SAMPLE_S,
                     drain_s=drain_s, cancel_wait_s=REQUEST_TIMEOUT_S, progress=progress)
    records = []
    for kind, t, outcome in zip(kinds, arrivals_s, run.outcomes):
        # runner.outcome gives (None or what is wrong with the output, per-stage times)
        error, stages = (outcome.error, None) if outcome.error is not None else outcome.value
        records.append(Record(kind, t, outcome.submitted_s, outcome.done_s, error, stages))
    return records, samples, run.start


# --- one point and the whole sweep -------------------------------------------------------------
@dataclass
class Workload:
    """The requests of one rate: the same for every mode."""

    rate: float
    kinds: list[str]
    arrivals_s: list[float]
    params: list[RequestParams]
    interarrival_cv: float


def build_workloads(config: SweepConfig, info) -> tuple[dict[str, RequestParams], list[Workload]]:
    """The request kinds (one RequestParams each) and every rate's seeded trace."""
    from ...engine.requests import build_requests

    steps = config.steps or info.num_inference_steps
    size = config.size or info.default_size
    shapes = trace_kinds(config.trace, steps, size)

    def params_for(shape, prompt: str, seed: int) -> RequestParams:
        return build_requests(info, prompt, num_inference_steps=shape.steps, height=shape.height, width=shape.width,
                              seed=seed)[0]

    kind_params = {name: params_for(shape, "a photo of a house", 0) for name, shape in shapes.items()}
    workloads = []
    for rate in config.rates:
        arrivals = make_trace(config.trace, rate, config.duration_s, steps, size, config.seed)
        prompts = make_prompts(len(arrivals))
        workloads.append(Workload(
            rate, [kind_of(a, shapes) for a in arrivals], [a.t for a in arrivals],
            [params_for(a.shape, prompts[i], BASE_SEED + i) for i, a in enumerate(arrivals)],
            round(interarrival_cv(arrivals), 3),
        ))
    return kind_params, workloads


def run_point(runner, mode: str, work: Workload, config: SweepConfig, progress: Progress | None) -> dict:
    """Drive one workload through a started, warmed-up runner: its request records and samples
    (`finish_points` turns the records into metrics once the SLO reference is known)."""
    label = f"{mode} @ {work.rate:g} req/s"
    if progress:
        progress(f"{label}: waiting for a quiet machine", 0)
    waited = wait_quiet(config.quiet_wait_s)
    meter, started = CpuMeter([os.getpid(), *sorted(runner.pids)]), time.perf_counter()
    records, samples, start = drive_trace(runner, work.kinds, work.arrivals_s, work.params, drain_s=config.drain_s,
                                    progress=progress and (lambda done: progress(label, done)))
    cpu = meter.stop(time.perf_counter() - started)
    return {"mode": mode, "rate_rps": work.rate, "records": records, **cpu, "started_monotonic": start,
            "waited_for_quiet_s": round(waited, 1), "allocation": _columns(samples)}


def finish_points(points: list[dict], slo_s: dict[str, float], duration_s: float) -> list[dict]:
    """Each point's metrics from its records, and its requests as compact columns."""
    finished = []
    for point in points:
        records, rest = point.pop("records"), {k: v for k, v in point.items() if k not in ("mode", "rate_rps")}
        finished.append({"mode": point["mode"], "rate_rps": point["rate_rps"], **summarize(records, slo_s, duration_s),
                         **rest, "requests": compact_requests(records, list(slo_s))})
    return finished


def _columns(samples: list[dict]) -> dict:
    """Samples as columns: t_s, per key (placement, queues, inflight) a list per stage, and where
    the runner says it, `devices`: per device a list of its stages at each sample."""
    out: dict = {"t_s": [s["t_s"] for s in samples], "moving": [s["moving"] for s in samples]}
    for key in ("placement", "queues", "inflight"):
        stages = list(samples[0][key]) if samples else []
        out[key] = {stage: [s[key][stage] for s in samples] for stage in stages}
    if samples and "devices" in samples[0]:
        devices = list(dict.fromkeys(d for s in samples for d in s["devices"]))
        out["devices"] = {d: [s["devices"].get(d, []) for s in samples] for d in devices}
    return out


def run_engine_mode(config: SweepConfig, mode: str, kind_params: dict, workloads: list[Workload],
                    progress: Progress | None, reference: dict | None = None) -> list[dict]:
    """A fresh engine per rate, warmed up with one request per kind. Given an empty `reference`,
    the first engine measures the SLO reference into it instead (which warms it up as well)."""
    points = []
    for work in workloads:
        if progress:
            progress(f"{mode} @ {work.rate:g} req/s: starting the engine", 0)
        runner = EngineRunner(config, mode)
        try:
            if reference is not None and not reference:
                if progress:
                    progress(f"{mode} @ {work.rate:g} req/s: isolated latency (SLO reference)", 0)
                reference.update(isolated_latency_s=measure_isolated(runner, kind_params), startup_s=runner.startup_s,
                                 measured_by=f"the first {mode} engine (rate {work.rate:g}), before its trace")
            else:
                for name, params in kind_params.items():
                    served_or_raise(runner, params, f"warm-up request ({name})")
            point = run_point(runner, mode, work, config, progress)
        finally:
            closed = runner.close()
        start = point.pop("started_monotonic")
        for move in closed["moves"]:  # the engine times moves from its own start
            move["t_point_s"] = round(runner.created + move["t_s"] - start, 3)
        points.append({**point, **closed})
    return points


def run_mono_mode(config: SweepConfig, kind_params: dict, workloads: list[Workload],
                  progress: Progress | None) -> tuple[list[dict], dict]:
    """One monolithic pool serves every rate (each process warmed up before READY)."""
    if progress:
        progress("mono: starting the monolithic processes", 0)
    runner = MonoRunner(config, tuple(kind_params.values()))
    info = {"description": runner.description, "startup_s": runner.startup_s, "load_s": runner.pool.load_s,
            "processes": runner.processes()}
    points = []
    try:
        info["isolated_latency_s"] = measure_isolated(runner, kind_params)
        for work in workloads:
            points.append(run_point(runner, "mono", work, config, progress))
            points[-1].pop("started_monotonic")
    finally:
        info.update(runner.close())
    for point in points:  # the pool served every rate: its leftovers are every point's
        point.update(leaked_processes=info["leaked_processes"], leaked_segments=[], run_dir_left=False)
    return points, info


def measure_reference(config: SweepConfig, kind_params: dict, progress: Progress | None) -> dict:
    """The SLO reference from a static engine of its own (when static is not among the modes)."""
    if progress:
        progress("SLO reference: static engine, one request at a time", 0)
    runner = EngineRunner(config, "static")
    try:
        isolated = measure_isolated(runner, kind_params)
    finally:
        closed = runner.close()
    return {"isolated_latency_s": isolated, "startup_s": runner.startup_s,
            "measured_by": "a static engine of its own, after the sweep",
            **{k: closed[k] for k in ("leaked_processes", "leaked_segments", "run_dir_left")}}


def run_sweep(config: SweepConfig, progress: Progress | None = None, command: str | None = None) -> dict:
    """Every mode at every rate; returns the JSON-ready document (see module docstring)."""
    from ...engine.models import describe_model, resolve_model_path

    info = describe_model(resolve_model_path(config.model))
    kind_params, workloads = build_workloads(config, info)
    created, load_before = time.strftime("%Y-%m-%dT%H:%M:%S%z"), os.getloadavg()
    started = time.perf_counter()
    points, modes, reference = [], {}, {}
    for mode in config.modes:
        if mode == "mono":
            mono_points, modes["mono"] = run_mono_mode(config, kind_params, workloads, progress)
            points += mono_points
        else:
            points += run_engine_mode(config, mode, kind_params, workloads, progress,
                                      reference if mode == "static" else None)
            modes[mode] = (f"dfuse Engine(policy={mode!r}), a fresh engine per rate" if mode != "auto" else
                           "dfuse Engine(placement='auto', policy='elastic') over the pool, a fresh engine per rate")
    reference = reference or measure_reference(config, kind_params, progress)
    slo_s = {k: round(SLO_FACTOR * v, 4) for k, v in reference["isolated_latency_s"].items()}
    slo = {"factor": SLO_FACTOR, "reference": "static engine with the sweep's layout, one request at a time, "
           f"median of {ISOLATED_REPEATS} after a warm-up", "isolated_latency_s": reference.pop("isolated_latency_s"),
           "slo_s": slo_s, "reference_engine": reference}
    return document(config, info, kind_params, workloads, slo, finish_points(points, slo_s, config.duration_s), modes,
                    created=created, load_before=load_before, wall_s=time.perf_counter() - started, command=command)


def planned_requests(config: SweepConfig) -> int:
    """How many requests the sweep will send in all (for the progress bar)."""
    from ...engine.models import describe_model, resolve_model_path

    _, workloads = build_workloads(config, describe_model(resolve_model_path(config.model)))
    return len(config.modes) * sum(len(w.params) for w in workloads)


# --- the command ---------------------------------------------------------------------------------
def _option(flag: str, parse, *args):
    """parse(*args), a ValueError turned into a usage error naming `flag`."""
    try:
        return parse(*args)
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint=f"'{flag}'") from None


DEFAULT_DEVICE, DEFAULT_INSTANCES = "cpu", "encoder=1,dit=1,decoder=1"


def config_from_options(model, rates, trace, modes, duration, instances, device, threads, mono_threads, steps, size,
                        seed, drain_timeout, quiet_wait, pool=None, placement=None, cluster=None,
                        ray_address=None) -> SweepConfig:
    """Every option checked before a process starts; a bad one is a usage error naming it.
    `pool` and `placement` are --devices and --placement (the pool form, instead of
    --device/--instances); `cluster` and `ray_address` are --cluster and --ray-address."""
    from ...engine.config import EngineConfig, parse_devices, parse_instances
    from ...engine.models import describe_model, resolve_model_path

    mode_list = tuple(_option("--modes", parse_modes, modes))
    if "auto" in mode_list and pool is None:
        raise click.BadParameter("auto places the stages over a device pool: give --devices (e.g. cpu:0,cpu:1)",
                                 param_hint="'--modes'")
    if pool is None and placement is None:
        counts = _option("--instances", parse_instances, instances)
        _option("--instances", lambda: EngineConfig(instances=counts))
        devices = parse_devices(device)
        _option("--device", lambda: EngineConfig(devices=devices, instances=counts))
        layout: dict = {"instances": counts, "devices": devices}
    else:
        layout = _pool_layout(pool, placement, device, instances, mode_list, model, cluster, ray_address)
    if (cluster or ray_address) and "placement" not in layout:
        raise click.UsageError("--cluster/--ray-address: give the workers' devices as --devices/--placement "
                               "(a/cpu:0=encoder+decoder,b/cpu:1=dit)")
    info = _option("--model", lambda: describe_model(resolve_model_path(model)))
    config = SweepConfig(
        model=model, rates=tuple(_option("--rates", parse_rates, rates)), trace=trace, modes=mode_list,
        duration_s=duration, **layout, threads=threads, mono_threads=mono_threads, steps=steps, size=size, seed=seed,
        drain_s=drain_timeout, quiet_wait_s=quiet_wait, cluster=cluster, ray_address=ray_address,
    )
    _check_kinds(config, info)
    return config


def _pool_layout(pool: str | None, placement: str | None, device: str, instances: str, modes: tuple[str, ...],
                 model: str, cluster: str | None = None, ray_address: str | None = None) -> dict:
    """SweepConfig's devices (the canonical pool), placement and instances from --devices and
    --placement, parsed as `dfuse run` parses them (engine/devices.py) and checked by EngineConfig.
    --placement auto is resolved here, as the Engine would (engine/auto_placement.py), so every
    mode and the report see the placement it chose."""
    from ...engine.auto_placement import auto_placed
    from ...engine.config import EngineConfig
    from ...engine.devices import parse_device_list, parse_placement, split_node
    from ...engine.models import describe_model, detect_family, resolve_model_path

    other = [f"{flag} {value}" for flag, value, default in (("--device", device, DEFAULT_DEVICE),
                                                           ("--instances", instances, DEFAULT_INSTANCES))
             if value != default]
    if other:
        raise click.UsageError(f"--devices/--placement (a device pool) and --device/--instances (devices per stage) "
                               f"are two ways to say where the workers run: give one of them, not both "
                               f"(got {' and '.join(other)})")
    if placement in (None, "auto") and pool is None:
        raise click.UsageError("--placement auto places the stages over --devices; give them (e.g. --devices cpu:0,cpu:1)")
    stages = "auto" if placement in (None, "auto") else _option("--placement", parse_placement, placement)
    fields = {"placement": stages, **({} if pool is None else {"devices": _option("--devices", parse_device_list, pool)})}
    policy = "elastic" if {"elastic", "auto"} & set(modes) else "static"  # checked as the engine modes will run
    try:
        engine = EngineConfig(model=model, **fields, policy=policy, cluster=cluster, ray_address=ray_address)
        if engine.placement == "auto":
            path = resolve_model_path(model)
            nodes = None
            if cluster == "ray":  # the devices of other nodes are measured there
                from ...engine.cluster import RayCluster

                nodes = RayCluster(ray_address, list(engine.pool))
            try:
                engine = auto_placed(engine, path, describe_model(path), detect_family(path), nodes)
            finally:
                if nodes is not None:
                    nodes.close()
    except ConnectionError as e:  # Ray's: no cluster answers at --ray-address (auto placement measures its nodes)
        raise click.BadParameter(str(e), param_hint="'--ray-address'") from None
    except ValueError as e:  # "devices[1]: ...", "placement (cpu:9): ...", "model: ..."
        flag = {"devices": "--devices", "model": "--model", "cluster": "--cluster",
                "ray_address": "--ray-address"}.get(str(e).split("[")[0].split(":")[0], "--placement")
        raise click.BadParameter(str(e), param_hint=f"'{flag}'") from None
    if "mono" in modes:  # mono runs here, one process per device named without its node
        local = [split_node(d)[1] for d in engine.devices]
        if len(set(local)) < len(local):
            raise click.BadParameter(f"mono runs one process per device on this host, but {list(engine.devices)} "
                                     "name one device twice once their nodes are dropped; give each node other "
                                     "devices, or leave mono out of --modes", param_hint="'--devices'")
    return {"devices": tuple(engine.devices), "instances": dict(engine.instances),
            "placement": {d: tuple(s) for d, s in engine.layout().items() if s}}


def _check_kinds(config: SweepConfig, info) -> None:
    from ...engine.requests import build_requests

    kinds = trace_kinds(config.trace, config.steps or info.num_inference_steps, config.size or info.default_size)
    for name, shape in kinds.items():
        try:
            build_requests(info, "x", num_inference_steps=shape.steps, height=shape.height, width=shape.width)
        except ValueError as e:
            flag = "--steps" if str(e).startswith("num_inference_steps") else "--size"
            raise click.BadParameter(f"{e} (the {config.trace} trace's {name!r} requests are {shape.label()})",
                                     param_hint=f"'{flag}'") from None


def _want_plots(plots: bool | None) -> bool:
    """--plots needs matplotlib (refused up front without it); by default, plots are drawn when
    matplotlib is installed, else skipped with a warning before the sweep starts."""
    if plots:
        require_matplotlib("--plots", skip_with="--no-plots")
    if plots is None and not outputs.matplotlib_available():
        click.echo(f"matplotlib is not installed: skipping the plots ({INSTALL_MATPLOTLIB} to draw them)", err=True)
        return False
    return plots is not False


@click.command("sweep")
@click.option("--model", default="tiny-sd3", show_default=True,
              help="Built-in tiny model, a local diffusers folder, or "
                   "synthetic:encoder=..,dit=..,decoder=..[,mode=sleep].")
@click.option("--rates", required=True, help="Mean arrival rates in requests/s, comma-separated, e.g. 1,2,4.")
@click.option("--trace", type=click.Choice(TRACES), default="poisson", show_default=True,
              help="poisson; bursty (on/off: 1 s at 3x the rate, 2 s silent, on average); shift (few-step, "
                   "then many-step, then 2x-size requests, a third of the run each).")
@click.option("--modes", default="mono,static,elastic", show_default=True,
              help="Comma-separated subset of mono (diffusers / synthetic stages in one process per device), "
                   "static, elastic (dfuse Engine policies with the given layout), auto (placement auto + elastic, "
                   "fused or split per device; needs --devices).")
@click.option("--duration", type=click.FloatRange(1, 3600), default=30.0, show_default=True,
              help="Seconds of arrivals per mode and rate.")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Output folder for sweep.json, sweep.csv, summary.md and plots "
                   "[default: ./dfuse-bench/sweep-MODEL-TRACE].")
@click.option("--instances", default=DEFAULT_INSTANCES, show_default=True,
              help="Engine workers per stage (static and elastic).")
@click.option("--device", default=DEFAULT_DEVICE, show_default=True,
              help="cpu, cuda, cuda:N, or per stage: encoder=cpu,dit=cuda:0,...")
@click.option("--devices", "pool", default=None,
              help="A pool of devices for --placement, as in `dfuse run`: cuda:N, cpu, or CPU core sets cpu:A-B "
                   "(e.g. cpu:0,cpu:1); mono runs one process per pool device, pinned to its cores "
                   "[default: the placement's devices].")
@click.option("--placement", default=None,
              help="The stages of each device, one engine worker per device and stage: cpu:0=encoder+decoder,cpu:1=dit "
                   "(instead of --device/--instances); auto (the default with --devices): the engine planner's.")
@click.option("--cluster", type=click.Choice(["ray"]), default=None,
              help="ray: the engine modes run their workers on a Ray cluster (--devices/--placement may name its "
                   "nodes: b/cpu:0); mono runs on this host, on the same devices without the node names.")
@click.option("--ray-address", default=None, help="The Ray head's HOST:PORT, with --cluster ray.")
@click.option("--threads", type=click.IntRange(1, 1024), default=None,
              help="Torch threads per engine worker [default: cores / CPU workers].")
@click.option("--mono-threads", type=click.IntRange(1, 1024), default=None,
              help="Torch threads of a CPU monolithic process [default: every core; on a core-set device, "
                   "its cores].")
@click.option("--steps", type=click.IntRange(1, 1000), default=None,
              help="Base request's denoising steps [default: the model's]; shift: steps/4, 2 x steps, steps/2.")
@click.option("--size", type=int, default=None,
              help="Base request's height and width in px [default: the model's]; shift's last phase: 2 x size.")
@click.option("--seed", type=click.IntRange(0, 2**32 - 1), default=0, show_default=True,
              help="Seed of the arrival trace (every mode sees the same arrivals).")
@click.option("--drain-timeout", type=click.FloatRange(0, 3600), default=120.0, show_default=True,
              help="Seconds after the last arrival to wait for outstanding requests (then: unfinished).")
@click.option("--quiet-wait", type=click.FloatRange(0, 600), default=10.0, show_default=True,
              help="Before each point, wait at most this long for an idle machine.")
@click.option("--plots/--no-plots", default=None,
              help="Draw latency.png and allocation.png (needs matplotlib: pip install matplotlib) "
                   "[default: if matplotlib is installed, else a warning up front].")
def sweep_command(model, rates, trace, modes, duration, out, instances, device, pool, placement, cluster, ray_address,
                  threads, mono_threads, steps, size, seed, drain_timeout, quiet_wait, plots):
    """Open-loop serving sweep: every mode at every arrival rate, throughput, latency, SLO, allocation."""
    from .report import format_markdown, write_outputs

    config = config_from_options(model, rates, trace, modes, duration, instances, device, threads, mono_threads,
                                 steps, size, seed, drain_timeout, quiet_wait, pool, placement, cluster, ray_address)
    plots = _want_plots(plots)  # decided before any request, not after the sweep
    slug = "synthetic" if config.synthetic else Path(model).name
    out = out or Path(default_out(f"sweep-{slug}-{trace}"))
    bar, progress = progress_bar(planned_requests(config), "sweep")
    with bar:
        try:
            doc = run_sweep(config, progress, command=shlex.join(["dfuse", *sys.argv[1:]]))
        except RuntimeError as e:
            raise click.ClickException(str(e)) from None
    written = write_outputs(doc, out, plots)
    click.echo(format_markdown(doc))
    click.echo("Wrote " + ", ".join(str(p) for p in written))
    _report_problems(doc)


def _report_problems(doc: dict) -> None:
    totals = doc["totals"]
    if totals["unfinished"]:
        click.secho(f"WARNING: {totals['unfinished']} request(s) were still unfinished {doc['config']['drain_s']:g} s "
                    "after the last arrival (overload): cancelled and counted as SLO misses.", fg="yellow", err=True)
    leaked = totals["leaked_processes"] or totals["leaked_segments"] or totals["run_dir_left"]
    if totals["failed"] or leaked:
        click.secho(f"FAILED: {totals['failed']} request(s) failed; leaked processes {totals['leaked_processes']}, "
                    f"segments {totals['leaked_segments']}, socket folder left: {totals['run_dir_left']}",
                    fg="red", bold=True, err=True)
        sys.exit(1)
