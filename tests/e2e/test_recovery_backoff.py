"""An engine never gives up on a stage after start-up: a replacement killed again and again while
it loads (an OOM killer under pressure) is restarted with growing waits; the requests its stage
cannot serve meanwhile fail with the reason, and once it loads the engine serves as before."""

import os
import signal

import pytest

from dfuse import Engine
from dfuse.engine.state import RequestFailed

from process_utils import wait_until

SYNTHETIC = "synthetic:encoder=1ms,dit=5ms,decoder=1ms"


def _dit(engine):
    (worker,) = [w for w in engine.stats().workers if w.stage == "dit"]
    return worker


def test_a_replacement_killed_while_loading_again_and_again_never_stops_the_engine():
    with Engine(model=SYNTHETIC, cpu_threads=1) as engine:
        assert engine.config.max_attempts == 3
        assert engine.generate("before", seed=1)[0].getpixel((0, 0))[0] == 1
        killed = [_dit(engine).pid]
        os.kill(killed[0], signal.SIGKILL)
        waiting = None
        for death in range(1, 6):  # five deaths in a row while loading: beyond max_attempts
            assert wait_until(lambda: _dit(engine).pid not in (None, *killed), 60), _dit(engine)
            worker = _dit(engine)
            assert not worker.ready  # still loading: this kill is a death while loading
            killed.append(worker.pid)
            os.kill(worker.pid, signal.SIGKILL)
            if death == 3:  # the stage has had no ready worker for three loads: a request waits there
                waiting = engine.submit("during", seed=2)
                assert wait_until(lambda: engine.stats().queues["dit"] == 1, 30)
        with pytest.raises(RequestFailed, match="no dit worker is ready: .* keeps restarting it"):
            waiting.result(timeout=60)
        assert wait_until(lambda: _dit(engine).state == "restarting", 30)  # waiting out its backoff
        assert wait_until(lambda: _dit(engine).ready, 120)
        assert engine.generate("after", seed=3, timeout=60)[0].getpixel((0, 0))[0] == 3
        stats = engine.stats()
        assert _dit(engine).restarts == 6 and stats.completed == 2 and stats.failed == 1
