"""An engine that pins its CPU workers runs every thread of each on its cores, its replacement after
a crash too, and serves. This 2-core machine never has room for three workers of their own, so the
plan is forced (every worker on the last core): what is checked is that the engine carries out
whatever plan it makes, in the real processes."""

import os
import signal

from dfuse import Engine
from dfuse.engine import placement

from process_utils import alive, wait_until

MODEL = "synthetic:encoder=1ms,dit=1ms,decoder=1ms"


def _masks(pid: int) -> set[str]:
    """The Cpus_allowed_list of every thread of `pid`."""
    masks = set()
    for tid in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{tid}/status") as status:
            masks |= {line.split(":", 1)[1].strip() for line in status if line.startswith("Cpus_allowed_list:")}
    return masks


def test_an_engine_runs_its_workers_on_the_cores_it_planned_restarts_included(monkeypatch):
    core = sorted(os.sched_getaffinity(0))[-1]
    monkeypatch.setattr(placement, "plan", lambda threads, cpus: [(core,)] * len(threads))
    with Engine(model=MODEL, cpu_threads=1) as engine:
        workers = engine.stats()["workers"]
        assert [w["cpus"] for w in workers] == [str(core)] * 3
        for worker in workers:
            assert _masks(worker["pid"]) == {str(core)}, worker
        victim = workers[1]["pid"]
        os.kill(victim, signal.SIGKILL)
        assert wait_until(lambda: not alive(victim), 10)

        def replaced() -> int | None:
            w = engine.stats()["workers"][1]
            return w["pid"] if w["ready"] and w["pid"] != victim else None

        assert wait_until(lambda: replaced() is not None, 120)
        assert _masks(replaced()) == {str(core)}
        (image,) = engine.generate("a cat", num_inference_steps=1, height=64, width=64, seed=0)
        assert image.size == (64, 64)
