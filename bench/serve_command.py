"""`dfuse bench serve`: open-loop HTTP load against a running `dfuse serve` (as `vllm bench serve`).

For each arrival rate, the seeded trace of bench/sweep/traces.py (poisson, bursty or shift) is
sent as POST /v1/images/generations requests at their arrival times, whatever has completed:
bench/lib/load.py's open-loop driver, the one the engine benchmarks use, with an async HTTP
client behind its Futures (bench/serve_http.py). Each request is one image (n=1), with its own
prompt and seed (request i: seed BASE_SEED + i), so images/s and requests/s agree.

Before the trace, one warm-up request per request kind; unless --slo-ms is given, the SLO of a
kind is SLO_FACTOR x its isolated latency (the median of ISOLATED_REPEATS requests sent one at a
time), as `dfuse bench sweep` sets it. Every run is bounded: at most the trace's requests, and
requests unanswered --drain-timeout seconds after the last arrival are cancelled (the client
closes their connections; the server cancels their work) and reported as unfinished.

Reported per rate: throughput (requests/s and images/s over trace start -> last answer), latency
p50/p95/p99 (request sent -> answer received and checked), SLO attainment and goodput, and
failures by HTTP status (429, 503 ...), client error (ConnectError, TimeoutError) or unfinished.
"""

from __future__ import annotations

import os
import platform
import shlex
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import click

from .lib.libraries import package_version
from .lib.load import OpenLoop
from .lib.load import drive as drive_load
from .lib.outputs import (INSTALL_MATPLOTLIB, default_out, matplotlib_available, progress_bar, require_matplotlib,
                          write_json)
from .lib.prompts import BASE_SEED, make_prompts
from .serve_report import SUMMARY_COLUMNS, Record, compact_requests, summarize, summary_rows, write_csv
from .sweep.traces import TRACES, interarrival_cv, kind_of, make_trace, parse_rates, trace_kinds

SLO_FACTOR = 3.0
ISOLATED_REPEATS = 3
DEFAULT_DURATION_S = 30.0
CANCEL_WAIT_S = 30.0  # a cancelled HTTP request ends at once: this only bounds a stuck client
PLACEHOLDER_SIZE, PLACEHOLDER_STEPS = 64, 1  # the trace's shapes when the server's defaults are used


@dataclass(frozen=True)
class RequestSpec:
    """One request of a trace, as both sides send it: an HTTP body, or Engine.submit's arguments.
    None fields are left to the server's (the model's) defaults."""

    kind: str
    prompt: str
    seed: int
    width: int | None = None
    height: int | None = None
    steps: int | None = None
    guidance_scale: float | None = None

    @property
    def size(self) -> str | None:
        return None if self.width is None else f"{self.width}x{self.height}"

    def body(self, model: str | None = None) -> dict:
        body = {"prompt": self.prompt, "n": 1, "response_format": "b64_json", "seed": self.seed}
        optional = {"model": model, "size": self.size, "num_inference_steps": self.steps,
                    "guidance_scale": self.guidance_scale}
        return body | {k: v for k, v in optional.items() if v is not None}

    def engine_kwargs(self) -> dict:
        return dict(prompt=self.prompt, seed=self.seed, height=self.height, width=self.width,
                    num_inference_steps=self.steps, guidance_scale=self.guidance_scale)


@dataclass
class Workload:
    """One rate's requests: the same on every side that runs them."""

    rate: float
    specs: list[RequestSpec]
    arrivals_s: list[float]
    duration_s: float  # the trace's length (cut after the last request with --requests)
    interarrival_cv: float


def parse_size(text: str | None) -> tuple[int, int] | None:
    """"128x96" -> (128, 96) as (width, height), OpenAI's order; ValueError naming --size."""
    if text is None:
        return None
    width, sep, height = text.lower().partition("x")
    if not (sep and width.isdigit() and height.isdigit() and int(width) > 0 and int(height) > 0):
        raise ValueError(f"expected WIDTHxHEIGHT in pixels, like 128x128 (got {text!r})")
    return int(width), int(height)


def trace_arrivals(trace: str, rate: float, duration_s: float | None, requests: int | None, steps: int,
                   height: int, seed: int):
    """The trace's arrivals and its length. With `requests`, exactly that many: the trace is made
    long enough (first N / rate seconds, then 25 % longer until N arrive) and cut after the Nth."""
    if requests is None:
        return make_trace(trace, rate, duration_s, steps, height, seed), duration_s
    duration = requests / rate
    for _ in range(60):  # 1.25 ** 60: any rate gets there long before
        arrivals = make_trace(trace, rate, duration, steps, height, seed)
        if len(arrivals) >= requests:
            break
        duration *= 1.25
    cut = arrivals[requests].t if len(arrivals) > requests else duration
    return arrivals[:requests], cut


