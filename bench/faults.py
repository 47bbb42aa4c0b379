"""The faults `dfuse bench chaos --faults` injects into a serving engine, one at a time, each
as an operator, a kernel or a careless application would cause it:

    kill       SIGKILL a ready worker (the OOM killer, a crash)
    stop       SIGSTOP a ready worker, SIGCONT it after STOP_S (a debugger, a frozen VM, a
               stuck kernel): past the engine's heartbeat timeout it is replaced meanwhile
    load-kill  SIGKILL a worker, then its replacement while it loads, LOAD_KILLS times in a
               row (an OOM killer under memory pressure)
    fork       os.fork() the engine's process and let the child exit normally, running its exit
               handlers (application servers, DataLoaders and test runners fork)
    callback   a done-callback that blocks for CALLBACK_S on the next request (a slow upload)

Each injector returns a Fault record (what was done, to whom, when); none waits longer than its
own bounds. The chaos driver (bench/chaos.py) decides when.
"""

from __future__ import annotations

import atexit
import os
import random
import signal
import threading
import time
from dataclasses import dataclass

from ..scheduler.core import STAGES

KINDS = ("kill", "stop", "load-kill", "fork", "callback")
STOP_S = (2.0, 14.0)  # one stop shorter than the heartbeat timeout (10 s), one longer: both outcomes
LOAD_KILLS = 3  # deaths in a row while loading: max_attempts' worth, the engine must keep trying
CALLBACK_S = 5.0
WAIT_S = 60.0  # the longest an injector waits for a worker to be ready or to appear (by default)


@dataclass
class Fault:
    at_completed: int  # requests completed when it was injected
    worker_id: int | None  # the victim (None: the fault hit the engine's process, not a worker)
    stage: str | None
    pid: int | None
    inflight: int  # tasks the engine had on the victim just before
    at_s: float  # seconds since the pass started
    kill_to_ready_s: float | None = None  # a replaced victim: fault -> its replacement ready
    kind: str = "kill"
    detail: str = ""
    replaces: bool = True  # the victim's process ends and a replacement must come (not: a short stop)


def inject(kind: str, engine, rng: random.Random, completed: int, started: float, submit_hook=None,
           wait_s: float = WAIT_S) -> Fault | None:
    """Inject one fault of `kind`; None if no victim was ready within `wait_s` (the chaos driver
    passes the reload time it measured on this machine). `submit_hook(fn)` registers fn as the
    done-callback of the next request (the callback fault)."""
    if kind not in KINDS:
        raise ValueError(f"faults: unknown kind {kind!r}; known: {', '.join(KINDS)}")
    at = lambda: round(time.monotonic() - started, 3)  # noqa: E731
    if kind == "fork":
        return Fault(completed, None, None, None, 0, at(), kind=kind, detail=_fork_and_exit_normally(engine),
                     replaces=False)
    if kind == "callback":
        submit_hook(lambda _future: time.sleep(CALLBACK_S))
        return Fault(completed, None, None, None, 0, at(), kind=kind, replaces=False,
                     detail=f"the next request's done-callback blocks {CALLBACK_S:g} s")
    victim = _ready_victim(engine, rng, wait_s)
    if victim is None:
        return None
    fault = Fault(completed, victim.id, victim.stage, victim.pid, victim.inflight, at(), kind=kind)
    if kind == "kill":
        os.kill(victim.pid, signal.SIGKILL)
    elif kind == "stop":
        stop_s = rng.choice(STOP_S)
        os.kill(victim.pid, signal.SIGSTOP)
        threading.Timer(stop_s, _continue, args=(victim.pid,)).start()
        fault.detail = f"SIGCONT after {stop_s:g} s"
        fault.replaces = stop_s > engine.config.heartbeat_timeout_s
    elif kind == "load-kill":
        os.kill(victim.pid, signal.SIGKILL)
        fault.detail = f"then its replacement killed while loading: {_kill_while_loading(engine, victim, wait_s)}"
    return fault


def _ready_victim(engine, rng: random.Random, wait_s: float):
    """A random stage, then a random instance of it; waits until that instance is ready and
    answering (a replacement still loading, or a stopped one, is not hit again)."""
    stage = rng.choice(STAGES)
    worker_id = rng.choice(sorted(w.id for w in engine.stats().workers if w.stage == stage))
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        (worker,) = [w for w in engine.stats().workers if w.id == worker_id]
        if worker.state == "ready" and worker.pid:
            return worker
        time.sleep(0.01)
    return None


def _kill_while_loading(engine, victim, wait_s: float) -> str:
    seen, killed = {victim.pid}, 0
    deadline = time.monotonic() + wait_s
    while killed < LOAD_KILLS and time.monotonic() < deadline:
        (worker,) = [w for w in engine.stats().workers if w.id == victim.id]
        if worker.pid and worker.pid not in seen:
            seen.add(worker.pid)
            if worker.ready:
                break  # it loaded before we could hit it: the engine won this round
            os.kill(worker.pid, signal.SIGKILL)
            killed += 1
        time.sleep(0.005)
    return f"{killed} of {LOAD_KILLS}"


def _continue(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGCONT)
    except ProcessLookupError:  # replaced meanwhile: the engine killed it
        pass


def _fork_and_exit_normally(engine) -> str:
    """The child tries the engine (it must refuse at once), then exits as a Python program
    does: its exit handlers run (multiprocessing's used to SIGTERM the parent's workers)."""
    pid = os.fork()
    if pid == 0:  # the child: no return from here
        code = 0
        try:
            engine.stats()
            code = 3  # an engine call that did not refuse in a child
        except RuntimeError:
            pass
        try:
            atexit._run_exitfuncs()
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        return f"child exited with {code}: the engine answered in a forked child" if code == 3 else f"child exited with {code}"
    return "child refused the engine and exited normally"
