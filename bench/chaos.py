"""`dfuse bench chaos`: requests keep flowing while stage workers are killed with SIGKILL.

The scenario of issue 7, as a benchmark (tests/e2e/test_chaos.py runs the same driver):

    1. no-kill pass   the requests go through the engine; their images are the reference
    2. chaos pass     the same requests again, submitted in waves (a new wave of `wave` requests
                      whenever fewer than `wave` are outstanding); every `kill_every` completions a
                      random worker (seeded: a random stage, then a random instance of it) is killed
                      with SIGKILL; every request must complete with its no-kill image
    3. close          the engine closes; no worker process and no segment of it may remain

Recovery is measured two ways: the engine's own `stats().recovery_s` (death noticed ->
replacement READY) and, from outside, kill -> the victim's replacement reported ready (includes
the detection delay). A kill near the end of the pass can outlive it (the survivors serve the
last requests while the replacement still loads): after the pass the benchmark waits, at most
`Pace.reload_s`, for every replacement to be ready before reading the stats, and reports any
that was not. There are no timing assertions: only numbers.

How long a pass may go without a completion before it counts as stalled, and how long a
replacement may take to load, are measured on the engine itself (`Pace`): its start-up, and the
no-kill pass's time per wave of requests.
"""

from __future__ import annotations

import os
import platform
import random
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import click
import numpy as np

from ..scheduler.core import STAGES
from .faults import KINDS, Fault, inject
from .lib.leaks import close_and_check
from .lib.load import ClosedLoop, LoadRun
from .lib.load import drive as drive_load
from .lib.outputs import default_out, write_json
from .lib.prompts import make_prompts

# Small requests with CFG on: the chaos is in the processes, not in the math.
PARAMS = dict(num_inference_steps=2, guidance_scale=4.5, height=64, width=64)
# Two DiT instances: a dead DiT leaves a survivor serving while its replacement loads.
INSTANCES = {"encoder": 1, "dit": 2, "decoder": 1}
# Liveness is judged against the machine's own pace, measured on the engine under test, never in
# fixed seconds: on a machine busy with other jobs one reload alone can outlast the 20 s the chaos
# test once allowed (it failed with 60/200 done). A quiet spell counts as a stall only when it is
# PACE_FACTOR times longer than what this machine needs to get over a kill: generous, because
# other jobs may start after the measurement. It only bounds how long a hang takes to show; what
# is checked (every request served or failed with its reason, the engine serving at the end)
# does not depend on it.
PACE_FACTOR = 5


@dataclass(frozen=True)
class Pace:
    """How fast this machine serves this engine, measured on it: the yardstick of every liveness
    window of the chaos benchmark and its tests."""

    startup_s: float  # Engine() until every worker was ready: about a replacement's load (one
    # worker loading alone beside three serving ones, where start-up loads all four at once)
    wave_s: float = 0.0  # one wave of requests through the engine without kills (0: not measured)

    @property
    def reload_s(self) -> float:
        """The longest a worker may take to become ready: a victim's replacement, or the first
        results of a fresh engine."""
        return PACE_FACTOR * self.startup_s

    @property
    def stall_s(self) -> float:
        """The longest no request may complete: killing a stage's only worker pauses completions
        for its replacement's load plus the redo of the wave it held."""
        return PACE_FACTOR * (self.startup_s + self.wave_s)

    def with_wave_from(self, calm: "ChaosPass", wave: int) -> "Pace":
        """This pace, with the wave time of `calm`, a pass without kills."""
        n = len(calm.images)
        return Pace(self.startup_s, calm.wall_s * min(wave, n) / n if n else 0.0)

    def to_dict(self) -> dict:
        return {"startup_s": round(self.startup_s, 3), "wave_s": round(self.wave_s, 3), "factor": PACE_FACTOR,
                "reload_s": round(self.reload_s, 3), "stall_s": round(self.stall_s, 3)}


def start_engine(config) -> tuple[object, Pace]:
    """A started Engine, and its start-up time: the first measure of this machine's pace."""
    from ..engine.engine import Engine

    started = time.monotonic()
    engine = Engine(config=config)
    return engine, Pace(time.monotonic() - started)


def chaos_requests(n: int, params: dict | None = None) -> list[dict]:
    """n distinct requests (prompt i, seed i): a request served with another's image shows."""
    params = PARAMS if params is None else params
    return [dict(prompt=p, seed=i, **params) for i, p in enumerate(make_prompts(n))]


