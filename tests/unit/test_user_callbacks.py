"""User callbacks run off the threads that deliver results: one that blocks holds back only its
own submit's later callbacks, never another request's result, timeout or callbacks."""

import threading
from concurrent.futures import Future

from dfuse.engine.completions import Completions, UserFuture


def test_a_blocked_done_callback_holds_back_no_other_request():
    completions = Completions()
    release, heard = threading.Event(), threading.Event()
    stuck = UserFuture(completions.user, key=object())
    stuck.add_done_callback(lambda _: release.wait(30))  # e.g. an upload that hangs
    other = UserFuture(completions.user, key=object())
    other.add_done_callback(lambda _: heard.set())
    completions.resolve(stuck, result="first")
    completions.resolve(other, result="second")
    assert other.result(timeout=10) == "second"  # delivered while the first's callback still blocks
    assert heard.wait(10)  # and its own callback ran too
    plain = Future()  # what the engine resolves for its own bookkeeping: untouched by the block
    completions.resolve(plain, error=TimeoutError("late"))
    assert isinstance(plain.exception(timeout=10), TimeoutError)
    release.set()
    completions.close(timeout=10)


def test_one_submits_progress_comes_before_its_done_callback_in_order():
    completions = Completions()
    seen = []

    def on_progress(stage, step, total):
        seen.append(step)

    future = UserFuture(completions.user, key=on_progress)
    future.add_done_callback(lambda _: seen.append("done"))
    for step in range(1, 51):
        completions.progress(on_progress, "dit", step, 50)
    completions.resolve(future, result=None)
    completions.close(timeout=10)
    assert seen == [*range(1, 51), "done"]


def test_a_callback_waiting_on_another_future_does_not_deadlock_delivery():
    completions = Completions()
    first, second = UserFuture(completions.user, key=object()), UserFuture(completions.user, key=object())
    got = []
    first.add_done_callback(lambda _: got.append(second.result(timeout=10)))
    completions.resolve(first, result=1)
    completions.resolve(second, result=2)
    completions.close(timeout=15)
    assert got == [2]
