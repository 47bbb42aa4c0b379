"""What the router counts while it serves, and the typed `stats()` snapshot built from it (engine/stats.py).

The router thread records; any thread may take a snapshot (read without locks: values may be a
moment old, never torn: each is a list, dict or int replaced or appended to whole).
"""

from __future__ import annotations

import collections
import time

from ..scheduler.core import STAGES
from .cpu_affinity import describe
from .stats import EngineStats, Move, StageTimes, WorkerStats

RECENT_TASKS = 200  # stage compute times kept per stage for the p50/p90


class RouterStats:
    def __init__(self) -> None:
        self.started = time.monotonic()  # moves' and decisions' t_s count from here
        self.completed = 0
        self.failed = 0
        self.recovery_s: list[float] = []  # death noticed -> replacement READY, per restart
        self.switch_s: list[float] = []  # move asked -> worker READY in its new stage, per move
        self.moves: list[Move] = []  # every accepted move, oldest first
        self.batched: dict[str, int] = {stage: 0 for stage in STAGES}  # tasks of > 1 request sent
        self.stage_times = {stage: collections.deque(maxlen=RECENT_TASKS) for stage in STAGES}  # compute_s

    def moved(self, at: float, worker_id: int, source: str, target: str, reason: str) -> None:
        self.moves.append(Move(t_s=round(at - self.started, 3), worker=worker_id, from_stage=source,
                               to_stage=target, reason=reason))

    def snapshot(self, workers, queues, links, policy: str, decisions: list, **engine) -> EngineStats:
        """engine: the fields the router does not count itself (model, family, CPU settings)."""
        workers = list(workers)
        return EngineStats(
            **engine,
            policy=policy,
            placement={stage: sum(w.stage == stage for w in workers) for stage in STAGES},
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
            workers=[
                WorkerStats(
                    id=w.id, stage=w.stage, device=w.device, ready=w.ready,
                    pid=w.process.pid if w.process else None, inflight=len(w.inflight),
                    free_slots=w.pool.free, restarts=w.restarts, load_s=round(w.load_s, 3),
                    moving_to=w.moving_to, cpus=describe(w.cpus) if w.cpus else None,
                )
                for w in workers
            ],
        )


def _summary_ms(seconds) -> StageTimes:
    """Median and p90 compute time of a stage's recent tasks, in ms (None before the first)."""
    ordered = sorted(seconds)
    if not ordered:
        return StageTimes(tasks=0, p50=None, p90=None)
    pick = lambda q: round(1000 * ordered[min(len(ordered) - 1, int(q * len(ordered)))], 2)  # noqa: E731
    return StageTimes(tasks=len(ordered), p50=pick(0.5), p90=pick(0.9))
