"""close() from several threads, and what the engine says about itself once closed."""

import threading

from dfuse import Engine

from process_utils import alive

MODEL = "synthetic:encoder=1ms,dit=1ms,decoder=1ms"


def test_close_from_two_threads_returns_in_both_only_once_the_workers_are_gone():
    engine = Engine(model=MODEL, cpu_threads=1)
    pids = [w.pid for w in engine.stats().workers]
    engine.generate("a cat", num_inference_steps=1, height=64, width=64, seed=0, timeout=60)
    start = threading.Barrier(2, timeout=30)
    workers_left = {}

    def close(name):
        start.wait()
        engine.close()
        workers_left[name] = [p for p in pids if alive(p)]

    threads = [threading.Thread(target=close, args=(name,)) for name in ("a", "b")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not any(thread.is_alive() for thread in threads), "close() did not return"
    assert workers_left == {"a": [], "b": []}, "a close() returned while workers still ran"


def test_stats_after_close_shows_no_worker_running():
    engine = Engine(model=MODEL, cpu_threads=1)
    engine.generate("a cat", num_inference_steps=1, height=64, width=64, seed=0, timeout=60)
    engine.close()
    stats = engine.stats()
    assert stats.completed == 1  # the counters are still there
    assert [(w.ready, w.pid) for w in stats.workers] == [(False, None)] * 3
