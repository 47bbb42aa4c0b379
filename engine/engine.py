"""Engine: the user-facing front. Validates requests, hands them to the engine core, returns images."""

from __future__ import annotations

import itertools
import os
import threading
import weakref
from concurrent.futures import CancelledError, Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import msgspec
from PIL import Image

from ..scheduler.core import STAGES
from .admission import memory_budgets, stage_budgets
from .auto_placement import auto_placed, device_memory_gb, stage_memory
from .completions import UserFuture, resolve
from .config import DEFAULT_MODEL, EngineConfig
from .devices import as_role, is_cpu, split_node
from .input_processor import InputProcessor
from .models import describe_model, detect_family, resolve_model_path
from .core import EngineCore
from .stats import EngineStats
from .state import EngineClosed, ProgressCallback, Request, RequestFailed, RequestTimeout, StageTiming

__all__ = ["Engine", "GenerationResult", "RequestFailed", "RequestTimeout", "EngineClosed", "StageTiming"]


@dataclass(frozen=True)
class GenerationResult:
    """The outcome of one `submit`: one entry per prompt, in prompt order.

    Video models (Wan): `frames[i]` holds prompt i's video, one PIL image per frame, and
    `images[i]` is its first frame (a thumbnail). Image models: `frames` is None."""

    images: list[Image.Image]
    seeds: list[int]  # prompt i was generated with seeds[i]
    timings: list[dict[str, StageTiming]]  # per prompt: stage -> where and how long it ran
    frames: list[list[Image.Image]] | None = None  # video models: per prompt, its frames in order
    warnings: list[list[str]] = field(default_factory=list)  # per prompt: e.g. the part a text encoder cut off


