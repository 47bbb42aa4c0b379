"""`dfuse bench serve-overhead`: what the HTTP server adds to an image, measured side by side.

One run starts `dfuse serve` on loopback (a child process, port 0) and an in-process `Engine`
with the same model and layout, both warmed up, and keeps both for the whole run. Only one side
works at a time (the other's workers sit idle), on the same requests (prompt, seed, size, steps):

    isolated   --isolated requests one at a time, alternating sides request by request (who goes
               first alternates too): no queueing, so the difference is the server's own cost per
               image (HTTP, JSON, PNG encoding, base64, the hop to the engine and back)
    each rate  the seeded open-loop trace over HTTP (bench/serve_http.py) and through the engine,
               both driven by bench/lib/load.py; --rounds times, in ABBA order across rounds and
               rates so that a drift of the machine's load does not favour one side

Both sides time a request the same way: from the driver's submit to the result in hand (the
HTTP answer received and checked; the engine's Future resolved and its image checked). Reported
per phase and side: latency p50/p95/p99 and images/s; the overhead as the difference of the p50s
and p95s and as the median of per-request differences (request i against request i of the same
round). The target of the serving issue is an isolated p50 overhead of at most TARGET_P50_MS.

Before each timed phase the run waits (at most --quiet-wait s) for an idle machine and records
the CPU share other processes took meanwhile (bench/lib/meter.py): on a shared 2-core machine a
busy neighbour shows there, not as overhead.
"""

from __future__ import annotations

import base64
import io
import os
import shlex
import statistics
import sys
import time
from dataclasses import asdict
from pathlib import Path

import click

from .lib.leaks import close_and_check
from .lib.load import OpenLoop
from .lib.load import drive as drive_load
from .lib.meter import CpuMeter, wait_quiet
from .lib.outputs import default_out, progress_bar, write_json
from .lib.prompts import BASE_SEED, make_prompts
from .serve_command import (RequestSpec, Workload, drive_http, kind_specs, machine, versions,
                            want_plots, workload_options, workloads_from_options)
from .serve_report import (OVERHEAD_COLUMNS, Record, compact_requests, latency_stats, overhead, overhead_rows,
                           summarize, write_csv)

TARGET_P50_MS = 5.0
SIDES = ("http", "engine")
REQUEST_TIMEOUT_S = 600.0
ROUNDTRIPS = 50  # GET /v1/models exchanges timed for the HTTP floor
QUIET_SHARE = 0.10  # a pair of the isolated phase counts as quiet when others took at most this share of the CPUs


class EngineSide:
    """The in-process Engine, sending a RequestSpec as `dfuse serve` would hand it to its engine."""

    def __init__(self, config):
        from ..engine.engine import Engine

        started = time.perf_counter()
        self.engine = Engine(config=config)
        self.startup_s = round(time.perf_counter() - started, 2)
        self.pids = {w.pid for w in self.engine.stats().workers if w.pid}

    def submit(self, spec: RequestSpec):
        return self.engine.submit(**spec.engine_kwargs())

    @staticmethod
    def check(spec: RequestSpec, future):
        """The request's image, or ValueError when it is not the size asked for."""
        image = future.result().images[0]
        if spec.width is not None and image.size != (spec.width, spec.height):
            raise ValueError(f"wrong output: {image.width}x{image.height} for {spec.size}")
        return image

    def generate(self, spec: RequestSpec):
        return self.check(spec, self.submit(spec))

    def close(self) -> dict:
        self.pids.update(w.pid for w in self.engine.stats().workers if w.pid)
        return close_and_check(self.engine, self.pids)


def drive_engine(side: EngineSide, work: Workload, *, drain_s: float, progress=None) -> tuple[list[Record], float]:
    run = drive_load(lambda i: side.submit(work.specs[i]), len(work.specs), OpenLoop(work.arrivals_s),
                     read=lambda i, future: side.check(work.specs[i], future), drain_s=drain_s,
                     cancel_wait_s=REQUEST_TIMEOUT_S, progress=progress)
    records = [Record(spec.kind, arrival, o.submitted_s, o.done_s, error=o.error)
               for spec, arrival, o in zip(work.specs, work.arrivals_s, run.outcomes)]
    return records, run.wall_s


def isolated_specs(base: RequestSpec, n: int) -> list[RequestSpec]:
    """n requests like `base`, each with a prompt and seed of its own (as the traces' requests)."""
    return [RequestSpec(base.kind, prompt, BASE_SEED + i, base.width, base.height, base.steps, base.guidance_scale)
            for i, prompt in enumerate(make_prompts(n))]


