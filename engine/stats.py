"""`Engine.stats()`: one typed snapshot of the engine, read by attribute (`stats.workers[0].pid`);
`to_dict()` gives the same fields as plain JSON-ready data (moves name their stages "from" and "to").
StatsRecorder is what the engine core counts while it serves, and builds the snapshot from."""

from __future__ import annotations

import collections
import time

import msgspec

from ..scheduler.core import STAGES
from .devices import ROLES
from .cpu_affinity import describe

_SNAPSHOT = dict(frozen=True, kw_only=True, forbid_unknown_fields=True)


class _Snapshot(msgspec.Struct, **_SNAPSHOT):
    def to_dict(self) -> dict:
        return msgspec.to_builtins(self)


class WorkerStats(_Snapshot):
    id: int
    stage: str
    device: str
    ready: bool
    pid: int | None  # None before its process started
    inflight: int  # tasks sent to it and not answered yet
    free_slots: int  # free output slots in its pool (slot credits)
    restarts: int  # times its process was replaced
    load_s: float  # how long its last (re)load took
    moving_to: str | None  # the stage it is switching to, during a move
    cpus: str | None  # its own cores ("0-1"), or None where the OS places it
    state: str  # ready | unresponsive (missed heartbeats: no new tasks) | loading | moving | stopping | waiting (to start, for the workers leaving its device) | restarting | closed
    load_deaths: int  # times in a row its process died before it was ready
    remote: bool = False  # it runs on another node of a Ray cluster: its pid is that node's


class Move(_Snapshot, rename={"from_stage": "from", "to_stage": "to"}):
    t_s: float  # seconds since the engine started
    worker: int
    from_stage: str
    to_stage: str
    reason: str  # "elastic" (the controller) or "asked" (Engine.move)


class StageTimes(_Snapshot):
    """Compute time of a stage's recent tasks, in ms (None before the first)."""

    tasks: int
    p50: float | None
    p90: float | None


class DeviceStats(_Snapshot):
    name: str  # as in the placement: "cuda:0", "cpu", "cpu:0-1"
    kind: str  # what it is: the GPU's name, or the host's cores
    memory_gib: float  # its memory (a CPU device: the host's, shared with the others)
    workers: list[int]  # ids of the workers on it now
    moves: int  # moves of its workers between stages so far


class StageSpan(_Snapshot):
    """One stage of one request, in seconds since the engine started. The worker's start is
    the engine's finish time minus the worker's own timings (messages in flight are not counted)."""

    worker: int
    device: str
    queued_s: float  # it entered this stage's queue
    started_s: float  # the worker started computing it
    finished_s: float  # the engine heard it was done


class RequestTimeline(_Snapshot):
    """Where one finished request spent its time: a row of the status page's Gantt chart."""

    id: int
    outcome: str  # "completed" or "failed"
    submitted_s: float  # seconds since the engine started
    finished_s: float
    stages: dict[str, StageSpan]  # the stages it went through, in pipeline order


class EngineStats(_Snapshot):
    model: str  # the model's folder, or its synthetic spec
    family: str
    policy: str
    placement: dict[str, list[str]]  # device -> the stages of its workers, in pipeline order
    instances: dict[str, int]  # workers per stage (and fused workers, where there are any)
    devices: list[DeviceStats]
    uptime_s: float
    moves: list[Move]  # every accepted move, oldest first
    decisions: list[dict]  # the elastic controller's latest decisions (engine/elastic.py)
    links: dict[str, str]  # "encoder->dit" -> the transport link it uses
    completed: int
    failed: int
    recovery_s: list[float]  # death noticed -> replacement READY, per restart
    switch_s: list[float]  # move asked -> worker READY in its new stage, per move
    queues: dict[str, int]  # requests waiting per stage
    batched_tasks: dict[str, int]  # tasks of more than one request sent, per stage
    stage_ms: dict[str, StageTimes]
    workers: list[WorkerStats]
    cpu_wake_latency_us: int | None  # the engine's CPU latency request; None: the OS's
    cpu_pinning: str  # whether CPU workers have cores of their own, and why
    lost_devices: list[str]  # devices of Ray nodes that left the cluster (engine/cluster.py); [] on one host
    recent: list[RequestTimeline]  # the last RECENT_REQUESTS requests to finish, oldest first


RECENT_TASKS = 200  # stage compute times kept per stage for the p50/p90
RECENT_REQUESTS = 50  # request timelines kept for stats().recent