def build_workloads(trace: str, rates: list[float], *, duration_s: float | None, requests: int | None,
                    size: tuple[int, int] | None, steps: int | None, guidance_scale: float | None,
                    seed: int) -> list[Workload]:
    """Every rate's seeded trace as requests. The shift trace's kinds scale the base size (the
    large phase is 2x both sides) and steps: it needs --size and --steps."""
    if trace == "shift" and (size is None or steps is None):
        raise ValueError("the shift trace scales the base size and steps: give --size and --steps")
    width, height = size or (None, None)
    kinds = trace_kinds(trace, steps or PLACEHOLDER_STEPS, height or PLACEHOLDER_SIZE)
    workloads = []
    for rate in rates:
        arrivals, duration = trace_arrivals(trace, rate, duration_s, requests, steps or PLACEHOLDER_STEPS,
                                            height or PLACEHOLDER_SIZE, seed)
        prompts = make_prompts(len(arrivals))
        specs = []
        for i, arrival in enumerate(arrivals):
            shape = arrival.shape
            scale = shape.height // (height or PLACEHOLDER_SIZE)  # the kinds scale the square base size
            specs.append(RequestSpec(
                kind=kind_of(arrival, kinds), prompt=prompts[i], seed=BASE_SEED + i,
                width=None if size is None else width * scale, height=None if size is None else shape.height,
                steps=None if steps is None else shape.steps, guidance_scale=guidance_scale))
        workloads.append(Workload(rate, specs, [a.t for a in arrivals], duration,
                                  round(interarrival_cv(arrivals), 3)))
    return workloads


def kind_specs(workloads: list[Workload]) -> dict[str, RequestSpec]:
    """One request of every kind (its first), for warm-ups and the isolated latency."""
    found: dict[str, RequestSpec] = {}
    for spec in (s for w in workloads for s in w.specs):
        found.setdefault(spec.kind, spec)
    return found


# --- running a trace over HTTP -----------------------------------------------------------------
def drive_http(client, work: Workload, *, model: str | None, drain_s: float, progress=None) -> tuple[list[Record], float]:
    """Send `work` open-loop through `client` (bench/serve_http.HttpClient); the records and the
    run's wall time."""
    bodies = [s.body(model) for s in work.specs]
    run = drive_load(lambda i: client.submit(bodies[i]), len(bodies), OpenLoop(work.arrivals_s), drain_s=drain_s,
                     cancel_wait_s=CANCEL_WAIT_S, progress=progress)
    records = []
    for spec, arrival, outcome in zip(work.specs, work.arrivals_s, run.outcomes):
        answer = outcome.value  # an Answer, or None when no HTTP answer came
        records.append(Record(
            spec.kind, arrival, outcome.submitted_s, outcome.done_s, status=answer.status if answer else None,
            error=outcome.error or (answer.error if answer else "no answer"), images=answer.images if answer else 0))
    return records, run.wall_s


def isolated_latency_ms(send, specs: dict[str, RequestSpec], repeats: int = ISOLATED_REPEATS) -> dict[str, float]:
    """Median latency of each kind sent alone, one at a time; send(spec) raises if not served."""
    medians = {}
    for kind, spec in specs.items():
        times = []
        for _ in range(repeats):
            started = time.perf_counter()
            send(spec)
            times.append(1000 * (time.perf_counter() - started))
        medians[kind] = round(statistics.median(times), 2)
    return medians


def machine() -> dict:
    """The machine as the record needs it (no torch import: the client may run where torch is not)."""
    model = None
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), None)
    except OSError:
        pass
    return {"cpu_count": os.cpu_count(), "cpu_model": model or platform.processor() or platform.machine(),
            "platform": platform.platform(), "python": platform.python_version(),
            "loadavg_1_5_15": [round(x, 2) for x in os.getloadavg()]}


def versions() -> dict:
    return {name: package_version(name) for name in ("dfuse", "torch", "diffusers", "fastapi", "uvicorn", "httpx2",
                                                     "httpx")}


