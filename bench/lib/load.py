"""The one load driver: sends requests to an Engine-like runner and records how each one ended.

The driver knows nothing of engines: the benchmark gives `submit(i) -> Future` for request i and,
optionally, `read(i, future)`, what to keep of a finished future (its result by default; an
exception it raises is the request's error). Requests are sent one of two ways:

    OpenLoop(arrivals_s)  request i is submitted arrivals_s[i] seconds after the start, whatever
                          has completed (a driver thread sleeps until each arrival): the load of
                          independent users (bench/sweep)
    ClosedLoop(wave)      whenever fewer than `wave` requests are outstanding, the next `wave` are
                          submitted together: wave=1 is one at a time, wave=n all at once
                          (pipeline, batching, throughput), in between a bounded backlog (chaos)

Meanwhile the calling thread waits for completions and calls `tick(run, completed)` every
`tick_s` seconds (0: at every wake-up) and once more at the end: a benchmark samples the
engine's state there, or kills a worker. A run ends when every request has an outcome; or when
no request completed for `stall_s` (the rest are left as they are: a hung engine may never
answer a cancel); or `drain_s` after the last submission, when the requests still outstanding
are cancelled and recorded as UNFINISHED.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Callable, Sequence

UNFINISHED = "unfinished"  # how a request without an outcome at the drain limit is recorded
OPEN_LOOP_LEAD_S = 0.05  # the first arrival waits this long: the driver thread is running by then


@dataclass(frozen=True)
class OpenLoop:
    arrivals_s: Sequence[float]
    """Request i is submitted this many seconds after the start."""


@dataclass(frozen=True)
class ClosedLoop:
    wave: int
    """Submit this many together whenever fewer than this many are outstanding."""


@dataclass
class Outcome:
    """How one request ended; times in seconds from the run's start (None: never reached)."""

    submitted_s: float | None = None
    done_s: float | None = None  # when its outcome was recorded (after `read`)
    value: object = None  # what `read` returned
    error: str | None = None  # "Type: message" of what submit or read raised, or UNFINISHED: why

    @property
    def latency_s(self) -> float | None:
        """Submitted -> outcome recorded, for a request that succeeded."""
        if self.error is not None or self.done_s is None or self.submitted_s is None:
            return None
        return self.done_s - self.submitted_s


@dataclass
class LoadRun:
    outcomes: list[Outcome]
    start: float  # time.monotonic() of the run's t = 0
    wall_s: float = 0.0  # start -> the end of the run (every outcome in, a stall, or the drain limit)
    stalled: str | None = None  # why the run stopped early, if it did
    _last_change: float = field(default=0.0, repr=False)

    def stop(self, reason: str) -> None:
        """From a tick: end the run now, with `reason` as `stalled`."""
        self.stalled = reason

    def restart_stall_clock(self) -> None:
        """From a tick: what it just did (a kill) may pause completions; the stall wait starts over."""
        self._last_change = time.monotonic()

    @property
    def errors(self) -> list[str | None]:
        return [o.error for o in self.outcomes]


def _result(_index: int, future: Future):
    return future.result()


