"""Stage worker processes: spawn, stop, and the death pipe that ties their life to the engine's.

Every worker gets the read end of a pipe whose write end only the engine holds. When the engine
process ends (normally, by exception, by SIGKILL), the kernel closes the write end, the worker's
watcher thread sees EOF and the worker exits: no worker outlives its engine. An engine that stops
its workers on purpose writes STOP first, so they exit at once without cleaning up after it.
"""

from __future__ import annotations

import multiprocessing as mp
import time
from dataclasses import dataclass, field
from multiprocessing.connection import Connection

from ..stages.worker import WorkerSpec, run_stage_worker
from .transport.janitor import Janitor, clean_after_reaped

STOP = b"stop"
_SPAWN = mp.get_context("spawn")  # fork would copy the engine's threads, sockets and CUDA state


@dataclass
class WorkerProcess:
    spec: WorkerSpec
    process: mp.process.BaseProcess
    death_pipe: Connection = field(repr=False)  # the engine's write end
    janitor: Janitor | None = field(default=None, repr=False)  # told when the worker is reaped
    started: float = field(default_factory=time.time)  # wall clock: files it made are newer

    @property
    def alive(self) -> bool:
        return self.process.exitcode is None

    def kill(self) -> None:
        """The worker is dead or must die now (e.g. it stopped answering)."""
        if self.process.exitcode is None:
            self.process.kill()
        self.process.join()
        self.death_pipe.close()
        self.reaped()

    def reaped(self) -> None:
        """The process has been joined: unlink what CUDA IPC left for it in /dev/shm and tell
        the janitor it need not."""
        clean_after_reaped(self.process.pid, self.started, self.janitor)


def stop_all(processes: list[WorkerProcess], timeout: float = 5.0) -> None:
    """Stop workers together, within one deadline: a word on the death pipe makes its worker exit
    at once (work in flight is abandoned: the engine is closing); stragglers are killed."""
    for worker in processes:
        try:
            worker.death_pipe.send_bytes(STOP)  # on purpose: the engine cleans up, not the worker
        except OSError:  # it is already gone
            pass
        worker.death_pipe.close()
    deadline = time.monotonic() + timeout
    for worker in processes:
        worker.process.join(max(0.0, deadline - time.monotonic()))
    for worker in processes:
        if worker.process.exitcode is None:
            worker.process.kill()
            worker.process.join()
        worker.reaped()


def spawn_worker(spec: WorkerSpec, janitor: Janitor | None = None) -> WorkerProcess:
    reader, writer = _SPAWN.Pipe(duplex=False)
    process = _SPAWN.Process(
        target=run_stage_worker,
        args=(spec, reader),
        name=f"dfuse-{spec.stage}-{spec.worker_id}",
        daemon=True,  # multiprocessing also terminates daemonic children at interpreter exit
    )
    started = time.time()
    process.start()
    reader.close()  # only the child keeps the read end
    if janitor is not None:
        janitor.watch(process.pid, started)
    return WorkerProcess(spec, process, writer, janitor, started)
