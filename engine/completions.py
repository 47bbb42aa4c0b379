"""Where request futures are resolved and user callbacks run: one thread beside the engine core.

A Future's done-callbacks run in the thread that resolves it, and `on_progress` runs wherever it
is called. On the core thread a slow callback (saving an image, building PIL frames of a video)
would stall every dispatch, and one that waits on the engine would freeze it. So the engine core hands
outcomes to this thread, in order, and never waits for them.
"""

from __future__ import annotations

import logging
import queue
import threading
from concurrent.futures import Future, InvalidStateError

from .state import RequestFailed

log = logging.getLogger("dfuse.engine")


def resolve(future: Future, result=None, error: Exception | None = None) -> None:
    """Set a future's outcome unless the caller cancelled it meanwhile (from another thread)."""
    try:
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)
    except InvalidStateError:
        pass


class Completions:
    def __init__(self) -> None:
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self.thread = threading.Thread(target=self._run, name="dfuse-completions", daemon=True)
        self.thread.start()

    def resolve(self, future: Future, result=None, error: Exception | None = None) -> None:
        self._queue.put((resolve, (future, result, error)))

    def call(self, callback, *args) -> None:
        self._queue.put((callback, args))

    def close(self, timeout: float = 5.0) -> None:
        """Run what is queued, then stop. A callback stuck forever costs `timeout`, not a hang."""
        self._queue.put(None)
        if threading.current_thread() is not self.thread:
            self.thread.join(timeout)

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            callback, args = item
            try:
                callback(*args)
            except Exception:  # a user's callback: log it, keep serving everyone else
                log.exception("a request callback raised")


class CopyOut:
    """The final pixels leave the decoder's slot on a thread of their own: a video's copy (tens
    of MiB) on the core thread would stall every dispatch meanwhile. Each copy hands its slot
    back (`hand_back(pool, offset, request_id)`, whatever happened) before the caller hears."""

    def __init__(self, completions: Completions, hand_back) -> None:
        self._completions, self._hand_back = completions, hand_back
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="dfuse-copy-out", daemon=True)
        self._thread.start()

    def put(self, request, view, pool) -> None:
        """Copy `view` (the request's pixels in `pool`'s slot), then resolve its future."""
        self._queue.put((request, view, pool))

    def close(self) -> None:
        """Copy what is queued, then stop (the segments those copies read go right after)."""
        self._queue.put(None)
        self._thread.join()

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            request, view, pool = item
            try:
                outcome = {"result": (view[0].numpy().copy(), request.timings)}
            except Exception as e:  # e.g. MemoryError on a long video: that request fails, not the engine
                outcome = {"error": RequestFailed(f"request {request.id}: copying its output failed: {e!r}")}
            finally:
                del view
                self._hand_back(pool, request.output_offset, request.id)
            self._completions.resolve(request.future, **outcome)
