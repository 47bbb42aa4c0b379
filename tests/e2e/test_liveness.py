"""A worker that runs but does not work is noticed: a SIGSTOPped one (or one in a stuck kernel)
by its silent heartbeat, a compute stuck on one task by the stall its heartbeat reports. Requests
go to the other workers at once, the stuck one is replaced, and only a request that wedges every
worker it reaches fails, with the reason."""

import os
import signal

import pytest

from dfuse import Engine
from dfuse.engine.config import EngineConfig
from dfuse.engine.state import RequestFailed

from process_utils import alive, wait_until

SYNTHETIC = "synthetic:encoder=1ms,dit=50ms,decoder=1ms"


def _worker(engine, worker_id):
    (worker,) = [w for w in engine.stats().workers if w.id == worker_id]
    return worker


def test_a_stopped_worker_gets_no_new_tasks_and_is_replaced():
    config = EngineConfig(model=SYNTHETIC, devices="cpu", instances={"encoder": 1, "dit": 2, "decoder": 1},
                          cpu_threads=1, heartbeat_timeout_s=8)
    with Engine(config=config) as engine:
        engine.generate(["warm", "up"], seed=0)
        stopped = [w for w in engine.stats().workers if w.stage == "dit"][0]
        os.kill(stopped.pid, signal.SIGSTOP)
        try:
            assert wait_until(lambda: _worker(engine, stopped.id).state == "unresponsive", 30)
            # Every request made now is computed by the other DiT: none waits behind the stopped one.
            result = engine.submit(["a", "b", "c", "d"], seed=10).result(timeout=60)
            assert {t["dit"].worker_id for t in result.timings} == {w.id for w in engine.stats().workers
                                                                    if w.stage == "dit" and w.id != stopped.id}
            assert [image.getpixel((0, 0))[0] for image in result.images] == [10, 11, 12, 13]
            # Past heartbeat_timeout_s it is killed (SIGKILL ends a stopped process) and replaced.
            assert wait_until(lambda: _worker(engine, stopped.id).restarts == 1 and _worker(engine, stopped.id).ready, 60)
            assert not alive(stopped.pid)
        finally:
            if alive(stopped.pid):
                os.kill(stopped.pid, signal.SIGCONT)
        assert engine.generate("after", seed=7, timeout=60)[0].getpixel((0, 0))[0] == 7
        assert engine.stats().failed == 0


def test_a_request_that_wedges_its_worker_fails_with_the_reason_and_the_engine_serves_on():
    config = EngineConfig(model=SYNTHETIC, devices="cpu", cpu_threads=1, compute_stall_s=3, max_attempts=2)
    with Engine(config=config) as engine:
        wedged = engine.submit("hang:dit", seed=1)
        fine = engine.submit("fine", seed=2)
        with pytest.raises(RequestFailed, match="compute made no progress"):
            wedged.result(timeout=120)
        assert fine.result(timeout=60).images[0].getpixel((0, 0))[0] == 2  # re-queued, not charged
        (dit,) = [w for w in engine.stats().workers if w.stage == "dit"]
        assert dit.restarts == 2 and dit.ready
        assert engine.generate("after", seed=3, timeout=60)[0].getpixel((0, 0))[0] == 3


def _stopped(pid: int) -> bool:
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0] == "T"


def test_the_tasks_queued_on_a_silent_worker_go_to_the_other_at_once():
    slow = "synthetic:encoder=1ms,dit=1500ms,decoder=1ms"
    config = EngineConfig(model=slow, devices="cpu", instances={"encoder": 1, "dit": 2, "decoder": 1},
                          cpu_threads=1, heartbeat_timeout_s=300)  # long: this test is about before the kill
    with Engine(config=config) as engine:
        dits = [w.id for w in engine.stats().workers if w.stage == "dit"]
        future = engine.submit([f"r{i}" for i in range(6)], seed=20, height=64, width=64, num_inference_steps=4)
        assert wait_until(lambda: _worker(engine, dits[0]).inflight == 2, 30)  # computing one, one queued
        stopped = _worker(engine, dits[0])
        os.kill(stopped.pid, signal.SIGSTOP)
        try:
            # Five of six finish while it is still stopped: only the one it was computing waits.
            assert wait_until(lambda: engine.stats().completed == 5, 60), engine.stats().queues
            assert _stopped(stopped.pid) and _worker(engine, stopped.id).state == "unresponsive"
        finally:
            os.kill(stopped.pid, signal.SIGCONT)
        result = future.result(timeout=60)
        assert [image.getpixel((0, 0))[0] for image in result.images] == list(range(20, 26))
        # Awake again, it answers the task handed away as well: that slot comes back too.
        assert wait_until(lambda: _worker(engine, stopped.id).free_slots == _worker(engine, dits[1]).free_slots, 30)
        assert _worker(engine, stopped.id).restarts == 0 and engine.stats().failed == 0
        assert engine.generate("after", seed=9, timeout=60)[0].getpixel((0, 0))[0] == 9
