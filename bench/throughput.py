"""Throughput: N requests through dfuse (3 stage processes) vs the same N through diffusers' monolithic
pipeline in one process, same outputs, reported side by side in one run.

Three mechanisms run the same N (prompt, seed) requests:

    mono_matched   StableDiffusion3Pipeline in this process, torch.set_num_threads(threads),
                   requests one after another (what a diffusers user writes). Same per-op thread
                   count as every dfuse worker, so its images are bit-identical to dfuse's.
    mono_all       the same pipeline with torch.set_num_threads(mono_threads) (default: every core):
                   the strongest monolithic baseline on this machine (its last bits may differ).
    dfuse          Engine(instances encoder=1, dit=1, decoder=1, cpu_threads=threads); all N
                   submitted at once (open queue) so the three stages overlap.

Wall time runs from the first request started (submitted) to the last image received; model
loading / engine start-up and warm-up requests are excluded and reported separately.
throughput = N / wall. The mechanisms are timed in interleaved rounds (median reported), each
phase after waiting for an idle machine: on 2 shared cores, other processes distort multi-threaded
torch badly, so the CPU time others used during each phase is measured and reported too.
Every dfuse image is compared with the mono_matched image of the same prompt and seed
(np.array_equal). There are no timing assertions anywhere: only numbers.
"""

from __future__ import annotations

import os
import platform
import time
from typing import Callable

import numpy as np

from ..scheduler.core import STAGES
from .lib.libraries import package_version
from .lib.load import ClosedLoop, drive
from .lib.meter import BUSY_SHARE, CpuMeter, wait_quiet
from .lib.prompts import BASE_SEED, make_prompts
from .lib.reference import generate, load_pipeline


Progress = Callable[[str, int, int], None]  # (phase, done, total)


