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