class Engine:
    """Serve one diffusion model as three kinds of stage processes (encoder, dit, decoder).

        with Engine(device="cpu", instances={"encoder": 1, "dit": 1, "decoder": 1}) as engine:
            images = engine.generate("a red fox in the snow", num_inference_steps=4, seed=0)

    `generate` and `submit` may be called from many threads at once; `submit` returns at once
    with a future, so many requests can be in flight together.

    An engine belongs to the process that made it: in a child made with os.fork(), its calls
    raise RuntimeError at once (the engine core's thread did not survive the fork), `close()`
    does nothing there, and the child's exit leaves the parent's workers alone.
    """

    def __init__(
        self,
        model: str | None = None,
        device: str | Mapping[str, str] = "cpu",
        instances: Mapping[str, int] | None = None,
        *,
        devices: Sequence[str] | None = None,
        placement: Mapping[str, Sequence[str]] | str | None = None,
        cpu_threads: int | None = None,
        dtype: str = "auto",
        policy: str = "static",
        revision: str | None = None,
        variant: str | None = None,
        cluster: str | None = None,
        ray_address: str | None = None,
        config: EngineConfig | None = None,
    ):
        """`device` + `instances`: that many workers of each stage on its one device; or a pool
        of `devices` (["cpu:0", "cpu:1"], ["cuda:0", ..., "cuda:7"]) with a `placement` that
        names each device's stages ({"cpu:0": ["encoder", "decoder"], "cpu:1": ["dit"]}: one
        worker per device and stage; engine/devices.py), or placement "auto" (the default with
        `devices`: the planner's, engine/auto_placement.py). `model` may be a Hugging Face repo id,
        with `revision` and `variant` as in diffusers' from_pretrained. `cluster="ray"` with
        `ray_address`: devices may name a node of that Ray cluster ("b/cuda:0", engine/cluster.py)."""
        if config is not None and not isinstance(config, EngineConfig):
            raise ValueError(f"config: must be an EngineConfig (got {type(config).__name__})")
        given = (model, device, instances, devices, placement, cpu_threads, dtype, policy, revision, variant, cluster,
                 ray_address)
        if config is not None and given != (None, "cpu", None, None, None, None, "auto", "static", None, None, None, None):
            raise ValueError("config: pass either config= or model/device/instances/devices/placement/cpu_threads/"
                             "dtype/policy/revision/variant/cluster/ray_address, not both")
        if config is None:
            pool = {} if devices is None and placement is None else {"placement": placement}
            config = EngineConfig(
                model=DEFAULT_MODEL if model is None else model,
                devices=devices if devices is not None else device,
                instances=instances if instances is not None else {s: 1 for s in STAGES},
                cpu_threads=cpu_threads,
                dtype=dtype,
                policy=policy,
                revision=revision,
                variant=variant,
                cluster=cluster,
                ray_address=ray_address,
                **pool,
            )
        self.config = config
        self._pid = os.getpid()
        self._close_lock = threading.Lock()  # a second close() waits for the first to finish
        self.model_path = resolve_model_path(self.config.model, self.config.revision, self.config.variant)
        self.model_info = describe_model(self.model_path)  # ValueError before any process starts (or Ray call)
        cluster = self._join_cluster()
        try:
            self._place(cluster)
            memory = self._plan_memory(cluster)
            self._core = EngineCore(self.config, self.model_path, true_cfg=self.model_info.true_cfg, memory=memory,
                                    cluster=cluster)  # which owns the cluster from here, and closes it
        except BaseException:
            if cluster is not None:
                cluster.close()  # (again, if the core closed it already: a no-op)
            raise
        self._start_core()

    def _join_cluster(self):
        """The Ray cluster of the devices on other nodes (engine/cluster.py), joined first: auto
        placement and the elastic plan measure those devices there."""
        if self.config.cluster != "ray":
            return None
        from .cluster import RayCluster

        return RayCluster(self.config.ray_address, list(self.config.pool))

    def _place(self, cluster) -> None:
        if self.config.placement == "auto":
            self.config = auto_placed(self.config, self.model_path, self.model_info, detect_family(self.model_path),
                                      cluster)
        self._inputs = InputProcessor.for_config(self.config, self.model_info, detect_family(self.model_path))
        self._ids = itertools.count()
        self._ids_lock = threading.Lock()

    def _plan_memory(self, cluster):
        """(stage GB, device GB) for the elastic plan on a device pool (a move must never give a
        device more than it holds); None otherwise."""
        if not (self.config.pooled and self.config.policy == "elastic"):
            return None
        family = detect_family(self.model_path)
        return (stage_memory(self.model_path, self.model_info, family, self.config.itemsizes()),
                device_memory_gb(self.config, cluster))

    def _start_core(self) -> None:
        # Closes the workers even if the user never calls close() (runs at interpreter exit too,
        # in a forked child's as well: there it must leave the parent's workers alone).
        self._finalizer = weakref.finalize(self, _close_in, self._pid, self._core)
        self._core.start()
        if not self._core.ready.wait(self.config.startup_timeout_s):
            self.close()
            raise RuntimeError(f"stage workers were not ready within {self.config.startup_timeout_s:g} s")
        if self._core.startup_error:
            error = self._core.startup_error
            self.close()
            raise RuntimeError(error)
        # Measured now that the workers hold their weights (see engine/admission.py), and again
        # (GPUs only) whenever moves change which device holds which stage: the core calls
        # on_layout, which must not hold the Engine (its finalizer would never run).
        budgets = _Budgets(self.config, self.model_path, self._inputs, self._core)
        self._core.on_layout = budgets.update
        budgets.update()

    # --- requests ----------------------------------------------------------------------------
    def submit(
        self,
        prompt: str | list[str],
        negative_prompt: str | list[str] | None = None,
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        height: int | None = None,
        width: int | None = None,
        seed: int | None = None,
        on_progress: ProgressCallback | None = None,
        priority: int = 0,
        timeout: float | None = None,
        true_cfg_scale: float | None = None,
        num_frames: int | None = None,
    ) -> Future:
        """Queue a request and return a Future of its GenerationResult (cancel() drops it).

        Defaults follow diffusers for the model (e.g. SD3: 28 steps, guidance 7.0, its native
        size). Prompt i of a list uses seed + i; a missing seed is drawn at random and reported.
        Higher `priority` is served first at every stage; a request still unfinished `timeout`
        seconds from now fails with RequestTimeout and its remaining work is dropped (a DiT
        computing it stops at its next denoising step, as after cancel()). `true_cfg_scale` > 1
        with a negative prompt turns on Flux's true CFG (a second transformer pass);
        `guidance_scale` is then still Flux's embedded guidance. `num_frames` (video models:
        4k+1 frames for Wan, default 81; image models: None or 1) sets a video's length.
        Raises ValueError naming the field for bad input; the engine keeps serving.
        """
        self._check_process()
        if not self._finalizer.alive:
            raise EngineClosed("the engine is closed")
        with self._ids_lock:
            requests = self._inputs.requests(
                self._ids, prompt, on_progress=on_progress, priority=priority, timeout=timeout,
                negative_prompt=negative_prompt, num_inference_steps=num_inference_steps,
                guidance_scale=guidance_scale, height=height, width=width, seed=seed,
                true_cfg_scale=true_cfg_scale, num_frames=num_frames,
            )
        outer = _gather(requests, UserFuture(self._core.completions.user, key=on_progress or object()))
        for request in requests:
            self._core.submit(request)
        return outer

    def generate(self, prompt: str | list[str], *, timeout: float | None = None,
                 **params) -> list[Image.Image] | list[list[Image.Image]]:
        """Generate one image per prompt and wait for them (see `submit` for the parameters).
        Video models return one list of frames (PIL images) per prompt instead.

        `timeout` (seconds) raises RequestTimeout (a TimeoutError) and drops the remaining work.
        """
        self._check_process()
        future = self.submit(prompt, timeout=timeout, **params)
        try:
            result = future.result(timeout)
            return result.images if result.frames is None else result.frames
        except FutureTimeout:
            future.cancel()
            raise RequestTimeout(f"the request did not complete within timeout={timeout} s") from None

    def move(self, worker_id: int | Mapping[int, str], stage: str | None = None) -> None:
        """Move a worker to another stage on its device, without losing a request: it stops
        taking work, finishes what it holds, then unloads its stage and loads `stage` in the
        same process (`stats().switch_s` records each switch, asked -> READY). A mapping
        {worker_id: stage} moves several together, e.g. two devices of a pool swapping stages.
        On a device pool a worker may take any stage (one worker per device and stage) or the
        fused role ("encoder+dit+decoder", alias "fused": the whole pipeline, alone on its
        device); in the per-stage form, one configured on its device. Returns once the engine
        core has taken the moves (they complete later); ValueError if they would leave a stage
        without workers, or the core refuses them (a worker died or began another move meanwhile)."""
        self._check_process()
        if not self._finalizer.alive:
            raise EngineClosed("the engine is closed")
        moves = dict(worker_id) if isinstance(worker_id, Mapping) else {worker_id: stage}
        self._core.move([(w, as_role(s)) for w, s in moves.items()])

    def place(self, placement: Mapping[str, Sequence[str]]) -> None:
        """On a device pool, make each named device host exactly these stages, without losing a
        request: workers switch stage where a device trades one for another, new workers start
        where it gains (their weights from the host weight cache), drained ones stop where it
        loses; all together, as the elastic policy moves devices. ["encoder+dit+decoder"] (or
        ["fused"]) gives a device the whole pipeline in one process. Devices not named keep
        theirs. Returns once the engine core has taken the moves; ValueError if a stage would be
        left without workers, or the core refuses them."""
        self._check_process()
        if not self._finalizer.alive:
            raise EngineClosed("the engine is closed")
        if not self.config.pooled:
            raise ValueError("placement: place() moves the devices of a pool (Engine(devices=[...], ...))")
        if not isinstance(placement, Mapping):
            raise ValueError(f"placement: expected a mapping of device -> stages (got {type(placement).__name__})")
        self._core.place(dict(placement))

    def stats(self) -> EngineStats:
        """Placement, queue depths, per-worker state: a typed snapshot (`.to_dict()` for JSON).

        After close() it still answers (the counters are the engine's last word), and every
        worker shows ready=False, pid=None: no worker process runs any more."""
        self._check_process()
        closed = not self._finalizer.alive
        snapshot = self._core.stats(model=str(self.model_path), family=self.model_info.family)
        if closed:
            workers = [msgspec.structs.replace(w, ready=False, pid=None, inflight=0, state="closed") for w in snapshot.workers]
            snapshot = msgspec.structs.replace(snapshot, workers=workers)
        return snapshot

    @property
    def host_names(self) -> tuple[str, str]:
        """(shared-memory segment prefix, socket run dir) of this engine: what a leak check looks
        for in /dev/shm and on disk once the engine is closed (they stay valid after close)."""
        return self._core.segment_prefix, self._core.run_dir

    # --- lifetime ----------------------------------------------------------------------------
    def close(self) -> None:
        """Stop every worker and free every shared-memory segment; pending requests fail.
        Idempotent, from any thread: every call returns once the workers have exited."""
        with self._close_lock:  # finalize() runs once; a concurrent second call would return at once
            self._finalizer()

    def _check_process(self) -> None:
        if os.getpid() != self._pid:
            raise RuntimeError(f"this engine belongs to the parent process (pid {self._pid}) and cannot be used "
                               "after fork; create an Engine in the child process instead")

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _close_in(pid: int, core: EngineCore) -> None:
    """Close the engine core, but only in the process that made it: a forked child has a copy
    of the core whose thread and sockets are not its own."""
    if os.getpid() == pid:
        core.close()