class StatsRecorder:
    """What the engine core counts while it serves (the core thread records; any thread may take a
    snapshot, read without locks: values may be a moment old, never torn)."""

    def __init__(self) -> None:
        self.started = time.monotonic()  # moves' and decisions' t_s count from here
        self.completed = 0
        self.failed = 0
        self.recovery_s: list[float] = []  # death noticed -> replacement READY, per restart
        self.switch_s: list[float] = []  # move asked -> worker READY in its new stage, per move
        self.moves: list[Move] = []  # every accepted move, oldest first
        self.batched: dict[str, int] = {stage: 0 for stage in STAGES}  # tasks of > 1 request sent
        self.stage_times = {stage: collections.deque(maxlen=RECENT_TASKS) for stage in STAGES}  # compute_s
        self.recent: collections.deque[RequestTimeline] = collections.deque(maxlen=RECENT_REQUESTS)

    def left(self, request, outcome: str) -> None:
        """A request completed or failed: count it and keep its timeline."""
        if outcome == "completed":
            self.completed += 1
        else:
            self.failed += 1
        since = lambda t: round(t - self.started, 4)  # noqa: E731
        stages = {}
        for stage, t in request.timings.items():
            started = t.finished_at - t.compute_s
            stages[stage] = StageSpan(worker=t.worker_id, device=t.device, started_s=since(started),
                                      queued_s=since(started - t.queued_s - t.waited_s), finished_s=since(t.finished_at))
        self.recent.append(RequestTimeline(id=request.id, outcome=outcome, submitted_s=since(request.submitted_at),
                                           finished_s=since(time.monotonic()), stages=stages))

    def moved(self, at: float, worker_id: int, source: str, target: str, reason: str) -> None:
        self.moves.append(Move(t_s=round(at - self.started, 3), worker=worker_id, from_stage=source,
                               to_stage=target, reason=reason))

    def snapshot(self, workers, queues, links, policy: str, decisions: list, devices: dict[str, tuple[str, float]],
                 **engine) -> EngineStats:
        """devices: each device's (kind, memory in GiB), in pool order; engine: the fields the
        engine core does not count itself (model, family, CPU settings)."""
        workers = list(workers)
        by_device = {d: [w for w in workers if w.device == d] for d in devices}
        by_id = {w.id: w.device for w in workers}
        return EngineStats(
            **engine,
            policy=policy,
            placement={d: [w.stage for w in sorted(ws, key=lambda w: (ROLES.index(w.stage), w.id))]
                       for d, ws in by_device.items()},
            instances={role: n for role in ROLES if (n := sum(w.stage == role for w in workers)) or role in STAGES},
            devices=[
                DeviceStats(name=d, kind=kind, memory_gib=memory, workers=[w.id for w in by_device[d]],
                            moves=sum(by_id.get(m.worker) == d for m in self.moves))
                for d, (kind, memory) in devices.items()
            ],
            uptime_s=round(time.monotonic() - self.started, 3),
            moves=list(self.moves),
            decisions=decisions,
            links=dict(links),
            completed=self.completed,
            failed=self.failed,
            recovery_s=[round(r, 3) for r in self.recovery_s],
            switch_s=[round(r, 3) for r in self.switch_s],
            queues={stage: len(q) for stage, q in queues.items()},
            batched_tasks=dict(self.batched),
            stage_ms={stage: _summary_ms(times) for stage, times in self.stage_times.items()},
            recent=list(self.recent),
            workers=[
                WorkerStats(
                    id=w.id, stage=w.stage, device=w.device, ready=w.ready,
                    pid=w.process.pid if w.process else None, inflight=len(w.inflight),
                    free_slots=w.pool.free, restarts=w.restarts, load_s=round(w.load_s, 3),
                    moving_to=w.moving_to, cpus=describe(w.cpus) if w.cpus else None, state=_state(w),
                    load_deaths=w.load_deaths, remote=w.process is not None and w.process.remote,
                )
                for w in workers
            ],
        )


def _state(worker) -> str:
    if worker.moving_to is not None:
        return "moving"
    if worker.stopping:
        return "stopping"
    if worker.waits_for_device:
        return "waiting"
    if worker.ready:
        return "ready" if worker.responsive else "unresponsive"
    return "restarting" if worker.process is None else "loading"


def _summary_ms(seconds) -> StageTimes:
    """Median and p90 compute time of a stage's recent tasks, in ms (None before the first)."""
    ordered = sorted(seconds)
    if not ordered:
        return StageTimes(tasks=0, p50=None, p90=None)
    pick = lambda q: round(1000 * ordered[min(len(ordered) - 1, int(q * len(ordered)))], 2)  # noqa: E731
    return StageTimes(tasks=len(ordered), p50=pick(0.5), p90=pick(0.9))
