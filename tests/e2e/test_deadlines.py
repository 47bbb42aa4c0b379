"""Priorities, deadlines and cancellation: observed as which requests finish, in which order,
and what the engine still serves afterwards (never as durations)."""

import threading

import pytest

from dfuse import Engine
from dfuse.engine.state import RequestTimeout

from process_utils import wait_until

# The DiT takes 150 ms a request (sleeping, like a GPU stage): queues form behind it.
MODEL = "synthetic:encoder=1ms,dit=150ms,decoder=1ms"


@pytest.fixture(scope="module")
def engine():
    with Engine(model=MODEL, cpu_threads=1) as engine:
        engine.all_slots_free = [w.free_slots for w in engine.stats().workers]  # nothing in flight yet
        yield engine


def _expect_image(result, seed):
    assert result.images[0].getpixel((0, 0))[0] == seed % 251


def test_high_priority_overtakes_queued_low_priority_work(engine):
    finished, lock = [], threading.Lock()

    def record(name):
        def done(_future):
            with lock:
                finished.append(name)
        return done

    # 12 steps: 450 ms per low in the DiT, so the high one arrives while the first low is still
    # computing even if this thread is descheduled between the submits.
    lows = [engine.submit("low", seed=i, priority=0, num_inference_steps=12) for i in range(6)]
    high = engine.submit("high", seed=99, priority=10)
    for i, future in enumerate(lows):
        future.add_done_callback(record(f"low{i}"))
    high.add_done_callback(record("high"))
    _expect_image(high.result(timeout=30), 99)
    for i, future in enumerate(lows):
        _expect_image(future.result(timeout=30), i)
    # Done-callbacks run on the engine's callback threads, after result() returns: wait for all 7.
    assert wait_until(lambda: len(finished) == 7, 30), finished
    # At most the lows already handed to the DiT (one computing, one queued beside it) and the
    # ones already past it may finish first; the last lows waited behind the high one.
    assert finished.index("high") < finished.index("low5")
    assert finished.index("high") <= 3


def test_timeout_raises_and_the_engine_keeps_serving(engine):
    before = engine.stats().completed
    with pytest.raises(TimeoutError):
        engine.generate("slow", seed=1, num_inference_steps=40, timeout=0.3)  # DiT: 1.5 s
    _expect_image(engine.submit("next", seed=2).result(timeout=30), 2)
    # The timed-out request's DiT work was not followed by a decode: only "next" completed.
    assert engine.stats().completed == before + 1


def test_waiting_requests_past_their_deadline_fail_with_request_timeout(engine):
    blockers = [engine.submit("blocker", seed=i, num_inference_steps=8) for i in range(3)]  # ~0.9 s
    # Earliest deadline first may even serve it before the blockers, but its DiT alone takes
    # 150 ms: a 50 ms deadline cannot be met in any order.
    waiting = engine.submit("waiting", seed=5, timeout=0.05)
    with pytest.raises(RequestTimeout, match="deadline"):
        waiting.result(timeout=30)
    for i, future in enumerate(blockers):
        _expect_image(future.result(timeout=30), i)


def test_cancelled_request_is_dropped_and_others_complete(engine):
    before = engine.stats().completed
    first = engine.submit("first", seed=10)
    doomed = engine.submit("doomed", seed=11, num_inference_steps=8)
    third = engine.submit("third", seed=12)
    assert doomed.cancel()
    _expect_image(first.result(timeout=30), 10)
    _expect_image(third.result(timeout=30), 12)
    assert doomed.cancelled()
    assert engine.stats().completed in (before + 2, before + 3)  # + 3 only if it was mid-stage


LONG = 1000  # DiT steps (the most a request may ask): 37.5 s at 37.5 ms a step, if nothing stopped it


def _last_steps():
    """An on_progress that keeps the last DiT step each request reported."""
    last = {}

    def on_progress_of(name):
        def on_progress(stage, step, total):
            if stage == "dit":
                last[name] = step
        return on_progress

    return last, on_progress_of


def _slots_all_free(engine):
    return wait_until(lambda: [w.free_slots for w in engine.stats().workers] == engine.all_slots_free, 30)


def test_cancel_stops_requests_the_dit_holds_and_it_serves_the_next(engine):
    completed = engine.stats().completed
    last, on_progress_of = _last_steps()
    # One DiT worker: the first computes, the second waits in its local queue (or the engine's).
    first = engine.submit("first", seed=20, num_inference_steps=LONG, on_progress=on_progress_of("first"))
    second = engine.submit("second", seed=21, num_inference_steps=LONG, on_progress=on_progress_of("second"))
    assert wait_until(lambda: last.get("first", 0) >= 2, 30)
    assert first.cancel() and second.cancel()
    _expect_image(engine.submit("next", seed=22).result(timeout=150), 22)
    # "next" ran on the same DiT after them, so they had stopped, long before their last step.
    assert last["first"] < LONG and last.get("second", 0) < LONG
    assert engine.stats().completed == completed + 1
    assert _slots_all_free(engine)  # the stopped tasks gave their slots back


def test_a_timeout_stops_the_dit_and_it_serves_the_next(engine):
    last, on_progress_of = _last_steps()
    with pytest.raises(RequestTimeout):
        engine.generate("slow", seed=23, num_inference_steps=LONG, timeout=0.5, on_progress=on_progress_of("slow"))
    _expect_image(engine.submit("next", seed=24).result(timeout=150), 24)
    assert last.get("slow", 0) < LONG
    assert _slots_all_free(engine)


def test_a_cancelled_request_does_not_take_its_batch_down():
    from dfuse.engine.config import BatchConfig, EngineConfig

    # 10 ms a DiT step; both requests share one DiT batch (same shape), computed one after the
    # other. A full batch (2) leaves at once: the long max wait only lets the pair meet under load.
    config = EngineConfig(model="synthetic:encoder=1ms,dit=40ms,decoder=1ms", cpu_threads=1,
                          batching=BatchConfig(enabled=True, max_batch=2, max_wait_ms=5000))
    last, on_progress_of = _last_steps()
    with Engine(config=config) as engine:
        keep = engine.submit("keep", seed=30, num_inference_steps=100, on_progress=on_progress_of("keep"))
        doomed = engine.submit("doomed", seed=31, num_inference_steps=100, on_progress=on_progress_of("doomed"))
        assert wait_until(lambda: last.get("keep", 0) >= 1, 30)  # the batch is computing
        assert doomed.cancel()
        result = keep.result(timeout=60)
        _expect_image(result, 30)
        assert engine.stats().batched_tasks["dit"] == 1  # the DiT did get them as one batch
        assert result.timings[0]["dit"].batch_size == 1  # run again alone once the batch stopped
        assert last.get("doomed", 0) < 100


@pytest.mark.parametrize("bad,field", [(dict(priority=1.5), "priority"), (dict(priority=10**6), "priority"),
                                       (dict(timeout=0), "timeout"), (dict(timeout=float("nan")), "timeout"),
                                       (dict(timeout="5"), "timeout")])
def test_bad_priority_or_timeout_is_named(engine, bad, field):
    with pytest.raises(ValueError, match=f"^{field}:"):
        engine.submit("x", **bad)
