"""The two kinds of system `dfuse bench sweep` drives, behind one interface (submit -> Future,
outcome, sample, close): a dfuse Engine, and the monolithic baseline's pool (bench/sweep/monolithic.py)."""

from __future__ import annotations

import statistics
import time
from concurrent.futures import Future
from typing import Mapping

from ...engine.config import TransportConfig
from ...engine.cpu_wake import CpuWakeHold
from ...engine.devices import ROLES, split_node
from ...engine.protocol import RequestParams
from ...scheduler.core import STAGES
from ..lib.leaks import close_and_check

ISOLATED_REPEATS = 3
REQUEST_TIMEOUT_S = 600.0  # one warm-up or isolated request, alone


def check_output(params: RequestParams, height: int, width: int, pixel: int, synthetic: bool) -> str | None:
    """None when the output is the request's own; the synthetic image's value is seed % 251."""
    if (height, width) != (params.height, params.width):
        return f"wrong output: {width}x{height} px for a {params.width}x{params.height} request"
    if synthetic and pixel != params.seed % 251:
        return f"wrong output: another request's image (value {pixel}, seed {params.seed})"
    return None


def device_stages(stats) -> dict[str, list[str]]:
    """Device -> the stages of its workers (pipeline order), a moving worker counted in the
    stage it moves to: where the engine's capacity is going."""
    hosts: dict[str, list[str]] = {device: [] for device in stats.placement}
    for worker in stats.workers:
        hosts.setdefault(worker.device, []).append(worker.moving_to or worker.stage)
    return {device: sorted(stages, key=ROLES.index) for device, stages in hosts.items()}


class EngineRunner:
    """A dfuse Engine with the sweep's layout (devices + instances, or a pool + placement) and
    `mode`'s policy; mode auto: the pool with placement "auto" and the elastic policy, which may
    give devices the fused role."""

    def __init__(self, config, mode: str):
        from ...engine.engine import Engine

        policy = "elastic" if mode == "auto" else mode
        if config.placement is None:
            layout = {"device": config.devices, "instances": config.instances}
        elif mode == "auto":
            layout = {"devices": list(config.devices), "placement": "auto"}
        else:
            layout = {"devices": list(config.devices), "placement": {d: list(s) for d, s in config.placement.items()}}
        started, self.created = time.perf_counter(), time.monotonic()  # ~ the engine's clock zero
        self.engine = Engine(model=config.model, **layout, cpu_threads=config.threads, policy=policy,
                             cluster=config.cluster, ray_address=config.ray_address)
        self.startup_s = round(time.perf_counter() - started, 3)
        # This host's workers: another node's pid means nothing here (nor their CPU time, nor leaks)
        self.pids = {w.pid for w in self.engine.stats().workers if w.pid and not w.remote}
        self._synthetic = config.synthetic

    def submit(self, p: RequestParams) -> Future:
        return self.engine.submit(p.prompt, negative_prompt=p.negative_prompt,
                                  num_inference_steps=p.num_inference_steps, guidance_scale=p.guidance_scale,
                                  height=p.height, width=p.width, seed=p.seed, true_cfg_scale=p.true_cfg_scale)

    def outcome(self, future: Future, p: RequestParams) -> tuple[str | None, dict]:
        result = future.result()
        image = result.images[0]
        stages = {s: [t.waited_s + t.queued_s, t.compute_s] for s, t in result.timings[0].items()}
        return check_output(p, image.height, image.width, image.getpixel((0, 0))[0], self._synthetic), stages

    def sample(self) -> dict:
        stats = self.engine.stats()
        workers = stats.workers
        self.pids.update(w.pid for w in workers if w.pid)  # replacements after a crash too
        return {
            "placement": {role: stats.instances.get(role, 0) for role in ROLES},  # the same columns all along
            "queues": dict(stats.queues),
            "inflight": {role: sum(w.inflight for w in workers if w.stage == role) for role in ROLES},
            "moving": sum(w.moving_to is not None for w in workers),
            "devices": device_stages(stats),
        }

    def close(self) -> dict:
        stats = self.engine.stats()
        leaks = close_and_check(self.engine, self.pids)
        return {"moves": [m.to_dict() for m in stats.moves], "decisions": list(stats.decisions),
                "placement_end": dict(stats.instances), "placement_end_devices": device_stages(stats),
                "switch_s": list(stats.switch_s), "startup_s": self.startup_s,
                "restarts": sum(w.restarts for w in stats.workers), **leaks}


