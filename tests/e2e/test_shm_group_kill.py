"""Nothing of an engine survives in /dev/shm or /tmp when its whole process group dies at once:
`kill -9 -- -PGID` (the engine cannot clean up) or a group SIGTERM. The workers, in sessions of
their own, see the engine die through their death pipes and clean up; the janitor, in a session
of its own too, removes the pools, the weight cache, the lock and the run dir, should they not.

Also: with no room in /dev/shm for the host weight cache, the engine still serves requests
(the cache is only a shortcut), and says so with a warning.
"""

import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest

from process_utils import alive, children_of, cmdline, wait_until



def _files(prefix: str) -> list[str]:
    return sorted(n for n in os.listdir("/dev/shm") if n.startswith(prefix))


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["group-sigkill", "group-sigterm"])
def test_a_group_kill_of_dfuse_run_leaves_no_segment_and_no_run_dir(model_path, sig, tmp_path):
    proc = subprocess.Popen(
        [sys.executable, "-m", "dfuse.cli", "run", "a fox", "--model", str(model_path), "--steps", "1000",
         "--height", "256", "--width", "256", "--threads", "1", "--out", str(tmp_path / "out.png")],
        stderr=subprocess.PIPE, text=True, start_new_session=True,  # its own process group, as with setsid
    )
    try:
        line = ""
        while "Workers ready" not in line:
            line = proc.stderr.readline()
            assert line, "dfuse run exited before its workers were ready"
        (lock,) = [n for n in os.listdir("/dev/shm") if n.startswith(f"dfuse_{proc.pid}_") and n.endswith("_lock")]
        prefix = lock[: -len("lock")]
        with open(os.path.join("/dev/shm", lock)) as f:
            run_dir = json.load(f)["run_dir"]
        children = children_of(proc.pid)
        (janitor,) = [p for p in children if "dfuse.engine.transport.janitor" in cmdline(p)]
        workers = [p for p in children if "dfuse.engine.worker_main" in cmdline(p)]
        assert len(workers) == 3 and os.getsid(janitor) != proc.pid
        assert any("_wt_" in n for n in _files(prefix)) and any(n.endswith("_w0") for n in _files(prefix))
        assert os.path.isdir(run_dir)

        os.killpg(proc.pid, sig)
        proc.wait(30)
        assert wait_until(lambda: _files(prefix) == [], 15), f"left in /dev/shm: {_files(prefix)}"
        assert wait_until(lambda: not os.path.exists(run_dir), 15), f"run dir left: {run_dir}"
        assert wait_until(lambda: not any(alive(p) for p in workers + [janitor]), 15), "a process outlived the engine"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(30)


FULL_FOR_WEIGHTS = '''
import errno, os
_fallocate = os.posix_fallocate

def _full_for_weights(fd, offset, length):  # /dev/shm "full" for the host weight cache only
    if "_wt_" in os.path.basename(os.readlink(f"/proc/self/fd/{fd}")):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    return _fallocate(fd, offset, length)

os.posix_fallocate = _full_for_weights
'''


def test_an_engine_serves_when_dev_shm_has_no_room_for_the_weight_cache(model_path, reference, tmp_path, monkeypatch, capfd):
    from dfuse import Engine

    # Every process started from here on (the workers) runs this first, as a sitecustomize.
    (tmp_path / "sitecustomize.py").write_text(FULL_FOR_WEIGHTS)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(tmp_path), os.environ.get("PYTHONPATH")])))
    with Engine(model=str(model_path), cpu_threads=1) as engine:
        prefix = engine.host_names[0]
        (image,) = engine.generate("a cat", num_inference_steps=2, height=64, width=64, seed=1)
        assert not [n for n in _files(prefix) if "_wt_" in n]  # no cache, and no half-made segment
        assert engine.stats().completed == 1
    assert np.array_equal(np.array(image), reference("a cat", num_inference_steps=2, height=64, width=64, seed=1))
    err = capfd.readouterr().err
    assert "host weight cache: no room in shared memory" in err, err
    assert "slot_mib" not in err and "Traceback" not in err
