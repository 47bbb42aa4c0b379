"""Engine-side state of requests and workers, and the errors a request can end with.

Owned and mutated by the core thread only (engine/core.py): no locks, no logic beyond
small properties.
"""

from __future__ import annotations

import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Callable

import zmq

from ..scheduler.core import STAGES
from . import protocol as wire
from .launcher import WorkerProcess
from .transport.slots import SlotPool

ProgressCallback = Callable[[str, int, int], None]  # (stage, step, total)
SILENT_BEATS = 3  # heartbeats a worker may miss before it gets no new tasks


class RequestFailed(RuntimeError):
    """A request could not be completed (its stage raised, or its workers kept dying)."""


class EngineClosed(RuntimeError):
    """The engine closed before the request completed."""


class RequestTimeout(TimeoutError):
    """The request passed its deadline; its remaining work was dropped."""


@dataclass
class StageTiming:
    worker_id: int
    queued_s: float  # waiting inside the worker before compute
    compute_s: float
    waited_s: float = 0.0  # waiting in the engine's queue for this stage (no worker or slot free)
    batch_size: int = 1  # requests computed together in that call (compute_s is the whole call's)
    device: str = ""  # where the worker ran it
    fetch_s: float = 0.0  # of compute_s: getting the inputs from the upstream stage's slot (the handoff)
    finished_at: float = 0.0  # time.monotonic() when the engine heard the stage was done
    fused: bool = False  # one fused worker ran every stage of the request, back to back (no handoff)


@dataclass
class Request:
    """Engine-side state of one request (one prompt) while it walks the stages."""

    id: int
    params: wire.RequestParams
    future: Future  # resolves to (image array, {stage: StageTiming})
    on_progress: ProgressCallback | None = None
    priority: int = 0  # higher is served first
    deadline: float | None = None  # time.monotonic() after which the request is dropped
    submitted_at: float = field(default_factory=time.monotonic)
    stage_index: int = 0
    inputs: list[wire.TensorRef] = field(default_factory=list)
    input_pool: SlotPool | None = None  # the upstream pool whose slot holds `inputs`
    input_offset: int = -1
    output_offset: int = -1  # the slot reserved in the current worker's pool
    attempts: int = 0
    timings: dict[str, StageTiming] = field(default_factory=dict)
    queued_at: float = 0.0  # when it last entered a stage queue (monotonic)
    waited_s: float = 0.0  # time in the current stage's queue, known once it is dispatched
    profiles: dict = field(default_factory=dict)  # stage -> batching.StageProfile (key, activation bytes)
    solo: bool = False  # survived a batch whose worker died: from now on it runs alone
    timed_out: bool = False  # its caller was told RequestTimeout while a stage still computed it
    inputs_lost: bool = False  # its inputs died with a GPU producer while a consumer had it: redo
    cancel_sent: bool = False  # its worker was told to stop computing it (cancelled or timed out)
    warnings: list[str] = field(default_factory=list)  # from its stages, for its caller (a prompt cut short)

    @property
    def stage(self) -> str:
        return STAGES[self.stage_index]

    def expired(self) -> bool:
        return self.deadline is not None and time.monotonic() > self.deadline


@dataclass
class Worker:
    """Engine-side handle of one stage instance."""

    id: int
    stage: str
    device: str
    pool: SlotPool  # where this worker writes its outputs
    pool_info: wire.PoolInfo | None = None  # its GPU pool's export, for consumers to map
    cpus: tuple[int, ...] | None = None  # cores of its own (engine/cpu_affinity.py); None: the OS places it
    socket: zmq.Socket | None = None
    process: WorkerProcess | None = None
    ready: bool = False
    generation: int = 0
    restarts: int = 0
    load_deaths: int = 0  # deaths in a row before READY (a replacement killed while loading)
    spawn_failures: int = 0  # replacement spawns the machine refused in a row (EMFILE ...)
    respawn_at: float | None = None  # monotonic time of the next try after a refused spawn
    load_s: float = 0.0
    last_heard: float = 0.0  # monotonic time of its last message (heartbeats included)
    stalled_s: float = 0.0  # its last heartbeat's: seconds its compute held a task without progress
    task_s: float | None = None  # its moving average of seconds per task (engine/dispatch.py)
    died_at: float | None = None  # monotonic time its death was noticed, until its replacement is READY
    moving_to: str | None = None  # draining before it switches to this stage
    stopping: bool = False  # draining before it leaves its device (an elastic move that shrinks it)
    signer: object = None  # transport.tcp.FrameSigner of its task socket, for a worker on another node (one per process)
    waits_for_device: bool = False  # a new worker not started until the workers leaving its device are gone
    switch_started: float | None = None  # a move's start, until the new stage is READY
    loading_since: float | None = None  # monotonic: its process started, or it began to switch stage (until READY)
    inflight: dict[int, Request] = field(default_factory=dict)  # in dispatch (= compute) order
    batches: list[set[int]] = field(default_factory=list)  # request ids per task sent, in compute order
    orphans: dict[int, int] = field(default_factory=dict)  # request id -> output offset of a task handed
    # to another worker while this one was silent: its slot stays held until this worker answers or dies
    outbox: list = field(default_factory=list)  # control messages not yet accepted by its socket

    @property
    def responsive(self) -> bool:
        """Heard from lately: a worker that missed SILENT_BEATS heartbeats (stopped, wedged, or
        starved of CPU) gets no new tasks, so no request waits behind it while another idles."""
        return time.monotonic() - self.last_heard < SILENT_BEATS * wire.HEARTBEAT_INTERVAL_S
