"""Which queued requests may run as one batch in a stage: pure functions, no processes.

A request gets, at submit, one profile per stage: a compatibility key (requests with equal keys
can share one diffusers call) and its estimated activation bytes. When a worker frees up, the
engine core takes the head of the stage's queue (engine/queues.py: priority, then arrival, a
near deadline moving a request ahead by a bounded lead; the head is never skipped, so batching
cannot starve it) and adds the next requests in queue order whose key equals the head's, up to
the stage's batch limit and the memory cap:

    queue (in order):  A(64x64)  B(96x64)  C(64x64)  D(64x64)     dit limit 2
    batch:             A                   C                      B waits for the next worker
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Hashable, Iterable, Mapping

from .protocol import RequestParams
from ..scheduler.core import STAGES
from .models.base import FamilySpec, ModelInfo


@dataclass(frozen=True)
class StageProfile:
    """What the engine core needs to batch one request in one stage."""

    key: Hashable | None  # None: never batched with another request
    peak_bytes: int  # estimated activation memory of this request alone (0: unknown)


def stage_profiles(family: FamilySpec, info: ModelInfo, params: RequestParams,
                   itemsizes: Mapping[str, int]) -> dict[str, StageProfile]:
    return {
        stage: StageProfile(family.batch_key(stage, params), family.peak_bytes(info, stage, params, itemsizes[stage]))
        for stage in STAGES
    }


def select_batch(queued: Iterable, stage: str, limit: int, cap_bytes: int | None) -> list:
    """The head of `queued` (iterated in queue order) and the requests that may join it.

    A request joins when its key for `stage` equals the head's, it is not `solo` (a survivor of
    a batch whose worker died runs alone, so a poison request cannot take others with it again),
    it is neither cancelled nor expired (those are dropped at the stage boundary), and the
    batch's summed activation estimate stays within `cap_bytes`. The head always goes."""
    batch, used, key = [], 0, None
    for request in queued:
        profile = request.profiles.get(stage) if request.profiles else None
        if not batch:
            batch.append(request)
            if limit == 1 or request.solo or profile is None or profile.key is None:
                return batch
            key, used = profile.key, profile.peak_bytes
            continue
        if len(batch) >= limit:
            break
        if request.solo or profile is None or profile.key != key:
            continue
        if request.future.cancelled() or request.expired():
            continue
        if cap_bytes is not None and used + profile.peak_bytes > cap_bytes:
            continue  # a smaller one further back may still fit
        batch.append(request)
        used += profile.peak_bytes
    return batch


def should_wait(batch: list, stage: str, limit: int, max_wait_s: float, now: float | None = None) -> float | None:
    """When a partial batch should rather wait for companions: the monotonic time at which to
    send it anyway; None to send it now (full, no wait configured, or a head that never batches)."""
    head = batch[0]
    profile = head.profiles.get(stage) if head.profiles else None
    if len(batch) >= limit or max_wait_s <= 0 or head.solo or profile is None or profile.key is None:
        return None
    send_at = batch[0].queued_at + max_wait_s
    return send_at if send_at > (time.monotonic() if now is None else now) else None