def run_isolated(client, side: EngineSide, specs: list[RequestSpec], pids, progress=None) -> dict:
    """Each request on both sides, one at a time, alternating which side goes first; the records
    (latency only: submitted at 0), the CPU share other processes took during each pair (pids():
    ours), and the time to PNG-encode and base64 the engine's image (a part of the HTTP side's work)."""
    records: dict[str, list[Record]] = {s: [] for s in SIDES}
    encode_ms, others_share = [], []
    cores = os.cpu_count() or 1
    for i, spec in enumerate(specs):
        meter, pair_started = CpuMeter(pids()), time.perf_counter()
        for name in (SIDES if i % 2 == 0 else SIDES[::-1]):
            started = time.perf_counter()
            if name == "http":
                client.generate(spec.body())
            else:
                image = side.generate(spec)
            records[name].append(Record(spec.kind, 0.0, 0.0, time.perf_counter() - started))
        seconds = meter.read()
        others_share.append(None if seconds is None else seconds[1] / (time.perf_counter() - pair_started) / cores)
        encode_started = time.perf_counter()
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")  # what dfuse serve does for output_format png, b64_json
        base64.b64encode(buffer.getvalue())
        encode_ms.append(1000 * (time.perf_counter() - encode_started))
        if progress:
            progress("isolated, alternating", i + 1)
    return {"records": records, "others_share": others_share,
            "png_b64_encode_ms_median": round(statistics.median(encode_ms), 2) if encode_ms else None}


def quiet_pairs(records: dict[str, list[Record]], others_share: list[float | None]) -> dict:
    """The isolated phase restricted to the pairs during which other processes took at most
    QUIET_SHARE of the machine: on a shared machine, a neighbour's burst lands on one side of a
    pair and swamps a few ms of difference."""
    quiet = [i for i, share in enumerate(others_share) if share is not None and share <= QUIET_SHARE]
    pick = {side: [records[side][i] for i in quiet] for side in SIDES}
    stats = {side: latency_stats([r.latency_ms for r in pick[side]]) for side in SIDES}
    return {"max_others_share": QUIET_SHARE, "pairs": len(quiet), "of": len(others_share),
            "http_latency_p50_ms": stats["http"]["latency_p50_ms"],
            "engine_latency_p50_ms": stats["engine"]["latency_p50_ms"], **overhead(pick["http"], pick["engine"])}


def roundtrip_ms(client, n: int) -> float:
    """The median time of GET /v1/models, a route that never reaches the engine: the floor of
    an HTTP exchange here (client, loopback, uvicorn, FastAPI, JSON)."""
    times = []
    for _ in range(n):
        started = time.perf_counter()
        status, _ = client.get_json("/v1/models")
        times.append(1000 * (time.perf_counter() - started))
        if status != 200:
            raise RuntimeError(f"GET /v1/models answered {status}")
    return round(statistics.median(times), 2)


def pooled(runs: list[list[Record]], duration_s: float) -> dict:
    """One side's numbers over its rounds: counts and latency percentiles of all its requests
    together; throughput as the mean of the rounds' (each over its own span)."""
    records = [r for run in runs for r in run]
    per_run = [summarize(run, duration_s) for run in runs]
    errors: dict[str, int] = {}
    for s in per_run:
        for cls, n in s["errors_by_status"].items():
            errors[cls] = errors.get(cls, 0) + n
    mean = lambda key: round(statistics.mean(s[key] for s in per_run), 3) if all(s[key] for s in per_run) else None  # noqa: E731
    return {"submitted": len(records), "completed": sum(r.ok for r in records), "errors_by_status": errors,
            **latency_stats([r.latency_ms for r in records if r.ok]),
            "images_per_s": mean("images_per_s"), "throughput_rps": mean("throughput_rps"),
            "rounds": [{k: s[k] for k in ("images_per_s", "latency_p50_ms", "latency_p95_ms", "submit_lag_max_ms")}
                       for s in per_run]}


def phase_doc(name: str, rate: float | None, runs: dict[str, list[list[Record]]], duration_s: float,
              cpu: dict[str, list[dict]]) -> dict:
    doc = {"phase": name, "rate_rps": rate}
    for side in SIDES:
        doc[side] = pooled(runs[side], duration_s)
        shares = [c.get("other_processes_cpu_share") for c in cpu.get(side, []) if c]
        doc[side]["other_processes_cpu_share"] = max(shares) if shares else None
        doc[side]["cpu"] = cpu.get(side, [])
    flat = {side: [r for run in runs[side] for r in run] for side in SIDES}
    doc["overhead"] = overhead(flat["http"], flat["engine"])
    doc["requests"] = {side: [compact_requests(run) for run in runs[side]] for side in SIDES}
    return doc


