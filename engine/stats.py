"""`Engine.stats()`: one typed snapshot of the engine, read by attribute (`stats.workers[0].pid`);
`to_dict()` gives the same fields as plain JSON-ready data (moves name their stages "from" and "to")."""

from __future__ import annotations

import msgspec

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


class Move(_Snapshot, rename={"from_stage": "from", "to_stage": "to"}):
    t_s: float  # seconds since the engine started
    worker: int
    from_stage: str
    to_stage: str
    reason: str  # "elastic" (the controller) or "manual" (Engine.move)


class StageTimes(_Snapshot):
    """Compute time of a stage's recent tasks, in ms (None before the first)."""

    tasks: int
    p50: float | None
    p90: float | None


class EngineStats(_Snapshot):
    model: str  # the model's folder, or its synthetic spec
    family: str
    policy: str
    placement: dict[str, int]  # workers per stage
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
