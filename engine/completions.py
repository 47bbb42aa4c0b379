"""Where request futures are resolved, and where user code runs: never on the engine core.

A Future's done-callbacks run in the thread that resolves it, and `on_progress` runs wherever it
is called. On the core thread a slow callback (saving an image, building PIL frames of a video)
would stall every dispatch, and one that waits on the engine would freeze it. So the engine core
hands outcomes to the completions thread, in order, and never waits for them.

The completions thread in turn never runs user code: the futures `Engine.submit` returns are
UserFutures, whose done-callbacks (and every on_progress call) go to UserCallbacks' threads. A
callback that blocks (an upload, a wait on another future) holds back only its own submit's later
callbacks, never another request's result or timeout.
"""

from __future__ import annotations

import collections
import logging
import queue
import threading
import time
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


class UserCallbacks:
    """User code, off the threads that deliver results. Calls with the same key (one submit's
    on_progress and its future's done-callbacks) run in order; different keys run side by side
    on up to THREADS threads, so a callback stuck forever holds back only its own key's."""

    THREADS = 4

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._chains: dict[object, collections.deque] = {}  # key -> calls not yet run
        self._ready: queue.SimpleQueue = queue.SimpleQueue()  # keys with calls and no thread on them
        self._threads = [threading.Thread(target=self._run, name=f"dfuse-callback-{i}", daemon=True)
                         for i in range(self.THREADS)]
        for thread in self._threads:
            thread.start()

    def call(self, key, callback, *args) -> None:
        with self._lock:
            chain = self._chains.get(key)
            if chain is not None:  # a thread is on this key: it runs this call after the others
                chain.append((callback, args))
                return
            self._chains[key] = collections.deque([(callback, args)])
        self._ready.put(key)

    def close(self, timeout: float) -> None:
        """Run what is queued, then stop; callbacks stuck forever cost `timeout` in all, not a hang."""
        for _ in self._threads:
            self._ready.put(None)
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            if thread is not threading.current_thread():
                thread.join(max(0.0, deadline - time.monotonic()))

    def _run(self) -> None:
        while (key := self._ready.get()) is not None:
            while True:
                with self._lock:
                    chain = self._chains[key]
                    if not chain:
                        del self._chains[key]
                        break
                    callback, args = chain.popleft()
                try:
                    callback(*args)
                except Exception:  # a user's callback: log it, keep serving everyone else
                    log.exception("a request callback raised")


class UserFuture(Future):
    """The future `Engine.submit` returns: its done-callbacks run on UserCallbacks' threads (keyed
    with the submit's on_progress, so the last progress comes before done), never in the thread
    that resolves it."""

    def __init__(self, callbacks: UserCallbacks, key) -> None:
        super().__init__()
        self._callbacks, self._key = callbacks, key

    def add_done_callback(self, fn) -> None:
        super().add_done_callback(lambda future: self._callbacks.call(self._key, fn, future))

    def add_internal_callback(self, fn) -> None:
        """The engine's own bookkeeping: runs at once, in the resolving thread."""
        super().add_done_callback(fn)


class Completions:
    def __init__(self) -> None:
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self.user = UserCallbacks()
        self.thread = threading.Thread(target=self._run, name="dfuse-completions", daemon=True)
        self.thread.start()

    def resolve(self, future: Future, result=None, error: Exception | None = None) -> None:
        self._queue.put((resolve, (future, result, error)))

    def progress(self, on_progress, *args) -> None:
        """A user's on_progress, in order with its submit's other callbacks."""
        self.user.call(on_progress, on_progress, *args)

    def close(self, timeout: float = 5.0) -> None:
        """Deliver what is queued, run the callbacks that follow, then stop. A callback stuck
        forever costs `timeout`, not a hang."""
        self._queue.put(None)
        if threading.current_thread() is not self.thread:
            self.thread.join(timeout)
        self.user.close(timeout)

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            callback, args = item
            try:
                callback(*args)
            except Exception:  # never user code here; a bug must not stop every later delivery
                log.exception("resolving a request failed")


class CopyOut:
    """The final pixels leave the decoder's slot on a thread of their own: a video's copy (tens
    of MiB) on the core thread would stall every dispatch meanwhile. Each copy's outcome goes to
    `copied(request, pool, pixels, error)` (the engine core's inbox), which hands the slot back
    and settles the request: it leaves, or starts over when the node holding its pixels is gone."""

    def __init__(self, copied) -> None:
        self._copied = copied
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="dfuse-copy-out", daemon=True)
        self._thread.start()

    def put(self, request, view, pool) -> None:
        """Copy `view` (the request's pixels in `pool`'s slot; or a function that reads them, from
        another node)."""
        self._queue.put((request, view, pool))

    def close(self) -> None:
        """Copy what is queued, then stop (the segments those copies read go right after)."""
        self._queue.put(None)
        self._thread.join()

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            request, view, pool = item
            pixels, error = None, None
            try:
                pixels = (view() if callable(view) else view)[0].numpy().copy()
            except Exception as e:  # out of memory on a long video; a node gone (ConnectionError): the core decides
                error = e
            finally:
                del view, item  # no view of the slot outlives the copy: the core hands the slot on
            self._copied(request, pool, pixels, error)
