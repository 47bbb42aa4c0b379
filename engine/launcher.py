"""Stage worker processes: spawn, stop, and the death pipe that ties their life to the engine's.

Every worker gets the read end of a pipe whose write end only the engine holds. When the engine
process ends (normally, by exception, by SIGKILL), the kernel closes the write end, the worker's
watcher thread sees EOF and the worker exits: no worker outlives its engine.
"""

from __future__ import annotations

import multiprocessing as mp
from dataclasses import dataclass, field
from multiprocessing.connection import Connection

from ..stages.worker import WorkerSpec, run_stage_worker

_SPAWN = mp.get_context("spawn")  # fork would copy the engine's threads, sockets and CUDA state


@dataclass
class WorkerProcess:
    spec: WorkerSpec
    process: mp.process.BaseProcess
    death_pipe: Connection = field(repr=False)  # the engine's write end

    @property
    def alive(self) -> bool:
        return self.process.exitcode is None

    def stop(self, timeout: float = 5.0) -> None:
        """After a Shutdown message: wait, then close the pipe, terminate, and finally kill."""
        self.process.join(timeout)
        self.death_pipe.close()
        if self.process.exitcode is None:
            self.process.join(1.0)  # the watcher exits the worker on EOF
        if self.process.exitcode is None:
            self.process.terminate()
            self.process.join(2.0)
        if self.process.exitcode is None:
            self.process.kill()
            self.process.join()

    def kill(self) -> None:
        """The worker is dead or must die now (e.g. it stopped answering)."""
        if self.process.exitcode is None:
            self.process.kill()
        self.process.join()
        self.death_pipe.close()


def spawn_worker(spec: WorkerSpec) -> WorkerProcess:
    reader, writer = _SPAWN.Pipe(duplex=False)
    process = _SPAWN.Process(
        target=run_stage_worker,
        args=(spec, reader),
        name=f"dfuse-{spec.stage}-{spec.worker_id}",
        daemon=True,  # multiprocessing also terminates daemonic children at interpreter exit
    )
    process.start()
    reader.close()  # only the child keeps the read end
    return WorkerProcess(spec, process, writer)
