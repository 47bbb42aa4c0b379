"""User callbacks (done-callbacks, on_progress) cannot stall or freeze the engine."""

import os
import signal
import threading

import pytest

import dfuse.engine.worker_spawn as spawn_module
from dfuse import Engine
from dfuse.engine.transport.shm_files import list_segments

from process_utils import children_of, wait_until

SYNTHETIC = "synthetic:encoder=1ms,dit=1ms,decoder=1ms"


def test_a_blocked_callback_holds_back_no_other_result_or_timeout():
    with Engine(model=SYNTHETIC, cpu_threads=1) as engine:
        release, progress = threading.Event(), []
        first = engine.submit("x", seed=1)
        first.add_done_callback(lambda _: release.wait(60))  # e.g. a slow upload of the image
        assert wait_until(lambda: engine.stats().completed == 1, 60)
        second = engine.submit("x", seed=2, on_progress=lambda *step: progress.append(step))
        # Delivered while the first's callback still blocks: results never wait on user code.
        assert second.result(timeout=30).images[0].getpixel((0, 0))[0] == 2
        assert wait_until(lambda: progress and progress[-1][1] == progress[-1][2], 30)
        assert engine.generate("y", seed=3, timeout=30)[0].getpixel((0, 0))[0] == 3
        release.set()


def test_generate_inside_a_callback_works():
    with Engine(model=SYNTHETIC, cpu_threads=1) as engine:
        outcome = {}

        def chain(_):
            outcome["image"] = engine.generate("y", seed=5, timeout=60)[0]

        engine.submit("x", seed=4).add_done_callback(chain)
        assert wait_until(lambda: "image" in outcome, 60)
        assert outcome["image"].getpixel((0, 0))[0] == 5
        assert engine.generate("z", seed=7)[0].getpixel((0, 0))[0] == 7  # still serving


def test_a_failed_spawn_fails_start_up_and_leaves_nothing(monkeypatch):
    """A spawn that raises (e.g. out of file descriptors) must
    not hang the engine's shutdown on the socket it had bound for that worker."""
    real_spawn, started = spawn_module.spawn_worker, []

    def spawn_or_fail(spec, *args):
        started.append(spec)
        if spec.worker_id == 1:
            raise OSError(24, "Too many open files")
        return real_spawn(spec, *args)

    monkeypatch.setattr(spawn_module, "spawn_worker", spawn_or_fail)
    # Other tests' engines (a session fixture) may run in this process: compare with before.
    threads_before, children_before = set(threading.enumerate()), set(children_of(os.getpid()))
    with pytest.raises(RuntimeError, match="Too many open files"):
        Engine(model=SYNTHETIC, cpu_threads=1)
    spec = started[0]
    assert list_segments(spec.segment_prefix) == []
    assert not os.path.exists(spec.run_dir)
    assert [t.name for t in set(threading.enumerate()) - threads_before] == []  # no core, no completions thread
    # Worker 0, which did start, was stopped (and the janitor, which outlives nothing, exits too).
    assert wait_until(lambda: set(children_of(os.getpid())) - children_before == set(), 10)


def test_a_replacement_the_machine_refuses_to_start_is_tried_again_and_the_engine_serves(monkeypatch):
    """Out of file descriptors while a dead worker is replaced: the engine keeps serving with the
    others and starts the replacement once the machine lets it (it used to stop for good)."""
    real_spawn, refusals = spawn_module.spawn_worker, [0]

    def refuse_twice(spec, *args):
        if spec.stage == "dit" and refusals[0] < 2:
            refusals[0] += 1
            raise OSError(24, "Too many open files")
        return real_spawn(spec, *args)

    with Engine(model=SYNTHETIC, cpu_threads=1) as engine:
        (dit,) = [w for w in engine.stats().workers if w.stage == "dit"]
        monkeypatch.setattr(spawn_module, "spawn_worker", refuse_twice)
        os.kill(dit.pid, signal.SIGKILL)
        (image,) = engine.generate("x", seed=9, timeout=120)  # waits for the replacement, then served
        assert image.getpixel((0, 0))[0] == 9
        assert refusals[0] == 2
        replaced = engine.stats().workers[dit.id]
        assert replaced.ready and replaced.pid != dit.pid and replaced.restarts == 1
