"""The monolithic baseline of `dfuse bench sweep`: whole requests in one process per device.

Each process holds the whole model and runs a request's encoder, DiT and decoder back to back:

    diffusers model   `DiffusionPipeline.from_pretrained(folder)` (what a diffusers user serves),
                      one process per distinct device of the engine; on the CPU one process with
                      torch threads = every core (the strongest single-process setup on a CPU)
    synthetic model   the synthetic family's own encode / denoise / decode (identical costs),
                      one process per engine worker: with mode=sleep each worker stands for a
                      device of its own, so the baseline gets as many devices as the engine

On a device pool (--devices/--placement) either model runs one process per pool device, the
devices the engine gets: on a core set `cpu:A-B` the process is pinned to those cores (every
thread, from its first line) with one torch thread per core, as the engine's workers there are.

The pool in the parent keeps the queue (first come, first served) and hands a request to a
process only when that process is idle, so a request cancelled while queued never runs.
Messages are msgspec-encoded bytes over one pipe per process (no pickle after start-up).
"""

from __future__ import annotations

import collections
import itertools
import multiprocessing
import multiprocessing.connection
import os
import socket
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass

import msgspec

from ...engine.cpu_affinity import describe as describe_cpus
from ...engine.cpu_affinity import pin_this_process
from ...engine.devices import device_cpus, torch_device
from ...engine.protocol import RequestParams
from ...engine.models.synthetic import PREFIX as SYNTHETIC_PREFIX

_TASK = msgspec.msgpack.Decoder(tuple[int, RequestParams])
_REPLY = msgspec.msgpack.Decoder(list)  # ["ready", {...}], ["failed", str], ["done" / "error", id, ...]
PARENT_CHECK_S = 1.0  # how often an idle process checks that its parent still lives


@dataclass(frozen=True)
class MonolithicConfig:
    """One monolithic process: the whole model on one device."""

    model: str
    """A resolved model folder or a synthetic:... spec."""
    device: str
    """cpu, cuda or cuda:N, or a pool's device (a core set cpu:A-B too)."""
    threads: int
    """Torch threads (CPU work)."""
    warmup: tuple[RequestParams, ...] = ()
    """Requests run once before READY (first-call costs stay out of the measurement)."""
    cpus: tuple[int, ...] | None = None
    """The cores every thread of the process runs on (a core-set device's); None: where the OS puts them."""


def monolithic_configs(model: str, devices: dict[str, str], instances: dict[str, int], threads: int | None,
                       warmup: tuple[RequestParams, ...] = (), *,
                       pool: tuple[str, ...] | None = None) -> list[MonolithicConfig]:
    """One config per process of the fairest monolithic baseline for this engine layout: given the
    engine's device `pool` (canonical names), one per pool device whatever the model, pinned to a
    core set's cores with `threads` or one torch thread per core; else from `devices` (per stage)
    and `instances`."""
    if pool is not None:
        return [_pool_config(model, device, threads, warmup) for device in pool]
    if model.startswith(SYNTHETIC_PREFIX):
        return [MonolithicConfig(model, "cpu", 1, warmup) for _ in range(sum(instances.values()))]
    cores = os.cpu_count() or 1
    return [MonolithicConfig(model, device, threads or cores if device == "cpu" else 1, warmup)
            for device in sorted(set(devices.values()))]


def _pool_config(model: str, device: str, threads: int | None, warmup: tuple[RequestParams, ...]) -> MonolithicConfig:
    cpus = device_cpus(device)
    if cpus:
        count = threads or len(cpus)
    else:
        count = (threads or os.cpu_count() or 1) if device == "cpu" else 1
    return MonolithicConfig(model, device, count, warmup, cpus)


def describe(configs: list[MonolithicConfig], pool: bool = False) -> str:
    """One line for the report: what each process runs, where (`pool`: one per pool device)."""
    synthetic = configs[0].model.startswith(SYNTHETIC_PREFIX)
    if synthetic and not pool:
        return (f"{len(configs)} processes (one per engine worker: a simulated device each), each running the "
                "synthetic encode, denoise and decode back to back")
    what = "synthetic encode, denoise and decode" if synthetic else "DiffusionPipeline"
    return ("one process per pool device: " if pool else "") + "; ".join(
        f"{what} in one process on {c.device}" + (f" pinned to CPU {describe_cpus(c.cpus)}" if c.cpus else "")
        + f" with {c.threads} torch thread(s)" for c in configs)


