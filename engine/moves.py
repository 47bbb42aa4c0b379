"""Moves of workers between stages, as the engine core does them: a mixin of
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
from ..scheduler.core import STAGES
from .worker_layout import check_moves

log = logging.getLogger("dfuse.engine")


class WorkerMoves:
    def _start_moves(self, moves: list[tuple[int, str]], reason: str) -> None:
        """Start these moves (worker id, new stage) together, or none of them."""
        try:
            check_moves(self.workers, self.config, moves)  # again: things may have changed since it was asked
        except ValueError as e:
            log.warning("moves %s dropped: %s", moves, e)
            return
        for worker_id, stage in moves:
            worker = self.workers[worker_id]
            worker.moving_to, worker.switch_started = stage, time.monotonic()
            log.info("moving worker %d on %s from %s to %s (%s)", worker_id, worker.device, worker.stage, stage, reason)
            self._stats.moved(worker.switch_started, worker_id, worker.stage, stage, reason)

    def _rebalance(self) -> None:
        """Ask the elastic policy for moves (it decides once per interval)."""
        stages = {w.id: w.moving_to or w.stage for w in self.workers.values()}
        busy = collections.Counter(w.stage for w in self.workers.values() if w.inflight)
        queues = {stage: len(q) for stage, q in self._queues.items()}
        moves = self._elastic.step(time.monotonic(), stages, queues, busy)
        if moves:
            self._start_moves(moves, reason="elastic")

    def _advance_moves(self) -> None:
        """A drained mover switches stage in its own process (wire.Become): no process start, no
        imports, and it keeps its output pool. It takes work again when it says READY in its
        new stage.

        Drained means its tasks are done and downstream has read every output it produced: a
        slot still held there is a slot its new stage cannot write, and if the mover became the
        only worker of that stage, the request holding it could never run (no free output slot).
        A DiT worker becoming a decoder need not wait for its last outputs to be read: it will
        read them itself if no one else does, and the slot dispatch kept free
        (EngineConfig.move_reserve) is the one it writes to; its decoded pixels always leave
        for the engine. Two devices swapping dit and decoder need this: each worker is the only
        reader the other's outputs will have. Every other mover drains fully, and
        check_moves makes sure a reader of its outputs stays."""
        for worker in self.workers.values():
            if worker.moving_to is None or not worker.ready or worker.inflight:
                continue
            drained = worker.pool.free == worker.pool.n_slots
            reads_its_own = (self.config.move_reserve and worker.pool.free >= self.config.move_reserve
                             and (worker.stage, worker.moving_to) == STAGES[-2:])
            if drained or reads_its_own:
                worker.stage, worker.moving_to, worker.ready = worker.moving_to, None, False
                worker.task_s = None  # its speed at the old stage says nothing of the new one
                worker.pool_info = None
                self._send_control(worker, wire.Become(worker.stage))

