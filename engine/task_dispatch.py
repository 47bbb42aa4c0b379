"""Dispatch, as the engine core does it: a mixin of `EngineCore` (engine/core.py), on the core
thread, using its `workers`, `_queues`, `config`, `_stats`, `batch_caps` and `_send`.

Each loop turn, every stage's queue is offered to its workers, downstream first: the dispatch
rule (engine/dispatch.py) picks a worker that can take a task now, the queue's head goes there
with the requests that may share its call (engine/batching.py), one output slot each. A new
request may instead go to a fused worker, which runs it start to finish: whichever is predicted
to finish it first.
"""

from __future__ import annotations

import time

from ..scheduler.core import FUSED, STAGES
from . import protocol as wire
from .batching import select_batch, should_wait
from .dispatch import RULES as DISPATCH_RULES
from .dispatch import fused_or_split
from .state import Request, RequestFailed, Worker


class TaskDispatch:
    def _dispatch(self) -> None:
        self._batch_wake = None
        # Downstream first: finishing requests frees the upstream slots that new work needs.
        for stage in reversed(STAGES):
            queue = self._queues[stage]
            while queue:
                head = queue.peek()
                if head.future.cancelled() or head.expired():
                    self._enqueue(queue.pop())  # drops or fails it
                    continue
                worker = self._pick_worker(stage)
                if worker is None:
                    break
                batch = self._take_batch(stage, queue, worker)
                if batch is None or not self._send_batch(worker, batch):
                    break  # waiting for companions; or retrying an unreachable worker would spin

    def _take_batch(self, stage: str, queue, worker: Worker) -> list[Request] | None:
        """Pop the head of `queue` and the requests that may share its call (engine/batching.py),
        at most one per free output slot; None while a partial batch waits for companions."""
        limit = 1 if worker.stage == FUSED else self.config.batching.batch_limit(stage)  # fused: one at a time
        limit = min(limit, worker.pool.free - self._reserve(worker))
        if limit == 1:
            return [queue.pop()]
        batch = select_batch(queue.in_order(), stage, limit, self.batch_caps.get(stage))
        send_at = should_wait(batch, stage, limit, self.config.batching.max_wait_ms / 1000)
        if send_at is not None:
            self._batch_wake = send_at if self._batch_wake is None else min(self._batch_wake, send_at)
            return None
        queue.remove(batch)
        return batch

    def _pick_worker(self, stage: str) -> Worker | None:
        """The worker the dispatch rule picks among the stage's ready ones (by default the one
        predicted to finish first, engine/dispatch.py); None: the task waits in the queue. A new
        request may also go to a fused worker: then the one predicted to finish the whole request
        first, down the split pipeline or fused, takes it."""
        serving = [w for w in self.workers.values() if w.ready and w.moving_to is None and not w.stopping
                   and w.responsive]
        rule = DISPATCH_RULES[self.config.dispatch]
        split = rule([w for w in serving if w.stage == stage], self._can_take)
        if stage != STAGES[0]:
            return split
        fused_workers = [w for w in serving if w.stage == FUSED]
        if not fused_workers:  # a split-only engine: nothing more to weigh
            return split
        fused = rule(fused_workers, self._can_take)
        downstream = {s: [w for w in serving if w.stage == s] for s in STAGES[1:]}
        if not all(downstream.values()):
            return fused  # the split pipeline cannot finish a request now (a stage dead or moving): wait for fused
        if split is None or fused is None:
            return split or fused
        return fused_or_split(fused, split, downstream, {s: len(self._queues[s]) for s in STAGES[1:]})

    def _can_take(self, worker: Worker) -> bool:
        """A free output slot, nothing waiting to reach it first, and room under its in-flight
        limit. A fused worker takes its next request only once idle: it has no inputs to fetch
        ahead, and a request held behind its current one could not go to another that frees first
        (one shared queue, as a monolithic pool keeps: near saturation the difference is large)."""
        limit = 1 if worker.stage == FUSED else self.config.max_inflight_per_worker
        return worker.pool.free > self._reserve(worker) and not worker.outbox and len(worker.batches) < limit

    def _reserve(self, worker: Worker) -> int:
        """Slots dispatch leaves free (EngineConfig.move_reserve); a decoder's outputs always
        reach the engine, so it never needs one to move, and a new decoder may need its last
        slot to read its own dit outputs."""
        return 0 if worker.stage in (STAGES[-1], FUSED) else self.config.move_reserve

    def _send_batch(self, worker: Worker, batch: list[Request]) -> bool:
        """Hand `batch` to `worker` as one task (a plain StageTask when it holds one request),
        one output slot per request; False if the worker cannot take it now (put back)."""
        slots = [worker.pool.acquire(request.id) for request in batch]
        tasks = [
            wire.StageTask(request.id, request.params, request.inputs, slot,
                           report_progress=request.on_progress is not None and worker.stage in ("dit", FUSED))
            for request, slot in zip(batch, slots)
        ]
        try:
            sent = self._send(worker, tasks[0] if len(tasks) == 1 else wire.StageBatch(tasks))
        except Exception as e:  # a request itself cannot be encoded
            for request, slot in zip(batch, slots):
                worker.pool.release(slot.offset, request.id)
            if len(batch) == 1:
                self._fail(batch[0], RequestFailed(f"request {batch[0].id} could not be sent to a worker: {e}"))
            else:  # send them one by one: only the culprit fails
                for request in batch:
                    request.solo = True
                    self._queues[request.stage].push(request)
            return True
        if not sent:  # e.g. it died a moment ago; the health check will replace it
            for request, slot in zip(batch, slots):
                worker.pool.release(slot.offset, request.id)
                self._queues[request.stage].push(request)
            return False
        now = time.monotonic()
        for request, slot in zip(batch, slots):
            request.output_offset = slot.offset
            request.waited_s = now - request.queued_at
            worker.inflight[request.id] = request
        worker.batches.append({request.id for request in batch})
        if len(batch) > 1:  # a fused worker takes one request at a time
            self._stats.batched[worker.stage] += 1
        return True
