"""A pinned worker runs every thread on its cores; an engine that pins its CPU workers does so for
each, its replacement after a crash too, and serves. This 2-core machine never has room for three
workers of their own, so the engine's plan is forced (every worker on the last core): what is
checked is that the engine carries out whatever plan it makes, in the real processes."""

import os
import signal

from dfuse import Engine
from dfuse.engine import worker_layout as placement

from fake_engine import FakeEngine
from process_utils import alive, thread_cpus, wait_until

MODEL = "synthetic:encoder=1ms,dit=1ms,decoder=1ms"


def test_an_engine_runs_its_workers_on_the_cores_it_planned_restarts_included(monkeypatch):
    core = sorted(os.sched_getaffinity(0))[-1]
    monkeypatch.setattr(placement, "plan", lambda threads, cpus: [(core,)] * len(threads))
    with Engine(model=MODEL, cpu_threads=1) as engine:
        workers = engine.stats().workers
        assert [w.cpus for w in workers] == [str(core)] * 3
        for worker in workers:
            assert set(thread_cpus(worker.pid).values()) == {str(core)}, worker
        victim = workers[1].pid
        os.kill(victim, signal.SIGKILL)
        assert wait_until(lambda: not alive(victim), 10)

        def replaced() -> int | None:
            w = engine.stats().workers[1]
            return w.pid if w.ready and w.pid != victim else None

        assert wait_until(lambda: replaced() is not None, 120)
        assert set(thread_cpus(replaced()).values()) == {str(core)}
        (image,) = engine.generate("a cat", num_inference_steps=1, height=64, width=64, seed=0)
        assert image.size == (64, 64)


def test_a_pinned_worker_runs_every_thread_on_its_cores(monkeypatch):
    """A real stage worker, spawned with one core: every thread it has once READY (its socket
    threads, receiver, watcher, torch's) runs there."""
    monkeypatch.setenv("DFUSE_LOG", "ERROR")
    core = sorted(os.sched_getaffinity(0))[-1]
    fake = FakeEngine("decoder", cpus=(core,))
    try:
        ready = fake.receive(120)
        assert ready is not None, "the pinned worker never said READY"
        threads = thread_cpus(fake.process.pid)
        assert len(threads) >= 4  # main, receiver, death watch, zmq's own: all of them checked
        assert set(threads.values()) == {str(core)}, threads
    finally:
        fake.close()
    assert not alive(fake.process.pid)
