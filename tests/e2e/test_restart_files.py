"""A worker that dies and is replaced leaves nothing of itself in the engine's run dir: an engine
whose workers restart all day does not pile up socket files."""

import os
import signal

from dfuse import Engine

from process_utils import wait_until

MODEL = "synthetic:encoder=1ms,dit=1ms,decoder=1ms"


def test_a_replaced_workers_socket_file_is_removed():
    with Engine(model=MODEL, cpu_threads=1) as engine:
        run_dir = engine._core.run_dir
        before = sorted(os.listdir(run_dir))
        dit = next(w for w in engine.stats().workers if w.stage == "dit")
        for restarts in (1, 2):
            os.kill(engine.stats().workers[dit.id].pid, signal.SIGKILL)
            assert wait_until(lambda: (w := engine.stats().workers[dit.id]).restarts == restarts and w.ready, 60)
        (image,) = engine.generate("a cat", num_inference_steps=1, height=64, width=64, seed=0, timeout=60)
        assert image.size == (64, 64)
        sockets = [n for n in os.listdir(run_dir) if n.startswith(f"w{dit.id}.")]
        assert sockets == [f"w{dit.id}.3"], sorted(os.listdir(run_dir))  # its third process's only
        assert len(os.listdir(run_dir)) == len(before)