# --- the command -------------------------------------------------------------------------------
def run_serve_bench(client, workloads: list[Workload], *, model: str | None, slo_ms: float | None, warmup: int,
                    drain_s: float, progress=None) -> dict:
    """Warm up, set the SLOs, then every rate's trace; the JSON-ready points and SLO section."""
    kinds = kind_specs(workloads)
    send = lambda spec: client.generate(spec.body(model))  # noqa: E731
    for _ in range(warmup):
        for kind, spec in kinds.items():
            if progress:
                progress(f"warm-up ({kind})", 0)
            send(spec)
    if slo_ms is None:
        if progress:
            progress("isolated latency (SLO reference)", 0)
        isolated = isolated_latency_ms(send, kinds)
        slo = {"slo_ms": {k: round(SLO_FACTOR * v, 2) for k, v in isolated.items()}, "factor": SLO_FACTOR,
               "isolated_latency_ms": isolated,
               "reference": f"median of {ISOLATED_REPEATS} requests of the kind sent one at a time, after warm-up"}
    else:
        slo = {"slo_ms": {k: slo_ms for k in kinds}, "reference": "--slo-ms"}
    points = []
    for work in workloads:
        label = f"{work.rate:g} req/s"
        load_before = os.getloadavg()
        records, wall = drive_http(client, work, model=model, drain_s=drain_s,
                                   progress=progress and (lambda done: progress(label, done)))
        points.append({"rate_rps": work.rate, **summarize(records, work.duration_s, slo["slo_ms"]),
                       "wall_s": round(wall, 2), "loadavg_1_before": round(load_before[0], 2),
                       "requests": compact_requests(records)})
    return {"slo": slo, "points": points}


def format_table(doc: dict) -> str:
    lines = [f"{'rate':>6} {'sent':>5} {'done':>5} {'img/s':>7} {'p50 ms':>9} {'p95 ms':>9} {'p99 ms':>9} "
             f"{'SLO':>6}  errors"]
    for p in doc["points"]:
        slo = "-" if p["slo_attainment"] is None else f"{p['slo_attainment']:.2f}"
        lines.append(f"{p['rate_rps']:>6g} {p['submitted']:>5} {p['completed']:>5} {_num(p['images_per_s']):>7} "
                     f"{_num(p['latency_p50_ms']):>9} {_num(p['latency_p95_ms']):>9} {_num(p['latency_p99_ms']):>9} "
                     f"{slo:>6}  {p['errors_by_status'] or '-'}")
    return "\n".join(lines)


def _num(x) -> str:
    return "-" if x is None else f"{x:.1f}"


def want_plots(plots: bool | None) -> bool:
    """--plots needs matplotlib (refused up front); by default plots are drawn when it is installed."""
    if plots:
        require_matplotlib("--plots", skip_with="--no-plots")
    if plots is None and not matplotlib_available():
        click.echo(f"matplotlib is not installed: skipping the plot ({INSTALL_MATPLOTLIB} to draw it)", err=True)
        return False
    return plots is not False


def option_value(flag: str, parse, *args, **kwargs):
    """parse(...), a ValueError turned into a usage error naming `flag`."""
    try:
        return parse(*args, **kwargs)
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint=f"'{flag}'") from None