def run_overhead(client, server, side: EngineSide, workloads: list[Workload], *, isolated: int, rounds: int,
                 warmup: int, drain_s: float, quiet_wait_s: float, progress=None) -> list[dict]:
    """Warm-up, the isolated phase, then rounds x rates x sides in ABBA order (module docstring)."""
    kinds = kind_specs(workloads)
    for _ in range(warmup):
        for kind, spec in kinds.items():
            if progress:
                progress(f"warm-up ({kind})", 0)
            client.generate(spec.body())
            side.generate(spec)
    phases = []
    if isolated:
        wait_quiet(quiet_wait_s)
        meter, started = CpuMeter([os.getpid(), *server.pids(), *side.pids]), time.perf_counter()
        result = run_isolated(client, side, isolated_specs(next(iter(kinds.values())), isolated),
                              lambda: [os.getpid(), *server.pids(), *side.pids], progress)
        cpu = meter.stop(time.perf_counter() - started)
        phase = phase_doc("isolated", None, {s: [result["records"][s]] for s in SIDES}, 0.0, {s: [cpu] for s in SIDES})
        phase["png_b64_encode_ms_median"] = result["png_b64_encode_ms_median"]
        phase["quiet_pairs"] = quiet_pairs(result["records"], result["others_share"])
        phase["others_share_per_pair"] = [None if x is None else round(x, 3) for x in result["others_share"]]
        phase["http_roundtrip_ms_median"] = roundtrip_ms(client, ROUNDTRIPS)
        for name in SIDES:  # one at a time: an image every mean latency (the span of such a run means nothing)
            mean_ms = phase[name]["latency_mean_ms"]
            phase[name]["images_per_s"] = phase[name]["throughput_rps"] = round(1000 / mean_ms, 3) if mean_ms else None
            phase[name]["rounds"] = []
        phases.append(phase)
    runs = {(w.rate, s): [] for w in workloads for s in SIDES}
    cpu: dict = {(w.rate, s): [] for w in workloads for s in SIDES}
    for round_index in range(rounds):
        for k, work in enumerate(workloads):
            for name in (SIDES if (round_index + k) % 2 == 0 else SIDES[::-1]):
                label = f"{name} @ {work.rate:g} req/s, round {round_index + 1}"
                if progress:
                    progress(label, 0)
                wait_quiet(quiet_wait_s)
                pids = server.pids() if name == "http" else sorted(side.pids)
                meter, started = CpuMeter([os.getpid(), *pids]), time.perf_counter()
                step = progress and (lambda done, label=label: progress(label, done))
                if name == "http":
                    records, _ = drive_http(client, work, model=None, drain_s=drain_s, progress=step)
                else:
                    records, _ = drive_engine(side, work, drain_s=drain_s, progress=step)
                cpu[(work.rate, name)].append(meter.stop(time.perf_counter() - started))
                runs[(work.rate, name)].append(records)
    for work in workloads:
        phases.append(phase_doc(f"{work.rate:g} req/s", work.rate, {s: runs[(work.rate, s)] for s in SIDES},
                                work.duration_s, {s: cpu[(work.rate, s)] for s in SIDES}))
    return phases


def layout(stats: dict) -> dict:
    """What shows that both sides ran the same engine: placement, pinning, links, and each
    stage's compute time over its recent tasks (the same work should take the same time)."""
    keys = ("placement", "instances", "cpu_pinning", "cpu_wake_latency_us", "links", "stage_ms", "completed", "failed")
    return {k: stats.get(k) for k in keys}