def run_throughput(
    requests: int = 16,
    steps: int = 8,
    height: int = 256,
    width: int = 256,
    guidance_scale: float = 4.5,
    threads: int = 1,
    model: str | None = None,
    warmup: int = 3,
    *,
    mono_threads: int | None = None,
    rounds: int = 5,
    attempts: int = 2,
    quiet_wait_s: float = 30.0,
    progress: Progress | None = None,
) -> dict:
    """Run the three mechanisms on the same workload and return the result document (JSON-ready).

    threads: torch threads of each dfuse worker and of the matched monolithic baseline.
    mono_threads: torch threads of the strongest monolithic baseline (default: os.cpu_count()).
    rounds: every mechanism is timed this many times, interleaved (the order rotates each round);
    the median round is reported, with every round's throughput beside it.
    attempts / quiet_wait_s: before each timed phase wait (at most quiet_wait_s) for the machine to
    be idle; repeat a phase during which other processes used more than BUSY_SHARE of the cores,
    at most `attempts` times in all, and keep the least disturbed run.
    """
    import torch

    from ..engine.config import DEFAULT_MODEL
    from ..engine.engine import Engine
    from ..engine.models import describe_model, resolve_model_path
    from ..engine.requests import build_requests

    if min(requests, steps, threads, rounds, attempts) < 1 or warmup < 0:
        raise ValueError("requests, steps, threads, rounds and attempts must be >= 1 and warmup >= 0")
    cores = os.cpu_count() or 1
    mono_threads = mono_threads or cores
    model_name = model or DEFAULT_MODEL
    model_path = resolve_model_path(model_name)
    # Bad sizes, steps or guidance: a ValueError naming the field before any process starts.
    build_requests(describe_model(model_path), "a red fox", None, steps, guidance_scale, height, width, 0)
    prompts = make_prompts(requests)
    seeds = [BASE_SEED + i for i in range(requests)]
    warm_prompts = [f"a photo of a house {i}" for i in range(warmup)]
    params = dict(num_inference_steps=steps, guidance_scale=guidance_scale, height=height, width=width)
    report = progress or (lambda phase, done, total: None)
    load_before = os.getloadavg()
    threads_before = torch.get_num_threads()

    # Start both sides first (the engine's workers idle on a blocking receive while the
    # monolithic pipeline runs in this process, and this process's core thread idles likewise).
    started = time.perf_counter()
    engine = Engine(model=model, device="cpu", instances={s: 1 for s in STAGES}, cpu_threads=threads)
    engine_start_s = time.perf_counter() - started
    try:
        started = time.perf_counter()
        pipe = load_pipeline(model_path)
        mono_load_s = time.perf_counter() - started

        def mono(prompt: str, seed: int) -> np.ndarray:
            return np.asarray(generate(pipe, seed, prompt=prompt, negative_prompt=None, **params))

        def run_mono(n_threads: int):
            def run(on_done):
                torch.set_num_threads(n_threads)
                done_at, out = [], []
                t0 = time.perf_counter()
                for i, (p, s) in enumerate(zip(prompts, seeds)):
                    out.append(mono(p, s))
                    done_at.append(time.perf_counter() - t0)
                    on_done(i + 1)
                return done_at, out
            return run

        def run_dfuse(on_done):
            # All at once; the results are only kept during the timed phase (converted after it).
            run = drive(lambda i: engine.submit(prompts[i], seed=seeds[i], **params), requests,
                        ClosedLoop(requests), progress=on_done)
            failed = [(i, o.error) for i, o in enumerate(run.outcomes) if o.error is not None]
            if failed:
                raise RuntimeError(f"dfuse request {failed[0][0]} failed: {failed[0][1]}")
            outcomes = [o.value for o in run.outcomes]
            done_at = [o.done_s for o in run.outcomes]
            return done_at, ([np.asarray(r.images[0]) for r in outcomes], [r.timings[0] for r in outcomes])

        engine_pids = [os.getpid()] + [w.pid for w in engine.stats().workers]
        mechanisms = {  # name -> (run, processes whose CPU time is ours)
            "mono_matched": (run_mono(threads), [os.getpid()]),
            "mono_all": (run_mono(mono_threads), [os.getpid()]),
            "dfuse": (run_dfuse, engine_pids),
        }

        # Warm-up (untimed). dfuse's runs one request at a time: nothing overlaps, so these are
        # each stage's costs alone (the first pays one-off costs and is left out of them).
        wait_quiet(min(quiet_wait_s, 10.0))
        for n_threads, name in ((threads, "mono_matched"), (mono_threads, "mono_all")):
            torch.set_num_threads(n_threads)
            for i, p in enumerate(warm_prompts):
                mono(p, i)
                report(f"{name} warm-up", i + 1, warmup)
        isolated = []
        for i, p in enumerate(warm_prompts):
            isolated.append(engine.submit(p, seed=i, **params).result().timings[0])
            report("dfuse warm-up", i + 1, warmup)

        runs: dict[str, list[dict]] = {name: [] for name in mechanisms}
        outputs: dict[str, list] = {name: [] for name in mechanisms}
        order = list(mechanisms)
        for r in range(rounds):
            for name in order[r % len(order):] + order[:r % len(order)]:
                run, pids = mechanisms[name]
                numbers, payload = _timed(f"{name} round {r + 1}", run, pids, requests, attempts, quiet_wait_s, report)
                if name == "dfuse":
                    payload, timings = payload
                    numbers["stage_compute_ms_under_load"] = _stage_ms(timings, "compute_s")
                    numbers["stage_queued_ms_under_load"] = _stage_ms(timings, "queued_s")
                runs[name].append({"round": r + 1, **numbers})
                outputs[name].append(payload)
        worker_load_s = {w.stage: w.load_s for w in engine.stats().workers}
    finally:
        torch.set_num_threads(threads_before)
        engine.close()

    descriptions = {
        "mono_matched": (f"diffusers StableDiffusion3Pipeline in one process, torch threads {threads}, "
                         "requests one after another", 1, threads, mono_load_s),
        "mono_all": (f"diffusers StableDiffusion3Pipeline in one process, torch threads {mono_threads}, "
                     "requests one after another", 1, mono_threads, mono_load_s),
        "dfuse": (f"dfuse Engine, {len(STAGES)} stage processes (encoder, dit, decoder) x {threads} torch "
                  "thread(s), all requests submitted at once", len(STAGES), threads, engine_start_s),
    }
    results = []
    for name, (description, processes, n_threads, startup) in descriptions.items():
        by_rps = sorted(runs[name], key=lambda x: x["throughput_rps"])
        median = by_rps[(len(by_rps) - 1) // 2]  # the lower median for an even count
        entry = {
            "mechanism": name,
            "description": description,
            "processes": processes,
            "threads_per_process": n_threads,
            "total_threads": processes * n_threads,
            "startup_s": round(startup, 3),
            **{k: v for k, v in median.items() if k != "round"},
            "median_of_rounds": len(by_rps),
            "throughput_rps_per_round": [x["throughput_rps"] for x in runs[name]],
        }
        if name == "dfuse":
            entry["worker_load_s"] = worker_load_s
            entry["stage_compute_ms_alone"] = _stage_ms(isolated[1:] or isolated, "compute_s")
        results.append(entry)

    reference = outputs["mono_matched"][0]
    equal = [all(np.array_equal(a, b) for a, b in zip(images, reference)) for images in outputs["dfuse"]]
    unequal = sorted({i for images in outputs["dfuse"] for i, (a, b) in enumerate(zip(images, reference))
                      if not np.array_equal(a, b)})
    by_name = {r["mechanism"]: r for r in results}
    dfuse_rps = by_name["dfuse"]["throughput_rps"]
    alone = by_name["dfuse"]["stage_compute_ms_alone"]
    alone_s = [v / 1000 for v in alone.values()]

    def per_round(baseline: str) -> list[float]:
        return [round(a["throughput_rps"] / b["throughput_rps"], 3) for a, b in zip(runs["dfuse"], runs[baseline])]

    return {
        "benchmark": "throughput",
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": {
            "cpu_count": cores,
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "diffusers": package_version("diffusers"),
            "device": "cpu",
            "loadavg_1_5_15_before": [round(x, 2) for x in load_before],
            "loadavg_1_5_15_after": [round(x, 2) for x in os.getloadavg()],
        },
        "workload": {
            "model": model_name,
            "model_path": str(model_path),
            "requests": requests,
            "warmup_requests_per_mechanism": warmup,
            "rounds": rounds,
            "num_inference_steps": steps,
            "guidance_scale": guidance_scale,
            "height": height,
            "width": width,
            "prompts": "distinct prompts, prompt i with seed %d + i" % BASE_SEED,
            "timing": "wall from first request started to last image received; start-up and warm-up excluded; "
                      "each mechanism timed once per round (order rotating), median round reported",
        },
        "results": results,
        "ratios": {
            "dfuse_vs_mono_matched": round(dfuse_rps / by_name["mono_matched"]["throughput_rps"], 3),
            "dfuse_vs_mono_all": round(dfuse_rps / by_name["mono_all"]["throughput_rps"], 3),
        },
        "ratios_per_round": {
            "dfuse_vs_mono_matched": per_round("mono_matched"),
            "dfuse_vs_mono_all": per_round("mono_all"),
        },
        "ratio_definitions": {
            "dfuse_vs_mono_matched": f"median dfuse throughput / median mono with {threads} thread(s) "
                                     "(same per-op threads, identical images)",
            "dfuse_vs_mono_all": f"median dfuse throughput / median mono with {mono_threads} threads "
                                 "(the strongest monolithic run on this machine)",
        },
        "pipeline_bound_rps": {
            # What a perfect pipeline of these stages could reach: one stage per core at most.
            "slowest_stage": round(1 / max(alone_s), 4) if alone_s else None,
            "cores": round(min(cores, len(STAGES)) / sum(alone_s), 4) if alone_s else None,
            "note": "from stage_compute_ms_alone: 1/slowest stage, and cores/sum of stages (3 busy processes "
                    "cannot use more than the machine's cores)",
        },
        "machine_busy_during_timing": sorted({
            f"{name} round {x['round']}" for name, xs in runs.items() for x in xs
            if (x.get("other_processes_cpu_share") or 0) > BUSY_SHARE
        }),
        "outputs_equal": all(equal),
        "outputs_compared": "every dfuse image of every round vs the mono_matched image for the same prompt and "
                            "seed (np.array_equal)",
        "outputs_unequal_indices": unequal,
        "mono_all_equals_mono_matched": all(
            np.array_equal(a, b) for a, b in zip(outputs["mono_all"][0], reference)
        ),
    }


