"""Nothing outlives the engine: no worker process, no shared-memory segment, no socket folder,
whether it closes normally, through an exception, by Ctrl-C of `dfuse run`, or by SIGKILL."""

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from dfuse import Engine, EngineClosed
from dfuse.engine.transport.shm_files import list_segments

from process_utils import (alive, children_of, cpu_latency_request_allowed, engine_segments, qos_files_open,
                           wait_until)

THREADS = 1


def _worker_pids(engine) -> list[int]:
    return [w.pid for w in engine.stats().workers]


def test_close_leaves_nothing(model_path):
    engine = Engine(model=str(model_path), cpu_threads=THREADS, instances={"encoder": 1, "dit": 2, "decoder": 1})
    pids, run_dir, prefix = _worker_pids(engine), engine.host_names[1], engine.host_names[0]
    assert len(pids) == 4 and all(alive(p) for p in pids)
    assert list_segments(prefix)  # the slot pools exist while the engine runs
    engine.generate("a cat", num_inference_steps=1, height=64, width=64, seed=0)
    engine.close()
    assert not any(alive(p) for p in pids)
    assert list_segments(prefix) == []
    assert not os.path.exists(run_dir)
    with pytest.raises(EngineClosed, match="closed"):
        engine.generate("a cat")
    with pytest.raises(EngineClosed, match="closed"):
        engine.move(1, "decoder")


@pytest.mark.skipif(not cpu_latency_request_allowed(), reason="no CPU latency request allowed here")
def test_the_engine_keeps_idle_cpus_quick_to_wake_only_while_it_runs(model_path):
    """Its CPU latency request (engine/cpu_wake.py) is an open file of the engine's own process:
    held while it serves, closed with it (by the kernel, if it is killed)."""
    before = qos_files_open()
    with Engine(model=str(model_path), cpu_threads=THREADS) as engine:
        assert engine.stats().cpu_wake_latency_us == 0  # the default
        assert qos_files_open() == before + 1
        engine.generate("a cat", num_inference_steps=1, height=64, width=64, seed=0)
    assert qos_files_open() == before


def test_exception_inside_with_leaves_nothing(model_path):
    with pytest.raises(KeyError):
        with Engine(model=str(model_path), cpu_threads=THREADS) as engine:
            pids, prefix = _worker_pids(engine), engine.host_names[0]
            engine.submit("a cat", num_inference_steps=50, height=256, width=256, seed=0)  # still running
            raise KeyError("user code failed")
    assert not any(alive(p) for p in pids)
    assert list_segments(prefix) == []


def test_an_engine_that_cannot_bind_its_sockets_leaves_nothing(model_path, monkeypatch):
    """A bind that fails (here: a path past the 107 characters of a Unix socket) fails the engine
    with the socket's error, and its run dir, segments, lock, janitor and CPU latency request go."""
    import tempfile

    from dfuse.engine.host_resources import HostResources

    endpoint, mkdtemp, run_dirs = HostResources.endpoint, tempfile.mkdtemp, []
    monkeypatch.setattr(HostResources, "endpoint",
                        lambda self, name: endpoint(self, "r" * 120 if name == "results" else name))
    monkeypatch.setattr(tempfile, "mkdtemp", lambda *a, **k: run_dirs.append(mkdtemp(*a, **k)) or run_dirs[-1])
    segments_before, requests_before = engine_segments(os.getpid()), qos_files_open()
    janitors_before = set(children_of(os.getpid()))
    with pytest.raises(Exception, match="longer than 107 characters"):
        Engine(model=str(model_path), cpu_threads=THREADS)
    assert run_dirs and not any(os.path.exists(d) for d in run_dirs)
    assert engine_segments(os.getpid()) == segments_before
    assert qos_files_open() == requests_before
    assert wait_until(lambda: set(children_of(os.getpid())) <= janitors_before, 10)


def test_killed_worker_is_replaced_and_its_requests_complete(model_path, reference):
    """SIGKILL the DiT worker with requests in flight: all finish with their exact images."""
    with Engine(model=str(model_path), cpu_threads=THREADS) as engine:
        (dit,) = [w for w in engine.stats().workers if w.stage == "dit"]
        params = dict(num_inference_steps=30, height=64, width=64)
        futures = [engine.submit("a red fox", seed=20 + i, **params) for i in range(4)]
        assert wait_until(lambda: engine.stats().workers[dit.id].inflight > 0, 60)
        os.kill(dit.pid, signal.SIGKILL)
        for i, future in enumerate(futures):
            image = future.result(timeout=120).images[0]
            assert np.array_equal(np.array(image), reference("a red fox", seed=20 + i, **params))
        restarted = engine.stats().workers[dit.id]
        assert restarted.restarts == 1 and restarted.pid != dit.pid
        # Every slot the dead worker's tasks held (its outputs, its inputs upstream) came back.
        assert wait_until(lambda: all(w.free_slots == 3 for w in engine.stats().workers), 10)
        # And the replacement keeps serving new work.
        (image,) = engine.generate("a cat", num_inference_steps=2, height=64, width=64, seed=1)
        assert np.array_equal(np.array(image), reference("a cat", num_inference_steps=2, height=64, width=64, seed=1))