def run_monolithic(config: MonolithicConfig, conn) -> None:
    """Process entry point: load, warm up, say READY, then serve tasks until told to stop or orphaned."""
    if config.cpus:  # before torch starts its threads: they all inherit it
        pin_this_process(config.cpus)
    parent = os.getppid()
    try:
        started = time.perf_counter()
        generate = _load(config)
        for params in config.warmup:
            generate(params)
        import torch

        ready = {"load_s": round(time.perf_counter() - started, 3), "runs_on": sorted(os.sched_getaffinity(0)),
                 "torch_threads": torch.get_num_threads()}
        conn.send_bytes(msgspec.msgpack.encode(["ready", ready]))
    except Exception as e:  # reported to the parent, which fails the start-up with it
        conn.send_bytes(msgspec.msgpack.encode(["failed", f"{type(e).__name__}: {e}"]))
        return
    while True:
        if not conn.poll(PARENT_CHECK_S):
            if os.getppid() != parent:
                return  # orphaned: the parent died without closing us
            continue
        try:
            data = conn.recv_bytes()
        except EOFError:
            return
        if not data:
            return  # an empty message: stop
        task_id, params = _TASK.decode(data)
        try:
            reply = ["done", task_id, generate(params)]
        except Exception as e:  # one request failed; the process keeps serving
            reply = ["error", task_id, f"{type(e).__name__}: {e}"]
        conn.send_bytes(msgspec.msgpack.encode(reply))


def _load(config: MonolithicConfig):
    """A function params -> [height, width, first pixel's red value] of the image it made."""
    import torch

    torch.set_num_threads(config.threads)
    if config.model.startswith(SYNTHETIC_PREFIX):
        return _load_synthetic(config)
    from ...engine.config import EngineConfig
    from ..lib.reference import generate, load_pipeline

    device = torch_device(config.device)  # cpu:0-3 is torch's cpu
    dtype = EngineConfig().torch_dtype(device)  # the engine's dtype="auto" for this device
    pipe = load_pipeline(config.model, device, dtype)

    def generate_one(params: RequestParams) -> list[int]:
        extra = {"true_cfg_scale": params.true_cfg_scale} if params.true_cfg_scale > 1 else {}
        image = generate(pipe, params.seed, prompt=params.prompt, negative_prompt=params.negative_prompt,
                         num_inference_steps=params.num_inference_steps, guidance_scale=params.guidance_scale,
                         height=params.height, width=params.width, **extra)
        return [image.height, image.width, image.getpixel((0, 0))[0]]

    return generate_one


def _load_synthetic(config: MonolithicConfig):
    import torch

    from ...stages.families.synthetic import SyntheticFamily

    family = SyntheticFamily(config.model)
    device = torch.device(torch_device(config.device))
    models = [load(config.model, device, torch.float32)
              for load in (family.load_encoder, family.load_dit, family.load_decoder)]

    def generate(params: RequestParams) -> list[int]:
        embeds = family.encode(models[0], params)
        latents = family.denoise(models[1], embeds, params, lambda step, total: None)
        image = family.decode(models[2], latents, params)["image"]
        return [image.shape[1], image.shape[2], int(image[0, 0, 0, 0])]

    return generate