def _timed(label: str, run, pids: list[int], requests: int, attempts: int, quiet_wait_s: float,
           report: Progress) -> tuple[dict, object]:
    """Run one timed phase, again (up to `attempts` in all) while other processes disturb it."""
    best = None
    for attempt in range(1, attempts + 1):
        shown = label if attempt == 1 else f"{label} (again: machine busy)"
        waited = wait_quiet(quiet_wait_s)
        meter = CpuMeter(pids)
        done_at, payload = run(lambda i: report(shown, i, requests))
        wall = max(done_at)
        cpu = meter.stop(wall)
        share = cpu.get("other_processes_cpu_share", 0.0)
        if best is None or share < best[0]["other_processes_cpu_share"]:
            best = ({"wall_s": round(wall, 4), "throughput_rps": round(requests / wall, 4),
                     "latency_mean_s": round(float(np.mean(done_at)), 4),
                     **cpu, "other_processes_cpu_share": share, "waited_for_quiet_s": round(waited, 1)}, payload)
        best[0]["attempts"] = attempt
        if share <= BUSY_SHARE:
            break
    return best


def _stage_ms(timings: list[dict], attr: str) -> dict[str, float]:
    if not timings:
        return {}
    return {s: round(1000 * float(np.mean([getattr(t[s], attr) for t in timings])), 2) for s in STAGES}


