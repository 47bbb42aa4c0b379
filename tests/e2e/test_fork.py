"""An engine and os.fork(): children of a process that holds an engine (a web server's pre-fork,
a library forking a helper) exit without harming the engine's workers, whether they leave with
os._exit or the normal way (atexit hooks, finalizers); and in a child, the engine's calls fail at
once with a clear error instead of waiting forever for a core thread that did not survive the fork."""

import json
import os
import select
import signal
import subprocess
import sys

import pytest

from dfuse import Engine

MODEL = "synthetic:encoder=1ms,dit=10ms,decoder=1ms"

# Runs as a script of its own, so that a child's sys.exit() is a real interpreter exit.
FORK_UNDER_LOAD = """
import json, os, sys, time
from dfuse import Engine

engine = Engine(model=sys.argv[1], cpu_threads=1)
pids = [w.pid for w in engine.stats().workers]
futures, children = [], []
for how in ["os._exit", "os._exit", "sys.exit", "sys.exit"]:
    futures += [engine.submit(f"a cat {len(futures) + i}", num_inference_steps=2, height=64, width=64, seed=i)
                for i in range(8)]
    child = os.fork()
    if child == 0:
        if how == "os._exit":
            os._exit(0)
        sys.exit(0)  # the normal way: atexit hooks and the engine's finalizer run in the child
    children.append(child)
exits, deadline = [], time.monotonic() + 60
for child in children:
    while not os.waitpid(child, os.WNOHANG)[0]:
        if time.monotonic() > deadline:
            os.kill(child, 9)
            os.waitpid(child, 0)
            exits.append("hung")
            break
        time.sleep(0.05)
    else:
        exits.append("exited")
outcomes = []
for future in futures:
    try:
        future.result(timeout=60)
        outcomes.append("served")
    except Exception as e:
        outcomes.append(repr(e))
workers = engine.stats().workers
print(json.dumps({"exits": exits, "outcomes": outcomes, "pids_before": pids,
                  "pids_after": [w.pid for w in workers], "restarts": [w.restarts for w in workers]}), flush=True)
engine.close()
"""


def test_forked_children_exiting_under_load_leave_the_engine_serving():
    process = subprocess.Popen([sys.executable, "-c", FORK_UNDER_LOAD, MODEL], stdout=subprocess.PIPE, text=True)
    try:
        output, _ = process.communicate(timeout=300)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(30)
    assert process.returncode == 0, output
    report = json.loads(output.strip().splitlines()[-1])
    assert report["exits"] == ["exited"] * 4
    assert report["outcomes"] == ["served"] * 32
    assert report["pids_after"] == report["pids_before"] and report["restarts"] == [0, 0, 0]


def _in_child(engine, call) -> str:
    """Run `call(engine)` in a forked child; what it raised ('TypeName: message'), or 'returned'.
    The child reports through a pipe and is killed by an alarm if the call hangs."""
    read, write = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover - runs in the child
        try:
            os.close(read)
            signal.signal(signal.SIGALRM, signal.SIG_DFL)  # not pytest-timeout's handler: end the child
            signal.alarm(20)  # a hang ends the child; the parent then sees no report
            try:
                call(engine)
                outcome = "returned"
            except BaseException as e:
                outcome = f"{type(e).__name__}: {e}"
            os.write(write, outcome.encode()[:4000])
        finally:
            os._exit(0)
    os.close(write)
    try:
        ready, _, _ = select.select([read], [], [], 30)
        outcome = os.read(read, 4096).decode() if ready else "no report within 30 s"
    finally:
        os.close(read)
        if os.waitpid(child, os.WNOHANG) == (0, 0):  # still running: a hang
            os.kill(child, signal.SIGKILL)
            os.waitpid(child, 0)
    return outcome or "no report (the child died)"


@pytest.mark.parametrize("call", [
    lambda engine: engine.generate("a cat", num_inference_steps=1, height=64, width=64, seed=0),
    lambda engine: engine.submit("a cat", num_inference_steps=1, height=64, width=64, seed=0),
    lambda engine: engine.stats(),
    lambda engine: engine.move(2, "decoder"),  # a legal move: dit keeps worker 1
], ids=["generate", "submit", "stats", "move"])
def test_engine_calls_in_a_forked_child_fail_at_once(call):
    with Engine(model=MODEL, cpu_threads=1, instances={"encoder": 1, "dit": 2, "decoder": 1}) as engine:
        pids = [w.pid for w in engine.stats().workers]
        outcome = _in_child(engine, call)
        assert outcome.startswith("RuntimeError: "), outcome
        assert f"parent process (pid {os.getpid()})" in outcome and "after fork" in outcome
        # The parent's engine is untouched.
        (image,) = engine.generate("a cat", num_inference_steps=1, height=64, width=64, seed=0, timeout=60)
        assert image.size == (64, 64) and [w.pid for w in engine.stats().workers] == pids


ENGINE_WITH_A_SLEEPING_CHILD = """
import os, sys, time
from dfuse import Engine

engine = Engine(model=sys.argv[1], cpu_threads=1)
child = os.fork()
if child == 0:
    time.sleep(120)  # a pre-forked server's worker, idle
    os._exit(0)
print(" ".join(str(w.pid) for w in engine.stats().workers), child, flush=True)
time.sleep(600)
"""


def test_a_forked_child_does_not_keep_the_workers_of_a_killed_engine_alive():
    """The child holds copies of the engine's files; were the death pipes among them, workers
    would outlive their SIGKILLed engine for as long as the child lives."""
    from process_utils import alive, wait_until

    process = subprocess.Popen([sys.executable, "-c", ENGINE_WITH_A_SLEEPING_CHILD, MODEL], stdout=subprocess.PIPE,
                               text=True)
    pids = []
    try:
        ready, _, _ = select.select([process.stdout], [], [], 120)
        assert ready, "the engine did not start within 120 s"
        *workers, child = [int(p) for p in process.stdout.readline().split()]
        pids = workers + [child]
        assert len(workers) == 3 and alive(child)
        process.kill()
        process.wait(30)
        assert wait_until(lambda: not any(alive(p) for p in workers), 20), "workers outlived their engine"
    finally:
        process.kill()
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