def drive(submit: Callable[[int], Future], n: int, load: OpenLoop | ClosedLoop, *,
          read: Callable[[int, Future], object] = _result,
          tick: Callable[[LoadRun, int], None] | None = None, tick_s: float = 0.0, wait_s: float = 0.5,
          stall_s: float | None = None, drain_s: float | None = None, cancel_wait_s: float = 600.0,
          progress: Callable[[int], None] | None = None) -> LoadRun:
    """Send n requests as `load` says and return every request's outcome (see the module docstring).
    `wait_s`: the longest the calling thread sleeps between checks when nothing completes."""
    if isinstance(load, OpenLoop) and len(load.arrivals_s) != n:
        raise ValueError(f"{len(load.arrivals_s)} arrival times for {n} requests")
    lead = OPEN_LOOP_LEAD_S if isinstance(load, OpenLoop) else 0.0
    last = "arrival" if isinstance(load, OpenLoop) else "submission"
    run = LoadRun([Outcome() for _ in range(n)], time.monotonic() + lead)
    futures: list[Future | None] = [None] * n
    changed = threading.Condition()
    counted = [0]  # requests with an outcome

    def finish(i: int, value=None, error: str | None = None) -> None:
        outcome = run.outcomes[i]
        outcome.done_s, outcome.value, outcome.error = time.monotonic() - run.start, value, error
        with changed:
            counted[0] += 1
            changed.notify_all()

    def on_done(i: int):
        def callback(future: Future) -> None:
            if future.cancelled():
                return finish(i, error=f"{UNFINISHED}: cancelled {drain_s:g} s after the last {last}")
            try:
                value = read(i, future)
            except Exception as e:  # the request failed: recorded, never raised into the engine's thread
                return finish(i, error=f"{type(e).__name__}: {e}")
            finish(i, value)
        return callback

    def send(i: int) -> None:
        run.outcomes[i].submitted_s = time.monotonic() - run.start
        try:
            futures[i] = submit(i)
        except Exception as e:  # refused at submit (bad input, engine closed): a failure
            finish(i, error=f"{type(e).__name__}: {e}")
            return
        futures[i].add_done_callback(on_done(i))

    stopping = threading.Event()
    sender = None
    if isinstance(load, OpenLoop):
        def send_on_time() -> None:
            for i, t in enumerate(load.arrivals_s):
                if stopping.wait(max(0.0, run.start + t - time.monotonic())):
                    return
                send(i)

        sender = threading.Thread(target=send_on_time, name="load-driver", daemon=True)
        sender.start()

    submitted = 0  # closed loop only: how many were sent so far
    seen, drain_until, next_tick = 0, None, run.start
    run._last_change = time.monotonic()
    while True:
        with changed:
            completed = counted[0]
        now = time.monotonic()
        if completed == n:
            break
        if completed != seen:
            seen, run._last_change = completed, now
            if progress:
                progress(completed)
        elif stall_s is not None and now - run._last_change > stall_s:
            sent = sum(o.submitted_s is not None for o in run.outcomes)
            run.stalled = f"no request completed for {stall_s:g} s ({completed}/{n} done, {sent} submitted)"
            break
        if isinstance(load, ClosedLoop) and submitted < n and submitted - completed < load.wave:
            for i in range(submitted, min(n, submitted + load.wave)):
                send(i)
            submitted = min(n, submitted + load.wave)
        all_sent = submitted == n if sender is None else not sender.is_alive()
        if drain_s is not None and all_sent:
            drain_until = drain_until or now + drain_s
            if now >= drain_until:
                break
        if tick is not None and now >= next_tick:
            tick(run, completed)
            next_tick = max(next_tick + tick_s, now) if tick_s > 0 else now
            if run.stalled:
                break
        with changed:
            if counted[0] == completed:
                until_tick = max(0.0, next_tick - time.monotonic())
                changed.wait(min(wait_s, until_tick) if tick is not None and tick_s > 0 else wait_s)
    run.wall_s = time.monotonic() - run.start
    stopping.set()
    if sender is not None:
        sender.join()
    if progress:
        progress(counted[0])
    if tick is not None:
        tick(run, counted[0])
    if counted[0] < n and not run.stalled:
        _cancel_outstanding(futures, run, changed, counted, n, cancel_wait_s)
    return run


def _cancel_outstanding(futures: list[Future | None], run: LoadRun, changed: threading.Condition, counted: list[int],
                        n: int, wait_s: float) -> None:
    """Cancel what is still outstanding and wait, at most `wait_s`, for every outcome (a cancelled
    request's callback records it as unfinished; one a runner already started cannot be cancelled:
    it finishes, a request's time at most)."""
    for future, outcome in zip(futures, run.outcomes):
        if future is not None and outcome.done_s is None:
            future.cancel()
    deadline = time.monotonic() + wait_s
    with changed:
        while counted[0] < n and changed.wait(max(0.0, deadline - time.monotonic())):
            pass
    for outcome in run.outcomes:
        if outcome.done_s is None:
            outcome.error = f"{UNFINISHED}: no outcome within {wait_s:g} s of the cancel"