def format_table(doc: dict) -> str:
    lines = [f"{'phase':<12} {'side':<7} {'done':>9} {'img/s':>6} {'p50 ms':>8} {'p95 ms':>8} {'p99 ms':>8}  "
             "overhead p50 / p95 / paired median ms"]
    for phase in doc["phases"]:
        for side in SIDES:
            s, o = phase[side], phase["overhead"]
            extra = (f"  {_num(o['p50_overhead_ms'])} / {_num(o['p95_overhead_ms'])} / "
                     f"{_num(o['paired_median_overhead_ms'])}" if side == "http" else "")
            lines.append(f"{phase['phase']:<12} {side:<7} {s['completed']:>4}/{s['submitted']:<4} "
                         f"{_num(s['images_per_s']):>6} {_num(s['latency_p50_ms']):>8} {_num(s['latency_p95_ms']):>8} "
                         f"{_num(s['latency_p99_ms']):>8}{extra}")
    isolated = next((p for p in doc["phases"] if p["phase"] == "isolated"), None)
    if isolated is not None:
        lines.append(f"isolated: PNG + base64 of one image {_num2(isolated['png_b64_encode_ms_median'])} ms, "
                     f"an HTTP exchange without the engine (GET /v1/models) {_num2(isolated['http_roundtrip_ms_median'])} ms"
                     " (medians)")
        quiet = isolated["quiet_pairs"]
        lines.append(f"isolated, the {quiet['pairs']} of {quiet['of']} pairs during which other processes took <= "
                     f"{quiet['max_others_share']:.0%} of the CPUs: http p50 {_num(quiet['http_latency_p50_ms'])} ms, "
                     f"engine p50 {_num(quiet['engine_latency_p50_ms'])} ms, overhead p50 "
                     f"{_num2(quiet['p50_overhead_ms'])} ms, paired median {_num2(quiet['paired_median_overhead_ms'])} ms")
    target = doc["target"]
    if target["isolated_p50_overhead_ms"] is not None:
        verdict = "met" if target["met"] else "NOT met"
        lines.append(f"target: isolated p50 overhead <= {target['p50_overhead_ms_max']:g} ms: "
                     f"{target['isolated_p50_overhead_ms']:.2f} ms, {verdict}")
    return "\n".join(lines)


def _num(x) -> str:
    return "-" if x is None else f"{x:.1f}"


def _num2(x) -> str:
    return "-" if x is None else f"{x:.2f}"


@click.command("serve-overhead")
@click.option("--model", default="tiny-sd3", show_default=True,
              help="Built-in tiny model, a local diffusers folder, or synthetic:encoder=..,dit=..,decoder=..[,mode=sleep].")
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda, cuda:N, or per stage (both sides).")
@click.option("--instances", default="encoder=1,dit=1,decoder=1", show_default=True, help="Workers per stage (both sides).")
@click.option("--threads", type=click.IntRange(1, 1024), default=None,
              help="Torch threads per CPU worker (both sides) [default: cores / CPU workers].")
@workload_options
@click.option("--isolated", type=click.IntRange(0, 10_000), default=20, show_default=True,
              help="Requests one at a time per side, alternating sides (0: skip this phase).")
@click.option("--rounds", type=click.IntRange(1, 20), default=2, show_default=True,
              help="Times each rate's trace runs per side (ABBA order across rounds).")
@click.option("--warmup", type=click.IntRange(0, 100), default=2, show_default=True,
              help="Untimed requests per kind and side first.")
@click.option("--quiet-wait", type=click.FloatRange(0, 600), default=5.0, show_default=True,
              help="Before each timed phase, wait at most this long for an idle machine.")
@click.option("--startup-timeout", type=click.FloatRange(1, 3600), default=300.0, show_default=True,
              help="Seconds the server may take to answer GET /health with ok.")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Output folder for serve-overhead.json, .csv, .png [default: ./dfuse-bench/serve-overhead-MODEL].")
