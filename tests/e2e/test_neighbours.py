"""Other users of the host cannot stop an engine from starting: what they leave in /dev/shm under
our names (a directory, files of their own) is skipped by the start-up sweep, and left in place.

Another user is simulated with os.chown to `NOBODY` (the tests run as root)."""

import os
import shutil
import subprocess
import sys

import pytest

from dfuse import Engine

NOBODY = 65534
MODEL = "synthetic:encoder=1ms,dit=1ms,decoder=1ms"


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait(timeout=30)
    return child.pid


@pytest.mark.skipif(os.geteuid() != 0, reason="chowns files to another user: needs root")
def test_an_engine_starts_and_serves_beside_a_neighbours_entries_in_dev_shm():
    dead = _dead_pid()
    directories = [f"/dev/shm/dfuse_{dead}_x", f"/dev/shm/dfuse_{dead}_0badc0de_w0"]
    files = [f"/dev/shm/dfuse_{dead}_y", f"/dev/shm/dfuse_{dead}_0badc0de_w1", f"/dev/shm/dfuse_{dead}_0badc0de_lock"]
    try:
        for path in directories:
            os.mkdir(path)
        for path in files:
            open(path, "x").close()
            os.chown(path, NOBODY, NOBODY)
        with Engine(model=MODEL, cpu_threads=1) as engine:
            (image,) = engine.generate("a cat", num_inference_steps=2, height=64, width=64, seed=0)
            assert image.size == (64, 64)
        assert all(os.path.isdir(p) for p in directories) and all(os.path.exists(p) for p in files)
    finally:
        for path in directories:
            shutil.rmtree(path, ignore_errors=True)
        for path in files:
            if os.path.exists(path):
                os.unlink(path)