def format_table(doc: dict) -> str:
    """A short plain-text summary of a result document."""
    rows = [("mechanism", "procs x threads", "wall s", "req/s", "req/s per round", "mean latency s", "our CPU",
             "others' CPU")]
    for r in doc["results"]:
        share = r.get("other_processes_cpu_share")
        rows.append((r["mechanism"], f"{r['processes']} x {r['threads_per_process']}", f"{r['wall_s']:.2f}",
                     f"{r['throughput_rps']:.2f}", " ".join(f"{x:.2f}" for x in r["throughput_rps_per_round"]),
                     f"{r['latency_mean_s']:.2f}",
                     "?" if share is None else f"{r['cpu_utilisation']:.0%}",
                     "?" if share is None else f"{share:.0%}"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)) for row in rows]
    ratios = doc["ratios"]
    lines.append(f"(median of {doc['workload']['rounds']} rounds, {doc['workload']['requests']} requests each)  "
                 f"dfuse / mono_matched = {ratios['dfuse_vs_mono_matched']:.2f}x   "
                 f"dfuse / mono_all = {ratios['dfuse_vs_mono_all']:.2f}x")
    dfuse = next(r for r in doc["results"] if r["mechanism"] == "dfuse")
    alone, loaded = dfuse["stage_compute_ms_alone"], dfuse["stage_compute_ms_under_load"]
    if alone:
        lines.append("dfuse stage compute ms, alone -> under load: " + ", ".join(
            f"{s} {alone[s]:.0f} -> {loaded[s]:.0f}" for s in alone))
    if doc["machine_busy_during_timing"]:
        lines.append(f"other processes used > {BUSY_SHARE:.0%} of the cores during: "
                     + ", ".join(doc["machine_busy_during_timing"]) + " (numbers distorted)")
    lines.append("outputs equal (dfuse vs mono_matched): " + ("yes" if doc["outputs_equal"] else "NO"))
    return "\n".join(lines)