def max_attempts_for(requests: int, kill_every: int) -> int:
    # A kill costs each request in flight on the victim one attempt, and a request can be in flight
    # on at most one victim per kill: with K kills in all, no request loses more than K attempts.
    # K + 1 means chaos alone can never exhaust a request's attempts (only a real poison would).
    return min(100, requests // kill_every + 1)


Kill = Fault  # the first fault the benchmark knew (SIGKILL); bench/faults.py has them all


@dataclass
class ChaosPass:
    images: list[np.ndarray | None]
    errors: list[str | None]
    kills: list[Fault] = field(default_factory=list)  # every fault injected, in order
    worker_pids: set[int] = field(default_factory=set)  # every worker pid seen during the pass
    wall_s: float = 0.0
    stalled: str | None = None  # why the pass gave up waiting, if it did
    started: float = 0.0  # time.monotonic() at the start of the pass (Kill.at_s counts from it)

    @property
    def served(self) -> int:
        return sum(image is not None for image in self.images)


def drive(engine, requests: list[dict], kill_every: int | None, rng: random.Random | None = None, *,
          pace: Pace, wave: int = 20, progress=None, faults: tuple[str, ...] = ("kill",)) -> ChaosPass:
    """Submit `requests` in waves and, if `kill_every`, inject a fault every `kill_every`
    completions (by default SIGKILL a random worker; `faults` rotates through several kinds,
    bench/faults.py). Returns when every request has an outcome, or after `pace.stall_s` without
    any (a victim not ready within `pace.reload_s` also ends the pass)."""
    n = len(requests)
    victim_ready_s = pace.reload_s
    run = ChaosPass(images=[None] * n, errors=[None] * n)
    next_kill = [kill_every or n + 1]
    callbacks: list = []  # done-callbacks for the next request submitted (the callback fault)

    def watch(load: LoadRun, completed: int) -> None:
        workers = engine.stats().workers
        run.worker_pids.update(w.pid for w in workers if w.pid)
        _note_replacements(run, workers, load.start)
        if load.stalled or not next_kill[0] <= completed < n:
            return
        kind = faults[len(run.kills) % len(faults)]
        kill = inject(kind, engine, rng, completed, load.start, submit_hook=callbacks.append, wait_s=victim_ready_s)
        if kill is None:
            return load.stop(f"the chosen victim was not ready within {victim_ready_s:.1f} s")
        run.kills.append(kill)
        if kill.pid:
            run.worker_pids.add(kill.pid)
        next_kill[0] = (completed // kill_every + 1) * kill_every  # a burst past a multiple: one kill
        load.restart_stall_clock()  # a restart may pause completions: not a stall

    def image(_index: int, future) -> np.ndarray:
        return np.array(future.result().images[0])

    # The engine's state is read at every wake-up (a completion, or 20 ms), as a kill is due then.
    def submit(i: int):
        future = engine.submit(**requests[i])
        while callbacks:
            future.add_done_callback(callbacks.pop())
        return future

    load = drive_load(submit, n, ClosedLoop(wave), read=image, tick=watch,
                      wait_s=0.02, stall_s=pace.stall_s, progress=progress)
    run.started, run.wall_s, run.stalled = load.start, load.wall_s, load.stalled
    if run.stalled:
        run.stalled += (f" (windows measured on this engine: {PACE_FACTOR} x (start-up {pace.startup_s:.1f} s"
                        f" + a calm wave {pace.wave_s:.1f} s))")
    run.images = [o.value for o in load.outcomes]
    run.errors = load.errors
    return run


def _note_replacements(run: ChaosPass, workers: list, started: float) -> None:
    for kill in run.kills:
        if kill.worker_id is None or not kill.replaces:
            continue
        worker = workers[kill.worker_id]
        if kill.kill_to_ready_s is None and worker.ready and worker.pid != kill.pid:
            kill.kill_to_ready_s = round(time.monotonic() - started - kill.at_s, 3)


def await_replacements(engine, run: ChaosPass, timeout_s: float) -> list[Kill]:
    """Wait, at most `timeout_s`, until the replacement of every victim of `run` is ready (noting
    its kill -> ready time); returns the kills whose replacement still was not."""
    deadline = time.monotonic() + timeout_s
    while True:
        workers = engine.stats().workers
        run.worker_pids.update(w.pid for w in workers if w.pid)
        _note_replacements(run, workers, run.started)
        pending = [k for k in run.kills if k.replaces and k.kill_to_ready_s is None]
        if not pending or time.monotonic() >= deadline:
            return pending
        time.sleep(0.02)


def _quantiles(values: list[float]) -> dict:
    if not values:
        return {"n": 0, "p50": None, "max": None}
    return {"n": len(values), "p50": round(statistics.median(values), 3), "max": round(max(values), 3)}


def run_chaos(requests: int, kill_every: int, seed: int, model: str, *, wave: int = 20,
              instances: dict[str, int] | None = None, progress=None, faults: tuple[str, ...] = ("kill",)) -> dict:
    """Both passes on one engine, then close it; returns the JSON-ready report."""
    from ..engine.config import EngineConfig

    instances = dict(INSTANCES if instances is None else instances)
    max_attempts = max_attempts_for(requests, kill_every)
    work = chaos_requests(requests)
    config = EngineConfig(model=model, cpu_threads=1, instances=instances, max_attempts=max_attempts)
    engine, pace = start_engine(config)
    pids = {w.pid for w in engine.stats().workers}
    try:
        reference = drive(engine, work, None, pace=pace, wave=wave,
                          progress=progress and (lambda d: progress("no-kill", d)))
        pace = pace.with_wave_from(reference, wave)  # the no-kill pass is the calm measure
        pids |= reference.worker_pids
        chaos = drive(engine, work, kill_every, random.Random(seed), pace=pace, wave=wave,
                      progress=progress and (lambda d: progress("chaos", d)), faults=faults)
        # A victim killed near the end may still be loading its replacement: its recovery ends
        # after the last request, and stats read now would count its restart but not its
        # recovery (restarts 1, recovery None).
        if chaos.stalled:
            not_ready = [k for k in chaos.kills if k.replaces and k.kill_to_ready_s is None]
        else:
            not_ready = await_replacements(engine, chaos, pace.reload_s)
        pids |= chaos.worker_pids
        serving_at_end = _serves(engine, work[0], reference.images[0])
        stats = engine.stats()
    finally:
        leaks = close_and_check(engine, pids)
    equal = [
        i for i in range(requests)
        if chaos.images[i] is not None and reference.images[i] is not None
        and np.array_equal(chaos.images[i], reference.images[i])
    ]
    restarts = sum(w.restarts for w in stats.workers)
    kill_to_ready = [k.kill_to_ready_s for k in chaos.kills if k.kill_to_ready_s is not None]
    return {
        "benchmark": "chaos",
        "model": model,
        "params": PARAMS,
        "instances": instances,
        "max_attempts": max_attempts,
        "seed": seed,
        "kill_every": kill_every,
        "wave": wave,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": sys.version.split()[0]},
        "requests_submitted": requests,
        "requests_served": chaos.served,
        "requests_failed": sum(e is not None for e in chaos.errors),
        "errors": sorted({e for e in chaos.errors if e})[:10],
        "reference_served": reference.served,
        "images_equal_to_no_kill_run": len(equal),
        "unequal_indices": [i for i in range(requests) if chaos.images[i] is not None and i not in set(equal)][:20],
        "faults": list(faults),
        "faults_by_kind": {kind: sum(k.kind == kind for k in chaos.kills) for kind in faults},
        "serving_at_end": serving_at_end,
        # Faults after which a victim's replacement must become ready (a killed or long-stopped
        # worker; a worker killed again while loading recovers once): what recovery_s should count.
        "replacing_faults": sum(k.replaces for k in chaos.kills),
        "kills": len(chaos.kills),
        "kills_by_stage": {s: sum(k.stage == s for k in chaos.kills) for s in STAGES},
        "kills_with_work_in_flight": sum(k.inflight > 0 for k in chaos.kills),
        "restarts": restarts,
        "recovery_s": _quantiles(stats.recovery_s),
        "kill_to_ready_s": _quantiles(kill_to_ready),
        "replacement_wait_s": round(pace.reload_s, 3),
        "pace": pace.to_dict(),  # what the liveness windows (stall, reload) were measured from
        "replacements_not_ready": len(not_ready),  # after the pass and that wait: not measured
        "stalled": chaos.stalled or reference.stalled,
        "startup_s": round(pace.startup_s, 3),
        "no_kill_wall_s": round(reference.wall_s, 3),
        "chaos_wall_s": round(chaos.wall_s, 3),
        "chaos_over_no_kill_wall": round(chaos.wall_s / reference.wall_s, 3) if reference.wall_s else None,
        **leaks,
        "kill_log": [asdict(k) for k in chaos.kills],
    }


def _serves(engine, request: dict, expected) -> bool:
    """After the chaos: the engine still makes the calm run's image for a request."""
    try:
        image = engine.generate(**request, timeout=120)[0]
    except Exception:  # noqa: BLE001 - any failure here means it does not serve
        return False
    return expected is not None and np.array_equal(np.array(image), expected)


def format_report(doc: dict) -> str:
    r, k = doc["recovery_s"], doc["kill_to_ready_s"]
    faults = doc.get("faults_by_kind")
    lines = [
        f"requests served / submitted   {doc['requests_served']} / {doc['requests_submitted']}"
        f"  (failed {doc['requests_failed']})",
        *([f"faults injected               {faults}; serving at the end: {doc['serving_at_end']}"] if faults else []),
        f"images equal to no-kill run   {doc['images_equal_to_no_kill_run']} / {doc['requests_submitted']}",
        f"kills                         {doc['kills']}  by stage {doc['kills_by_stage']}, "
        f"{doc['kills_with_work_in_flight']} with work in flight; restarts {doc['restarts']}",
        f"recovery (noticed -> READY)   {_recovery(r, doc.get('replacing_faults', doc['restarts']), doc)}",
        f"fault -> replacement ready    {_recovery(k, doc.get('replacing_faults', doc['kills']), doc)}",
        f"wall: no-kill {doc['no_kill_wall_s']} s, chaos {doc['chaos_wall_s']} s "
        f"(x{doc['chaos_over_no_kill_wall']}); start-up {doc['startup_s']} s",
        f"leaked segments               {len(doc['leaked_segments'])} {doc['leaked_segments'] or ''}",
        f"leaked processes              {len(doc['leaked_processes'])} {doc['leaked_processes'] or ''}",
    ]
    if doc["run_dir_left"]:
        lines.append("socket folder left behind")
    if doc["stalled"]:
        lines.append(f"STALLED: {doc['stalled']}")
    return "\n".join(lines)


def _recovery(q: dict, expected: int, doc: dict) -> str:
    """p50/max of `expected` recoveries (restarts or kills), saying which ones were not measured."""
    if not expected:
        return "none (no worker was restarted)"
    missing = expected - q["n"]
    text = f"p50 {q['p50']} s  max {q['max']} s  (n={q['n']})" if q["n"] else "not measured"
    if missing > 0:
        wait = doc.get("replacement_wait_s")
        when = f"within {wait:g} s after the run ended" if wait else "before the run ended"
        text += f"  ({missing} of {expected} replacement(s) not ready {when})"
    return text


def passed(doc: dict) -> bool:
    """SIGKILLs alone: every request served with its calm-run image. With other faults a request
    may also fail, with its reason (a stage whose replacement is killed while it loads has no
    worker to serve it): every request is then served equal to the calm run or failed, and the
    engine still serves at the end. Never a stall, never a leak."""
    n, served = doc["requests_submitted"], doc["requests_served"]
    kills_only = set(doc.get("faults", ["kill"])) == {"kill"}
    outcomes = served == n if kills_only else served + doc["requests_failed"] == n
    return (outcomes and doc["images_equal_to_no_kill_run"] == served and doc.get("serving_at_end", True)
            and not doc["stalled"] and not doc["leaked_segments"] and not doc["leaked_processes"]
            and not doc["run_dir_left"])


@click.command("chaos")
@click.option("--requests", type=click.IntRange(1, 10_000), default=200, show_default=True, help="Requests per pass.")
@click.option("--kill-every", type=click.IntRange(1, 10_000), default=20, show_default=True,
              help="SIGKILL a random worker every this many completed requests.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the victim choice.")
@click.option("--model", default="tiny-sd3", show_default=True, help="Built-in tiny model, SD3 folder or synthetic:... spec.")
@click.option("--wave", type=click.IntRange(1, 256), default=20, show_default=True,
              help="Requests submitted together whenever fewer than this many are outstanding.")
@click.option("--faults", default="kill", show_default=True,
              help=f"Faults to rotate through, comma-separated: {', '.join(KINDS)} (bench/faults.py), or all.")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=default_out("chaos.json"),
              show_default=True, help="Where the JSON result is written.")
def chaos_command(requests, kill_every, seed, model, wave, faults, out):
    """Requests in flight while random workers are SIGKILLed (or stopped, killed while loading,
    the engine forked, callbacks blocked): served equal or failed with a reason, recovered,
    nothing leaked."""
    kinds = KINDS if faults == "all" else tuple(k.strip() for k in faults.split(",") if k.strip())
    unknown = [k for k in kinds if k not in KINDS]
    if unknown or not kinds:
        raise click.UsageError(f"--faults: unknown {', '.join(unknown) or '(none given)'}; known: {', '.join(KINDS)}, all")
    from tqdm import tqdm

    click.echo(f"chaos: {requests} requests, a fault ({', '.join(kinds)}) every {kill_every} completions, seed {seed}",
               err=True)
    bars: list[tqdm] = []

    def progress(phase: str, completed: int) -> None:
        if not bars or bars[-1].desc != phase:
            for bar in bars:
                bar.close()
            bars.append(tqdm(total=requests, desc=phase, unit="req", file=sys.stderr, disable=None))
        bars[-1].update(completed - bars[-1].n)

    try:
        doc = run_chaos(requests, kill_every, seed, model, wave=wave, progress=progress, faults=kinds)
    except ValueError as e:
        raise click.UsageError(str(e)) from None
    finally:
        for bar in bars:
            bar.close()
    write_json(out, doc)
    click.echo(format_report(doc))
    click.echo(f"Wrote {out}")
    if not passed(doc):
        sys.exit(1)