class MonolithicPool:
    """Monolithic processes fed from one first-come-first-served queue in this process.

    `submit` returns a Future of [height, width, first pixel]; `close` stops every process.
    """

    def __init__(self, configs: list[MonolithicConfig], startup_timeout_s: float = 600.0):
        context = multiprocessing.get_context("spawn")
        self._processes, self._conns = [], []
        for index, config in enumerate(configs):
            parent_end, child_end = context.Pipe()
            process = context.Process(target=run_monolithic, args=(config, child_end), daemon=True,
                                      name=f"dfuse-mono-{index}")
            process.start()
            child_end.close()
            self._processes.append(process)
            self._conns.append(parent_end)
        self.pids = [p.pid for p in self._processes]
        self._ids = itertools.count()
        self._lock = threading.Lock()
        self._queue: collections.deque = collections.deque()
        self._running: dict[int, tuple[int, Future]] = {}  # process index -> (task id, future)
        self._alive = set(range(len(configs)))
        self._closing = False
        self._wake_recv, self._wake_send = socket.socketpair()
        try:
            self.ready = self._wait_ready(startup_timeout_s)
            self.load_s = [r["load_s"] for r in self.ready]
        except BaseException:
            self.close()
            raise
        self._thread = threading.Thread(target=self._loop, name="mono-dispatch", daemon=True)
        self._thread.start()

    def _wait_ready(self, timeout_s: float) -> list[dict]:
        """What each process reported at READY: load_s, runs_on (its cores), torch_threads."""
        deadline, ready = time.monotonic() + timeout_s, []
        for index, conn in enumerate(self._conns):
            if not conn.poll(max(0.0, deadline - time.monotonic())):
                raise RuntimeError(f"monolithic process {index} was not ready within {timeout_s:g} s")
            try:
                kind, detail = _REPLY.decode(conn.recv_bytes())
            except EOFError:
                raise RuntimeError(f"monolithic process {index} exited before it was ready") from None
            if kind != "ready":
                raise RuntimeError(f"monolithic process {index} failed to start: {detail}")
            ready.append(detail)
        return ready

    def submit(self, params: RequestParams) -> Future:
        future: Future = Future()
        with self._lock:
            if self._closing or not self._alive:
                raise RuntimeError("the monolithic pool is closed or has no live process")
            self._queue.append((next(self._ids), params, future))
        self._wake_send.send(b"\0")
        return future

    def stats(self) -> dict:
        with self._lock:
            return {"queue": len(self._queue), "busy": len(self._running), "processes": len(self._alive),
                    "alive": sorted(self._alive)}

    # --- the dispatch thread --------------------------------------------------------------------
    def _loop(self) -> None:
        while not self._closing:
            watched = [self._wake_recv] + [self._conns[i] for i in self._alive]
            watched += [self._processes[i].sentinel for i in self._alive]
            for ready in multiprocessing.connection.wait(watched, timeout=0.5):
                if ready is self._wake_recv:
                    self._wake_recv.recv(4096)
                elif isinstance(ready, int):
                    self._on_death(next(i for i in self._alive if self._processes[i].sentinel == ready))
                else:
                    self._on_reply(self._conns.index(ready))
            self._dispatch()

    def _on_reply(self, index: int) -> None:
        try:
            kind, _task_id, detail = _REPLY.decode(self._conns[index].recv_bytes())
        except (EOFError, OSError):
            return  # the process is gone: its sentinel reports the death
        with self._lock:
            _, future = self._running.pop(index)
        if kind == "done":
            future.set_result(detail)
        else:
            future.set_exception(RuntimeError(detail))

    def _on_death(self, index: int) -> None:
        with self._lock:
            self._alive.discard(index)
            running = self._running.pop(index, None)
            orphans = list(self._queue) if not self._alive else []
            if orphans:
                self._queue.clear()
        code = self._processes[index].exitcode
        for _, future in ([running[1]] if running else []) + [f for _, _, f in orphans]:
            future.set_exception(RuntimeError(f"monolithic process {index} died (exit code {code})"))

    def _dispatch(self) -> None:
        with self._lock:
            idle = [i for i in sorted(self._alive) if i not in self._running]
            while idle and self._queue:
                task_id, params, future = self._queue.popleft()
                if not future.set_running_or_notify_cancel():
                    continue  # cancelled while queued: never runs
                index = idle.pop(0)
                try:
                    self._conns[index].send_bytes(msgspec.msgpack.encode([task_id, params]))
                except OSError as e:  # the process just died: its sentinel will report it
                    future.set_exception(RuntimeError(f"monolithic process {index} is gone ({e})"))
                    continue
                self._running[index] = (task_id, future)

    # --- lifetime --------------------------------------------------------------------------------
    def close(self, wait_s: float = 10.0) -> list[int]:
        """Stop every process; fail what is still queued or running. Returns the pids still alive."""
        with self._lock:
            self._closing = True  # under the lock: no submit slips in after the queue is emptied
        self._wake_send.send(b"\0")
        if getattr(self, "_thread", None) is not None:
            self._thread.join(wait_s)  # first: the dispatch thread no longer touches the queue
        with self._lock:
            queued, running = [f for _, _, f in self._queue], [f for _, f in self._running.values()]
            self._queue.clear()
            self._running.clear()
        for future in queued:
            if future.set_running_or_notify_cancel():  # False: it was cancelled, nothing to tell
                future.set_exception(RuntimeError("the monolithic pool was closed"))
        for future in running:
            future.set_exception(RuntimeError("the monolithic pool was closed"))
        for conn in self._conns:
            try:
                conn.send_bytes(b"")
            except OSError:
                pass  # already gone
        for process in self._processes:
            process.join(wait_s)
            if process.is_alive():
                process.kill()
                process.join(wait_s)
        for conn in self._conns:
            conn.close()
        self._wake_recv.close()
        self._wake_send.close()
        return [p.pid for p in self._processes if p.is_alive()]