def _gather(requests: list[Request], outer: UserFuture) -> UserFuture:
    """`outer`, one future for the whole submit: resolves when every prompt's request has, or
    fails with the first prompt that fails (its siblings are cancelled then: their work would be
    thrown away)."""
    remaining = [len(requests)]
    lock = threading.Lock()
    settled = [False]  # outer's outcome is decided (set under the lock, acted on outside it)

    def on_inner_done(inner: Future) -> None:
        error = None if inner.cancelled() else inner.exception()
        with lock:
            remaining[0] -= 1
            first_failure = error is not None and not settled[0]
            last = remaining[0] == 0 and not settled[0]
            settled[0] = settled[0] or first_failure or last
        if first_failure:
            resolve(outer, error=error)
            for request in requests:
                request.future.cancel()
            return
        if not last:
            return
        try:
            results = [r.future.result() for r in requests]
        except CancelledError:  # the caller cancelled the whole submit
            return
        seeds, timings = [r.params.seed for r in requests], [t for _, t in results]
        warnings = [list(r.warnings) for r in requests]
        if results[0][0].ndim == 4:  # a video model's (frames, height, width, 3)
            frames = [[Image.fromarray(frame) for frame in pixels] for pixels, _ in results]
            resolve(outer, result=GenerationResult([video[0] for video in frames], seeds, timings, frames, warnings))
        else:
            images = [Image.fromarray(pixels) for pixels, _ in results]
            resolve(outer, result=GenerationResult(images, seeds, timings, warnings=warnings))

    def on_outer_done(_outer: Future) -> None:
        if outer.cancelled():
            for request in requests:
                request.future.cancel()

    for request in requests:
        request.future.add_done_callback(on_inner_done)
    outer.add_internal_callback(on_outer_done)
    return outer