class MonoRunner:
    """The monolithic baseline's processes (bench/sweep/monolithic.py), warmed up with every kind."""

    def __init__(self, config, warmup: tuple[RequestParams, ...]):
        from ...engine.models import resolve_model_path
        from .monolithic import MonolithicPool, describe, monolithic_configs

        model = config.model if config.synthetic else str(resolve_model_path(config.model))
        if config.placement is None:
            devices = config.devices if isinstance(config.devices, Mapping) else {s: config.devices for s in STAGES}
            configs = monolithic_configs(model, dict(devices), dict(config.instances), config.mono_threads, warmup)
        else:  # one process per pool device, pinned to its cores
            pool = tuple(split_node(d)[1] for d in config.devices)  # on a cluster: here, without the node names
            configs = monolithic_configs(model, {}, {}, config.mono_threads, warmup, pool=pool)
        self.configs, self.on_pool = configs, config.placement is not None
        self.description = describe(configs, pool=self.on_pool)
        started = time.perf_counter()
        self.pool = MonolithicPool(configs)
        self.startup_s = round(time.perf_counter() - started, 3)
        self.pids = set(self.pool.pids)
        self._synthetic = config.synthetic
        # The engines it is compared with keep idle CPUs quick to wake (system-wide): so does it.
        wake_us = TransportConfig().cpu_wake_latency_us
        self._cpu_wake = None if wake_us is None else CpuWakeHold.acquire(wake_us)

    def submit(self, p: RequestParams) -> Future:
        return self.pool.submit(p)

    def outcome(self, future: Future, p: RequestParams) -> tuple[str | None, None]:
        height, width, pixel = future.result()
        return check_output(p, height, width, pixel, self._synthetic), None

    def sample(self) -> dict:
        stats = self.pool.stats()
        sample = {"placement": {"mono": stats["processes"]}, "queues": {"mono": stats["queue"]},
                  "inflight": {"mono": stats["busy"]}, "moving": 0}
        if self.on_pool:  # each pool device runs one whole-model process while it lives
            sample["devices"] = {c.device: ["mono"] if i in stats["alive"] else [] for i, c in enumerate(self.configs)}
        return sample

    def processes(self) -> list[dict]:
        """Each process: its device, the cores it was pinned to, and what it reported at READY
        (the cores it runs on, its torch threads, its load time)."""
        return [{"device": c.device, "cpus": None if c.cpus is None else list(c.cpus), "threads": c.threads, **ready}
                for c, ready in zip(self.configs, self.pool.ready)]

    def close(self) -> dict:
        if self._cpu_wake is not None:
            self._cpu_wake.release()
        return {"leaked_processes": self.pool.close(), "leaked_segments": [], "run_dir_left": False}


def served_or_raise(runner, params: RequestParams, what: str) -> float:
    """Run one request alone; its latency in seconds (RuntimeError naming `what` if it fails)."""
    started = time.perf_counter()
    future = runner.submit(params)
    try:
        future.result(REQUEST_TIMEOUT_S)
        elapsed = time.perf_counter() - started
        error, _ = runner.outcome(future, params)
    except Exception as e:
        raise RuntimeError(f"{what} failed: {type(e).__name__}: {e}") from None
    if error:
        raise RuntimeError(f"{what}: {error}")
    return elapsed


def measure_isolated(runner, kinds: dict[str, RequestParams], repeats: int = ISOLATED_REPEATS) -> dict[str, float]:
    """Median latency of each kind alone (one request at a time), after one warm-up request."""
    isolated = {}
    for name, params in kinds.items():
        served_or_raise(runner, params, f"warm-up request ({name})")
        times = [served_or_raise(runner, params, f"isolated request ({name})") for _ in range(repeats)]
        isolated[name] = round(statistics.median(times), 4)
    return isolated