def serve_overhead_command(model, device, instances, threads, rates, trace, duration, requests, size, steps,
                           guidance_scale, seed, drain_timeout, plots, isolated, rounds, warmup, quiet_wait,
                           startup_timeout, out):
    """HTTP (dfuse serve on loopback) vs the in-process Engine, same layout and trace: per-image overhead."""
    from ..engine.config import EngineConfig, parse_devices, parse_instances
    from ..engine.models import describe_model, resolve_model_path
    from ..engine.models.synthetic import PREFIX as SYNTHETIC_PREFIX
    from .serve_http import HttpClient, ServerProcess, http_library

    workloads = workloads_from_options(rates, trace, duration, requests, size, steps, guidance_scale, seed)
    plots = want_plots(plots)
    try:
        http_library()
        config = EngineConfig(model=model, devices=parse_devices(device), instances=parse_instances(instances),
                              cpu_threads=threads)
        describe_model(resolve_model_path(config.model))
    except (ValueError, RuntimeError) as e:
        raise click.UsageError(str(e)) from None
    slug = "synthetic" if model.startswith(SYNTHETIC_PREFIX) else Path(model).name
    out = out or Path(default_out(f"serve-overhead-{slug}"))
    serve_args = ["--model", model, "--device", device, "--instances", instances, "--max-queue", "1000000",
                  "--grace-period", "10", *(["--threads", str(threads)] if threads else [])]
    created, started, load_before = time.strftime("%Y-%m-%dT%H:%M:%S%z"), time.perf_counter(), os.getloadavg()
    total = isolated + rounds * sum(len(w.specs) for w in workloads) * len(SIDES)
    bar, progress = progress_bar(total, "serve-overhead")
    server = ServerProcess(serve_args)
    side = client = None
    leaks, server_exit = {}, None
    try:
        with bar:
            progress("starting dfuse serve", 0)
            url = server.wait_ready(startup_timeout)
            server_startup_s = round(time.perf_counter() - started, 2)
            progress("starting the in-process engine", 0)
            side = EngineSide(config)
            client = HttpClient(url, timeout_s=REQUEST_TIMEOUT_S)
            phases = run_overhead(client, server, side, workloads, isolated=isolated, rounds=rounds, warmup=warmup,
                                  drain_s=drain_timeout, quiet_wait_s=quiet_wait, progress=progress)
            layouts = {"http": layout(client.get_json("/v1/stats")[1]), "engine": layout(side.engine.stats().to_dict())}
    except Exception as e:  # a refused warm-up, a server that would not start: say what, not a traceback
        raise click.ClickException(f"{type(e).__name__}: {e}") from None
    finally:
        if client is not None:
            client.close()
        # The server first: the engine's leak check counts every child of this process running dfuse
        # code, and the server is one until it has exited.
        server_exit = server.stop()
        if side is not None:
            leaks = side.close()
    isolated_phase = next((p for p in phases if p["phase"] == "isolated"), None)
    p50_overhead = isolated_phase["overhead"]["p50_overhead_ms"] if isolated_phase else None
    doc = {
        "benchmark": "serve-overhead", "created": created, "command": shlex.join(["dfuse", *sys.argv[1:]]),
        "config": {"model": model, "device": device, "instances": instances, "threads": threads, "trace": trace,
                   "rates": [w.rate for w in workloads], "duration_s": duration, "requests": requests, "size": size,
                   "steps": steps, "guidance_scale": guidance_scale, "seed": seed, "isolated": isolated,
                   "rounds": rounds, "warmup": warmup, "drain_s": drain_timeout, "quiet_wait_s": quiet_wait},
        "sides": {"http": f"dfuse serve on 127.0.0.1 (a child process: {shlex.join(server.command[1:])}), "
                          "b64_json PNG, one image per request, httpx2 client with keep-alive",
                  "engine": "dfuse Engine in the benchmark's process, Future -> PIL image"},
        "target": {"p50_overhead_ms_max": TARGET_P50_MS, "isolated_p50_overhead_ms": p50_overhead,
                   "met": None if p50_overhead is None else p50_overhead <= TARGET_P50_MS},
        "machine": {**machine(), "loadavg_1_5_15_before": [round(x, 2) for x in load_before]},
        "versions": versions(),
        "startup_s": {"server_healthy": server_startup_s, "engine": side.startup_s},
        "trace": {"requests_per_rate": {f"{w.rate:g}": len(w.specs) for w in workloads},
                  "duration_s": {f"{w.rate:g}": round(w.duration_s, 3) for w in workloads},
                  "interarrival_cv": {f"{w.rate:g}": w.interarrival_cv for w in workloads},
                  "kinds": {k: asdict(s) for k, s in kind_specs(workloads).items()}},
        "layouts": layouts,
        "phases": phases,
        "engine_leaks": leaks, "server_exit_code": server_exit,
        "wall_s": round(time.perf_counter() - started, 1),
    }
    write_json(out / "serve-overhead.json", doc, indent=1)
    written = [out / "serve-overhead.json",
               write_csv(out / "serve-overhead.csv", OVERHEAD_COLUMNS, overhead_rows(doc))]
    if plots:
        from .serve_plots import plot_overhead

        written.append(plot_overhead(doc, out / "serve-overhead.png"))
    click.echo(format_table(doc))
    click.echo("Wrote " + ", ".join(str(p) for p in written))
    if leaks.get("leaked_processes") or leaks.get("leaked_segments") or server_exit not in (0, None):
        click.secho(f"WARNING: engine leftovers {leaks}; dfuse serve exited with {server_exit}", fg="red", err=True)
        sys.exit(1)
