"""Which worker takes a stage's next task: the one expected to finish it first.

    predicted finish = (tasks ahead of it + 1) x its measured seconds per task

Each worker's time per task is a moving average of its own StageDone timings, so a device twice
as slow gets half the work, and a busy fast device can still beat an idle slow one. Only workers
that can take a task now are considered: holding a task back for a busy fast worker would block
the queue behind it (a lookahead that assigns the queue's tasks in order is the next step). A
worker not measured yet is assumed as fast as the measured ones (or all alike when none is): on
a pool of equal devices this is "fewest tasks in flight", ties going to the lower id.

A rule is `rule(ready, can_take) -> worker | None`: ready, the workers of the stage that serve;
can_take(worker), whether it may be sent a task now.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

SMOOTHING = 0.3  # weight of the newest task in a worker's moving average


def observe(previous: float | None, seconds: float) -> float:
    """A worker's time per task after one more task took `seconds`."""
    return seconds if previous is None else SMOOTHING * seconds + (1 - SMOOTHING) * previous


def earliest_finish(ready: Sequence, can_take: Callable[[object], bool]):
    """Of the ready workers (with .task_s, .batches, .inflight, .id) that can take a task now,
    the one predicted to finish it first; None when none can."""
    known = [w.task_s for w in ready if w.task_s is not None]
    assumed = sum(known) / len(known) if known else 1.0

    def finish(w) -> tuple:
        per_task = w.task_s if w.task_s is not None else assumed
        return ((len(w.batches) + 1) * per_task, len(w.batches), len(w.inflight), w.id)

    return min((w for w in ready if can_take(w)), key=finish, default=None)


def fewest_in_flight(ready: Sequence, can_take: Callable[[object], bool]):
    """Of the workers that can take a task now, the one with the fewest in flight, blind to
    speed (the baseline rule)."""
    return min((w for w in ready if can_take(w)), key=lambda w: (len(w.batches), len(w.inflight), w.id), default=None)


RULES = {"earliest-finish": earliest_finish, "fewest-in-flight": fewest_in_flight}


def fused_or_split(fused, encoder, downstream: Mapping[str, Sequence], queued: Mapping[str, int]):
    """Where a new request finishes first: on `fused` (a worker running whole requests) or down
    the split pipeline from `encoder`, both picked by the rule and free to take it now.

        fused:  (tasks ahead + 1) x its seconds per whole request
        split:  the encoder's predicted finish, plus for each later stage the requests queued
                there shared among its workers, plus this one, at its workers' speed

    A stage not measured yet is assumed a third of a measured fused request (and a fused worker
    not measured yet the sum of the stages, an unmeasured one as the measured ones' mean); with
    nothing measured both paths cost alike and the split pipeline, free now, takes it."""
    stage_s = {}
    for stage, workers in [("encoder", [encoder]), *downstream.items()]:
        known = [w.task_s for w in workers if w.task_s is not None]
        stage_s[stage] = sum(known) / len(known) if known else None
    whole = fused.task_s
    if whole is None:
        known = [s for s in stage_s.values() if s is not None]
        whole = len(stage_s) * (sum(known) / len(known) if known else 1.0) if len(known) < len(stage_s) else sum(known)
    stage_s = {stage: s if s is not None else whole / len(stage_s) for stage, s in stage_s.items()}

    fused_finish = (len(fused.batches) + 1) * whole
    split_finish = (len(encoder.batches) + 1) * stage_s["encoder"]
    for stage, workers in downstream.items():
        if not workers:
            return fused  # the split pipeline has no worker there now (one is moving or starting)
        ahead = min(len(w.batches) for w in workers) + queued.get(stage, 0) / len(workers)
        split_finish += (ahead + 1) * stage_s[stage]
    return fused if fused_finish < split_finish else encoder
