"""Moves of a worker between stages on its device, as the engine core does them: a mixin of
`EngineCore` (engine/core.py), on the core thread, using its `workers`, `_queues`, `_stats`,
`_elastic` and `_send_control`.

A move drains the worker (no new tasks; its tasks finish and downstream reads its outputs), then
switches its stage in the same process (wire.Become) and waits for its READY.
"""

from __future__ import annotations

import collections
import logging
import time

from . import protocol as wire
from .worker_layout import check_move

log = logging.getLogger("dfuse.engine")


class WorkerMoves:
    def _start_move(self, worker_id: int, stage: str, reason: str) -> None:
        try:
            check_move(self.workers, self.config, worker_id, stage)  # again: things may have changed since it was asked
        except ValueError as e:
            log.warning("move of worker %d to %s dropped: %s", worker_id, stage, e)
            return
        worker = self.workers[worker_id]
        worker.moving_to, worker.switch_started = stage, time.monotonic()
        log.info("moving worker %d from %s to %s (%s)", worker_id, worker.stage, stage, reason)
        self._stats.moved(worker.switch_started, worker_id, worker.stage, stage, reason)

    def _rebalance(self) -> None:
        """Ask the elastic policy for moves (it decides once per interval)."""
        stages = {w.id: w.moving_to or w.stage for w in self.workers.values()}
        busy = collections.Counter(w.stage for w in self.workers.values() if w.inflight)
        queues = {stage: len(q) for stage, q in self._queues.items()}
        for worker_id, stage in self._elastic.step(time.monotonic(), stages, queues, busy):
            self._start_move(worker_id, stage, reason="elastic")

    def _advance_moves(self) -> None:
        """A drained mover switches stage in its own process (wire.Become): no process start, no
        imports, and it keeps its output pool. It takes work again when it says READY in its
        new stage.

        Drained means its tasks are done and downstream has read every output it produced: a
        slot still held there is a slot its new stage cannot write, and if the mover became the
        only worker of that stage, the request holding it could never run (no free output slot)."""
        for worker in self.workers.values():
            drained = not worker.inflight and worker.pool.free == worker.pool.n_slots
            if worker.moving_to is not None and worker.ready and drained:
                worker.stage, worker.moving_to, worker.ready = worker.moving_to, None, False
                worker.task_s = None  # its speed at the old stage says nothing of the new one
                worker.pool_info = None
                self._send_control(worker, wire.Become(worker.stage))