class _Budgets:
    """The memory budgets of requests (the input processor's) and batches (the core's), kept to
    the workers' layout. New dicts each time: readers on other threads see old or new, whole."""

    def __init__(self, config, model_path, inputs, core):
        self._config, self._model_path, self._inputs, self._core = config, model_path, inputs, core
        cluster = core.cluster
        self._node_reports: dict[str, dict | None] = {}  # what other nodes' agents measured, by memory
        asked: dict[tuple, dict | None] = {}  # (node, host or GPUs) -> its agent's report

        def node_memory(memory: str) -> dict | None:
            # One ask per node for its GPUs (each may wait on that node's agent), and one for its host.
            key = (split_node(memory)[0], is_cpu(memory))
            if key not in asked:
                asked[key] = cluster.node_memory(memory)
            self._node_reports[memory] = asked[key]
            return asked[key]

        self._by_memory = memory_budgets(config, model_path, node_memory=node_memory if cluster else None)

    def update(self, workers=None) -> None:
        """`workers`: (device, role) of the workers now (default: the configured ones)."""
        if workers is not None:
            # Other nodes' GPUs: their totals as measured at start (no Ray call on the core thread).
            self._by_memory = {**self._by_memory, **memory_budgets(self._config, self._model_path, workers=workers,
                                                                   gpus_only=True, node_memory=self._node_reports.get)}
        budgets = stage_budgets(self._config, self._by_memory, workers)
        self._inputs.budgets = budgets
        # A batch's summed activation estimate must fit its device's budget (or the set cap).
        cap_gib = self._config.batching.max_batch_gib
        self._core.batch_caps = {
            s: budget if cap_gib is None else min(budget, int(cap_gib * 2**30)) for s, budget in budgets.items()
        }
