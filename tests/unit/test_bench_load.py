"""The shared load driver (bench/lib/load.py) against a fake runner: no engine, no processes.

The fake serves each request on a timer thread after a fixed service time, so what the driver
must get right is visible in the outcomes: every request ends exactly once, closed loop never
has more than the wave outstanding, open loop submits at the arrival times whatever completes,
and what never finishes is reported (cancelled at the drain limit, or a stall)."""

import threading
from concurrent.futures import Future

from dfuse.bench.lib.load import UNFINISHED, ClosedLoop, OpenLoop, drive


class FakeRunner:
    """Serves request i after `service_s`, with the value i * 10; never, if `hang`; with
    `hold_until`, nothing is served before that many requests were submitted (so a driver that
    does not submit them all at once stalls instead of passing by luck of timing)."""

    def __init__(self, service_s: float = 0.01, hang: bool = False, fail: int | None = None, hold_until: int = 0):
        self.service_s, self.hang, self.fail, self.hold_until = service_s, hang, fail, hold_until
        self.outstanding = self.peak = 0
        self.held: list[tuple[Future, int]] = []
        self.lock = threading.Lock()

    def submit(self, i: int) -> Future:
        future: Future = Future()
        with self.lock:
            self.outstanding += 1
            self.peak = max(self.peak, self.outstanding)
            self.held.append((future, i))
            release = [] if self.hang or len(self.held) < self.hold_until else self.held
            if release:
                self.held = []
        for task in release:
            threading.Timer(self.service_s, self._serve, task).start()
        return future

    def _serve(self, future: Future, i: int) -> None:
        with self.lock:
            self.outstanding -= 1
        if not future.set_running_or_notify_cancel():
            return
        if i == self.fail:
            future.set_exception(RuntimeError("poisoned"))
        else:
            future.set_result(i * 10)


def test_all_at_once_every_request_ends_once_with_its_own_value():
    runner = FakeRunner(hold_until=12)
    run = drive(runner.submit, 12, ClosedLoop(12), stall_s=10)
    assert [o.value for o in run.outcomes] == [i * 10 for i in range(12)]
    assert run.stalled is None and all(o.error is None for o in run.outcomes)
    assert all(o.latency_s is not None and o.latency_s >= 0 for o in run.outcomes)



def test_closed_loop_waves_bound_what_is_outstanding():
    one_at_a_time, waves = FakeRunner(), FakeRunner()
    drive(one_at_a_time.submit, 6, ClosedLoop(1), stall_s=10)
    drive(waves.submit, 20, ClosedLoop(4), stall_s=10)
    assert one_at_a_time.peak == 1
    # A new wave of 4 goes out whenever fewer than 4 are outstanding: never 8 or more at once.
    assert waves.peak < 8


def test_a_failing_request_is_recorded_and_the_others_served():
    runner = FakeRunner(fail=3)
    run = drive(runner.submit, 5, ClosedLoop(5), read=lambda i, f: f.result() + 1, stall_s=10)
    assert run.errors[3] == "RuntimeError: poisoned"
    assert [o.value for i, o in enumerate(run.outcomes) if i != 3] == [1, 11, 21, 41]


def test_open_loop_submits_at_the_arrival_times_and_ticks_meanwhile():
    runner = FakeRunner(service_s=0.02)
    arrivals = [0.0, 0.1, 0.2, 0.3]
    ticks = []
    run = drive(runner.submit, 4, OpenLoop(arrivals), tick=lambda load, done: ticks.append(done), tick_s=0.05,
                drain_s=10)
    for arrival, outcome in zip(arrivals, run.outcomes):  # never early (how late depends on the machine)
        assert arrival <= outcome.submitted_s
    assert [o.submitted_s for o in run.outcomes] == sorted(o.submitted_s for o in run.outcomes)
    assert all(o.error is None for o in run.outcomes)
    assert len(ticks) >= 4 and ticks[-1] == 4  # a tick at the end sees every outcome


def test_what_is_outstanding_at_the_drain_limit_is_cancelled_as_unfinished():
    run = drive(FakeRunner(hang=True).submit, 3, OpenLoop([0.0, 0.0, 0.0]), drain_s=0.1, cancel_wait_s=5)
    assert all(e.startswith(f"{UNFINISHED}: cancelled 0.1 s after the last arrival") for e in run.errors)


def test_a_run_without_completions_stops_as_stalled_and_a_tick_can_stop_it():
    stalled = drive(FakeRunner(hang=True).submit, 3, ClosedLoop(3), stall_s=0.1, wait_s=0.02)
    assert stalled.stalled == "no request completed for 0.1 s (0/3 done, 3 submitted)"
    assert stalled.errors == [None, None, None]  # left as they are: a stuck engine may never answer

    stopped = drive(FakeRunner(hang=True).submit, 3, ClosedLoop(3), tick=lambda load, done: load.stop("enough"),
                    wait_s=0.02)
    assert stopped.stalled == "enough"
