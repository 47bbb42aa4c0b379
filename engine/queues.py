"""Per-stage waiting lines: by priority, then by an effective arrival time, then by request id.

A deadline is not a priority knob. Among equal priorities a request is ordered by when it
entered the stage's queue (`queued_at`); a request with a deadline may move ahead of that, but
by at most `DEADLINE_LEAD_S`, and only as its deadline nears:

    effective = queued_at                                                   (no deadline)
    effective = clamp(deadline - lead, queued_at - lead, queued_at)         (deadline)

So a deadline farther than `lead` away changes nothing (plain arrival order), a deadline that
is near goes ahead of everything that arrived after it and of what arrived up to `lead` before
it (earliest deadline first among those), and a request without one is overtaken only by
requests that arrived less than `lead` after it: a steady stream of requests with timeouts
cannot starve it, it waits at most for what arrived in that window (plus higher priorities).

    lead 5 s, queued_at and deadline in seconds:
        A  0.0  none         -> 0.0
        B  1.0  deadline 3   -> 3-5 = -2.0       near: ahead of A
        C  6.0  deadline 6.8 -> 6.8-5 = 1.8      near: ahead of D (not below 6-5 = 1.0)
        D  2.0  deadline 60  -> 2.0              far: plain arrival order
    served: B A C D; A (0.0) is overtaken by nothing that arrives after 5.0

The key is computed at push from the request's own fields, never from the clock, so a heap
stays valid; a request put back after its worker died keeps its `queued_at`, hence its key, and
goes back to where it was, not to the end of the line. Without priorities or deadlines this is
plain FIFO. The head (`peek`, first of `in_order`) is what batching never skips.
"""

from __future__ import annotations

import heapq
from typing import Iterator, Protocol


DEADLINE_LEAD_S = 5.0  # how far a near deadline may move a request ahead: a few stage calls


class Queued(Protocol):
    id: int
    priority: int
    deadline: float | None  # monotonic, like queued_at
    queued_at: float  # monotonic time it entered this stage's queue


def order_key(request: Queued, lead_s: float = DEADLINE_LEAD_S) -> tuple:
    effective = request.queued_at
    if request.deadline is not None:
        effective = min(max(request.deadline - lead_s, request.queued_at - lead_s), request.queued_at)
    return (-request.priority, effective, request.id)


class StageQueue:
    def __init__(self, deadline_lead_s: float = DEADLINE_LEAD_S) -> None:
        if not deadline_lead_s >= 0:
            raise ValueError(f"deadline_lead_s must be >= 0, got {deadline_lead_s}")
        self._lead_s = deadline_lead_s
        self._heap: list[tuple[tuple, Queued]] = []

    def push(self, request: Queued) -> None:
        heapq.heappush(self._heap, (order_key(request, self._lead_s), request))

    def peek(self) -> Queued:
        return self._heap[0][1]

    def pop(self) -> Queued:
        return heapq.heappop(self._heap)[1]

    def in_order(self) -> list[Queued]:
        """Every queued request, first to be served first (a sort: for batching's look-ahead)."""
        return [entry[1] for entry in sorted(self._heap, key=lambda entry: entry[0])]

    def remove(self, requests: list[Queued]) -> None:
        """Take out exactly these requests (a batch chosen from `in_order`)."""
        ids = {id(r) for r in requests}
        self.remove_where(lambda r: id(r) in ids)

    def remove_where(self, predicate) -> list[Queued]:
        """Take out every request matching `predicate` (rare: expiry sweeps, lost pools)."""
        kept, removed = [], []
        for entry in self._heap:
            (removed if predicate(entry[1]) else kept).append(entry)
        if removed:
            heapq.heapify(kept)
            self._heap = kept
        return [entry[1] for entry in removed]

    def __len__(self) -> int:
        return len(self._heap)

    def __bool__(self) -> bool:
        return bool(self._heap)

    def __iter__(self) -> Iterator[Queued]:
        return (entry[1] for entry in self._heap)