def test_cancel_stops_diffusers_denoising_loop_and_the_engine_serves_on(model_path, reference):
    """A cancelled request stops at the DiT's next step (raised from the pipeline's
    callback_on_step_end), and the same worker then serves the next request exactly."""
    last_step = {}
    with Engine(model=str(model_path), cpu_threads=THREADS) as engine:
        doomed = engine.submit("a fox", seed=3, num_inference_steps=1000, height=128, width=128,
                               on_progress=lambda stage, step, total: last_step.__setitem__(stage, step))
        assert wait_until(lambda: last_step.get("dit", 0) >= 1, 60)
        assert doomed.cancel()
        params = dict(num_inference_steps=2, height=64, width=64)
        (image,) = engine.generate("a cat", seed=1, **params)
        assert np.array_equal(np.array(image), reference("a cat", seed=1, **params))
        assert last_step["dit"] < 1000 and engine.stats().completed == 1


def _cuda_ipc_files(pid: int) -> list[str]:
    """Named as the CUDA driver's and torch's files for `pid` are (engine/transport/shm_files.py)."""
    return [os.path.join("/dev/shm", f"cuda.shm.0.{pid:x}.1"), os.path.join("/dev/shm", f"torch_{pid}_123_0")]


def test_what_cuda_ipc_leaves_for_a_dead_worker_is_removed(model_path):
    """Exporting CUDA IPC handles leaves /dev/shm/cuda.shm.<n>.<pid in hex>.<n> (the driver's)
    and torch_<pid>_<n>_<n> (torch's reference counts) behind a worker that exits or is killed
    (tests/gpu checks real ones). Planted here for CPU workers: each goes once its worker is
    reaped; another process's stay."""
    files = _cuda_ipc_files
    not_a_worker, workers = files(os.getpid()), []
    try:
        for path in not_a_worker:
            open(path, "wb").close()
        with Engine(model=str(model_path), cpu_threads=THREADS) as engine:
            workers = engine.stats().workers
            for path in [p for w in workers for p in files(w.pid)]:
                open(path, "wb").close()
            (dit,) = [w for w in workers if w.stage == "dit"]
            os.kill(dit.pid, signal.SIGKILL)
            assert wait_until(lambda: engine.stats().workers[dit.id].restarts == 1, 60)
            assert not any(os.path.exists(p) for p in files(dit.pid))
            assert all(os.path.exists(p) for w in workers if w is not dit for p in files(w.pid))
        assert not any(os.path.exists(p) for w in workers for p in files(w.pid))
        assert all(os.path.exists(p) for p in not_a_worker)
    finally:
        for path in not_a_worker + [p for w in workers for p in files(w.pid)]:
            if os.path.exists(path):
                os.unlink(path)


ENGINE_SCRIPT = """
import sys, time
from dfuse import Engine, EngineClosed
from dfuse.engine.transport.shm_files import list_segments
if __name__ == "__main__":
    engine = Engine(model=sys.argv[1], cpu_threads=1)
    print(" ".join(str(w.pid) for w in engine.stats().workers), flush=True)
    time.sleep(600)
"""


def test_engine_killed_with_sigkill_leaves_nothing(model_path, tmp_path):
    script = tmp_path / "engine_main.py"
    script.write_text(ENGINE_SCRIPT)
    proc = subprocess.Popen([sys.executable, str(script), str(model_path)], stdout=subprocess.PIPE, text=True)
    pids = []
    try:
        pids = [int(p) for p in proc.stdout.readline().split()]
        assert len(pids) == 3 and engine_segments(proc.pid)
        for pid in pids:  # as CUDA IPC leaves them for GPU workers (see the test above)
            open(_cuda_ipc_files(pid)[0], "wb").close()
        proc.kill()
        proc.wait(10)
        assert wait_until(lambda: not any(alive(p) for p in pids), 10), "workers outlived the engine"
        assert wait_until(lambda: engine_segments(proc.pid) == [], 10), "the engine's segments leaked"
        assert wait_until(lambda: not any(os.path.exists(f) for p in pids for f in _cuda_ipc_files(p)), 30)
    finally:
        proc.kill()
        for path in [f for p in pids for f in _cuda_ipc_files(p)]:
            if os.path.exists(path):
                os.unlink(path)


def test_ctrl_c_of_dfuse_run_leaves_nothing(model_path, tmp_path):
    proc = subprocess.Popen(
        [sys.executable, "-m", "dfuse.cli", "run", "a fox", "--model", str(model_path), "--steps", "1000",
         "--height", "512", "--width", "512", "--threads", "1", "--out", str(tmp_path / "out.png")],
        stderr=subprocess.PIPE, text=True,
        # As at a terminal: a suite launched in the background (`cmd &` in a script) runs with
        # SIGINT ignored, which children inherit and Python then keeps ignoring.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        line = ""
        while "Workers ready" not in line:
            line = proc.stderr.readline()
            assert line, "dfuse run exited before its workers were ready"
        children = [int(p) for p in os.listdir("/proc") if p.isdigit() and _parent(int(p)) == proc.pid]
        assert children
        time.sleep(0.5)  # let the request reach the DiT
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=30)
        assert proc.returncode == 130, err
        assert "Interrupted" in err and "Traceback" not in err
        # multiprocessing's resource tracker (also a child) exits once it sees its parent gone.
        assert wait_until(lambda: not any(alive(p) for p in children), 10)
        assert engine_segments(proc.pid) == []
    finally:
        proc.kill()


def _parent(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[1])
    except (FileNotFoundError, ValueError, IndexError):
        return None
