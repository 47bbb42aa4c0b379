"""Per-stage waiting lines ordered by priority, then deadline, then arrival.

Without priorities or deadlines this is plain FIFO (the request id is the arrival order). A
request put back after its worker died keeps its key, so it goes back to where it was, not to
the end of the line.
"""

from __future__ import annotations

import heapq
import math
from typing import Iterator, Protocol


class Queued(Protocol):
    id: int
    priority: int
    deadline: float | None


def order_key(request: Queued) -> tuple:
    deadline = request.deadline if request.deadline is not None else math.inf
    return (-request.priority, deadline, request.id)


class StageQueue:
    def __init__(self) -> None:
        self._heap: list[tuple[tuple, Queued]] = []

    def push(self, request: Queued) -> None:
        heapq.heappush(self._heap, (order_key(request), request))

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
