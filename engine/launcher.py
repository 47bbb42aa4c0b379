"""Stage worker processes: spawn, stop, and the death pipe that ties their life to the engine's.

A worker is a fresh interpreter running `python -m dfuse.engine.worker_main ENTRY FD`: ENTRY names
the worker's entry point (`module:function`, as vLLM names its worker class), so the engine never
imports worker code, and nothing re-imports the user's main module (a script needs no
`if __name__ == "__main__":` guard, as with diffusers). Its WorkerSpec goes in on stdin, never on
the command line, which every user of the host can read.

Every worker gets the read end of a pipe (FD) whose write end only the engine holds. When the
engine process ends (normally, by exception, by SIGKILL), the kernel closes the write end, the
worker's watcher thread sees EOF and the worker exits: no worker outlives its engine. An engine
that stops its workers on purpose writes STOP first, so they exit at once without cleaning up
after it.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import weakref
from dataclasses import dataclass, field
from multiprocessing.connection import Connection

from .protocol import WorkerSpec, encode_spec
from .transport.janitor import Janitor, clean_after_reaped

STOP = b"stop"
STOP_TIMEOUT_S = 5.0  # how long stopped workers get to exit before they are killed
WORKER_ENTRY = "dfuse.stages.worker:run_stage_worker"
# -P: the working directory does not shadow installed modules in the worker (Python 3.11+).
_PYTHON = [sys.executable, *(["-P"] if sys.version_info >= (3, 11) else [])]
_LIVE: weakref.WeakSet = weakref.WeakSet()  # every WorkerProcess of this process, for fork below


@dataclass(eq=False)  # a process handle: equal only to itself (and hashable, for _LIVE)
class WorkerProcess:
    spec: WorkerSpec
    process: subprocess.Popen = field(repr=False)
    death_pipe: Connection = field(repr=False)  # the engine's write end
    janitor: Janitor | None = field(default=None, repr=False)  # told when the worker is reaped
    started: float = field(default_factory=time.time)  # wall clock: files it made are newer
    remote = False  # a process of this host (cluster.RemoteWorkerProcess: of another node)

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def exitcode(self) -> int | None:
        """None while it runs; its exit status, or -N if signal N ended it."""
        return self.process.poll()

    @property
    def alive(self) -> bool:
        return self.exitcode is None

    def send_stop(self) -> None:
        """Ask it to exit at once (work in flight is abandoned): a word on its death pipe."""
        try:
            self.death_pipe.send_bytes(STOP)  # on purpose: the engine cleans up, not the worker
        except OSError:  # it is already gone
            pass
        self.death_pipe.close()

    def wait_exit(self, timeout: float) -> bool:
        """Whether it exited within `timeout` seconds."""
        try:
            self.process.wait(timeout)
            return True
        except subprocess.TimeoutExpired:
            return False

    def kill(self) -> None:
        """The worker is dead or must die now (e.g. it stopped answering)."""
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()
        self.death_pipe.close()
        self.reaped()

    def reaped(self) -> None:
        """The process has been waited for: unlink what CUDA IPC left for it in /dev/shm and
        tell the janitor it need not."""
        clean_after_reaped(self.process.pid, self.started, self.janitor)


def stop_all(processes: list, timeout: float = STOP_TIMEOUT_S) -> None:
    """Stop workers together, within one deadline: a word on the death pipe makes its worker exit
    at once (work in flight is abandoned: the engine is closing); stragglers are killed. Takes
    WorkerProcess and cluster.RemoteWorkerProcess alike."""
    for worker in processes:
        worker.send_stop()
    deadline = time.monotonic() + timeout
    for worker in processes:
        if worker.wait_exit(max(0.0, deadline - time.monotonic())):
            worker.reaped()
        else:
            worker.kill()  # and reaps it


def spawn_worker(spec: WorkerSpec, janitor: Janitor | None = None, entry: str = WORKER_ENTRY) -> WorkerProcess:
    """Start a worker running `entry` (module:function, called with the spec and the death pipe)."""
    read_fd, write_fd = os.pipe()  # both ends close on exec; only the read end is passed on
    try:
        started = time.time()
        # A session of its own: a terminal's Ctrl-C (SIGINT to the whole foreground group) never
        # reaches a worker, not even while its interpreter starts; the engine stops its workers,
        # through the death pipe, however the engine itself ends.
        process = subprocess.Popen([*_PYTHON, "-m", "dfuse.engine.worker_main", entry, str(read_fd)],
                                   stdin=subprocess.PIPE, pass_fds=(read_fd,), env=_worker_env(),
                                   start_new_session=True)
    except BaseException:
        os.close(write_fd)
        raise
    finally:
        os.close(read_fd)  # only the child keeps the read end
    death_pipe = Connection(write_fd, readable=False)
    try:
        process.stdin.write(encode_spec(spec))
        process.stdin.close()
    except OSError:  # it died at once; the engine's monitor sees the exit code
        pass
    if janitor is not None:
        janitor.watch(process.pid, started)
    worker = WorkerProcess(spec, process, death_pipe, janitor, started)
    _LIVE.add(worker)
    return worker


def _worker_env() -> dict[str, str]:
    """The engine's environment, with the sys.path entries a fresh interpreter would not have as
    PYTHONPATH: a worker imports what the engine could (dfuse found through a script's folder or
    an entry added at run time), as multiprocessing's spawn used to arrange. The interpreter's own
    entries (stdlib, site-packages) stay where it puts them: ahead of them they could shadow the
    stdlib."""
    env = dict(os.environ)
    own = tuple({sys.prefix, sys.base_prefix, sys.exec_prefix})
    paths = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) + sys.path
             if p and os.path.isdir(p) and not os.path.abspath(p).startswith(own)]
    if paths:  # no empty entry: that would mean the working directory
        env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
    return env


def _forget_workers_in_child() -> None:
    """A child made with os.fork() gets a copy of every death pipe's write end; one that outlived
    a killed engine would keep its workers running. The child closes its copies and never waits
    for the workers: they are the parent's."""
    for worker in list(_LIVE):
        try:
            worker.death_pipe.close()
        except OSError:
            pass
        if worker.process.returncode is None:
            worker.process.returncode = 0  # not this process's child to wait for


os.register_at_fork(after_in_child=_forget_workers_in_child)
