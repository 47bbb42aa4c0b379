"""Which worker takes a stage's next task: the one expected to finish it first.

    predicted finish = (tasks ahead of it + 1) x its measured seconds per task

Each worker's time per task is a moving average of its own StageDone timings, so a device twice
as slow gets half the work, and a busy fast device can still beat an idle slow one. A worker not
measured yet is assumed as fast as the measured ones (or all alike when none is): on a pool of
equal devices this is "fewest tasks in flight", ties going to the lower id.
"""

from __future__ import annotations

from collections.abc import Sequence

SMOOTHING = 0.3  # weight of the newest task in a worker's moving average


def observe(previous: float | None, seconds: float) -> float:
    """A worker's time per task after one more task took `seconds`."""
    return seconds if previous is None else SMOOTHING * seconds + (1 - SMOOTHING) * previous


def earliest_finish(candidates: Sequence):
    """The candidate (with .task_s, .batches, .inflight, .id) predicted to finish a new task
    first; None when there is none."""
    known = [w.task_s for w in candidates if w.task_s is not None]
    assumed = sum(known) / len(known) if known else 1.0

    def finish(w) -> tuple:
        per_task = w.task_s if w.task_s is not None else assumed
        return ((len(w.batches) + 1) * per_task, len(w.batches), len(w.inflight), w.id)

    return min(candidates, key=finish, default=None)