def workload_options(command):
    """The trace options `dfuse bench serve` and `dfuse bench serve-overhead` share."""
    options = [
        click.option("--rates", required=True, help="Mean arrival rates in requests/s, comma-separated, e.g. 2,4,8."),
        click.option("--trace", type=click.Choice(TRACES), default="poisson", show_default=True,
                     help="poisson; bursty (on/off: 1 s at 3x the rate, 2 s silent, on average); shift (few-step, "
                          "many-step, then 2x-size requests, a third of the run each: needs --size and --steps)."),
        click.option("--duration", type=click.FloatRange(0.5, 3600), default=None,
                     help="Seconds of arrivals per rate [default: 30; not with --requests]."),
        click.option("--requests", type=click.IntRange(1, 100_000), default=None,
                     help="Exactly this many requests per rate (the trace is cut after them) instead of --duration."),
        click.option("--size", default=None, help="Image size WIDTHxHEIGHT, e.g. 128x128 [default: the model's]."),
        click.option("--steps", type=click.IntRange(1, 1000), default=None,
                     help="Denoising steps of the base request [default: the model's]; shift: steps/4, 2x, steps/2."),
        click.option("--guidance-scale", type=float, default=None, help="Guidance scale [default: the model's]."),
        click.option("--seed", type=click.IntRange(0, 2**32 - 1), default=0, show_default=True,
                     help="Seed of the arrival trace (request i's image seed is 1234 + i either way)."),
        click.option("--drain-timeout", type=click.FloatRange(0, 3600), default=60.0, show_default=True,
                     help="Seconds after the last arrival to wait for answers; then the rest are cancelled (unfinished)."),
        click.option("--plots/--no-plots", default=None,
                     help="Draw the PNG (needs matplotlib) [default: if matplotlib is installed]."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def workloads_from_options(rates, trace, duration, requests, size, steps, guidance_scale, seed) -> list[Workload]:
    """The shared options as workloads; a bad one is a usage error naming it, before any request."""
    if duration is not None and requests is not None:
        raise click.UsageError("--duration and --requests: give one or the other (--requests cuts the trace)")
    if duration is None and requests is None:
        duration = DEFAULT_DURATION_S
    return option_value("--size/--steps", build_workloads, trace, option_value("--rates", parse_rates, rates),
                        duration_s=duration, requests=requests, size=option_value("--size", parse_size, size),
                        steps=steps, guidance_scale=guidance_scale, seed=seed)


@click.command("serve")
@click.option("--url", default="http://127.0.0.1:8000", show_default=True, help="Base URL of a running dfuse serve.")
@workload_options
@click.option("--slo-ms", type=click.FloatRange(0, min_open=True), default=None,
              help=f"Latency SLO per request in ms [default: {SLO_FACTOR:g}x each kind's isolated latency, measured first].")
@click.option("--model", default=None, help="The model id to send as \"model\" [default: none sent; the server's].")
@click.option("--api-key", envvar="DFUSE_API_KEY", default=None, help="Sent as 'Authorization: Bearer KEY' [env: DFUSE_API_KEY].")
@click.option("--warmup", type=click.IntRange(0, 100), default=1, show_default=True, help="Untimed requests per kind first.")
@click.option("--request-timeout", type=click.FloatRange(1, 3600), default=600.0, show_default=True,
              help="Seconds one request may take before the client gives up on it.")
@click.option("--wait-ready", type=click.FloatRange(0, 3600), default=60.0, show_default=True,
              help="Seconds to wait for GET /health to say ok before the run.")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Output folder for serve.json, serve.csv, latency.png [default: ./dfuse-bench/serve-TRACE].")
def serve_command(url, rates, trace, duration, requests, size, steps, guidance_scale, seed, drain_timeout, plots,
                  slo_ms, model, api_key, warmup, request_timeout, wait_ready, out):
    """Open-loop HTTP load on a running `dfuse serve`: throughput, latency percentiles, SLO, errors."""
    from .serve_http import HttpClient, http_library, wait_healthy

    workloads = workloads_from_options(rates, trace, duration, requests, size, steps, guidance_scale, seed)
    plots = want_plots(plots)
    try:
        http_library()
    except RuntimeError as e:
        raise click.UsageError(str(e)) from None
    out = out or Path(default_out(f"serve-{trace}"))
    started, created = time.perf_counter(), time.strftime("%Y-%m-%dT%H:%M:%S%z")
    try:
        health = wait_healthy(url, wait_ready)
    except RuntimeError as e:
        raise click.ClickException(f"{e}; start one with: dfuse serve --model tiny-sd3") from None
    bar, progress = progress_bar(sum(len(w.specs) for w in workloads), "serve")
    try:
        with bar, HttpClient(url, api_key=api_key, timeout_s=request_timeout) as client:
            _, models = client.get_json("/v1/models")
            result = run_serve_bench(client, workloads, model=model, slo_ms=slo_ms, warmup=warmup,
                                     drain_s=drain_timeout, progress=progress)
    except Exception as e:  # a warm-up refused, the server gone: say what, not a traceback
        raise click.ClickException(f"{type(e).__name__}: {e}") from None
    doc = {
        "benchmark": "serve", "created": created, "command": shlex.join(["dfuse", *sys.argv[1:]]),
        "config": {"url": url, "trace": trace, "rates": [w.rate for w in workloads], "duration_s": duration,
                   "requests": requests, "size": size, "steps": steps, "guidance_scale": guidance_scale, "seed": seed,
                   "drain_s": drain_timeout, "warmup": warmup, "model": model},
        "server": {"health": health, "models": models}, "machine": machine(), "versions": versions(),
        "trace": {"requests_per_rate": {f"{w.rate:g}": len(w.specs) for w in workloads},
                  "duration_s": {f"{w.rate:g}": round(w.duration_s, 3) for w in workloads},
                  "interarrival_cv": {f"{w.rate:g}": w.interarrival_cv for w in workloads},
                  "kinds": {k: asdict(s) for k, s in kind_specs(workloads).items()}},
        **result, "wall_s": round(time.perf_counter() - started, 1),
    }
    written = write_serve_outputs(doc, out, plots)
    click.echo(format_table(doc))
    click.echo("Wrote " + ", ".join(str(p) for p in written))
    failed = sum(p["failed"] + p["unfinished"] for p in doc["points"])
    if failed:
        click.secho(f"WARNING: {failed} request(s) were not served; see errors_by_status in {out / 'serve.json'}",
                    fg="yellow", err=True)


def write_serve_outputs(doc: dict, out: Path, plots: bool) -> list[Path]:
    write_json(out / "serve.json", doc, indent=1)
    written = [out / "serve.json", write_csv(out / "serve.csv", SUMMARY_COLUMNS, summary_rows(doc))]
    if plots:
        from .serve_plots import plot_serve

        written.append(plot_serve(doc, out / "latency.png"))
    return written
