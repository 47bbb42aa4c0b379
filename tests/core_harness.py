"""The engine core without worker processes, for tests of its own rules (dispatch, recovery,
moves, deadlines).

A real `EngineCore` runs here: its queues, slot credits, dispatch, recovery and moves, its zmq
sockets and shared-memory pools. Only the worker processes are played by the test, through the
core's `launch` hook: each "process" is a socket pair speaking the real wire protocol, and the
test decides when it says READY, what it answers and when it dies. The core's loop is driven one
turn at a time (`turn`), its health checks only when the test asks: what happens is what the
test sends, whatever the machine's speed (deadlines and back-offs still read the clock).
"""

from __future__ import annotations

import itertools
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path

import torch
import zmq

from dfuse.engine import protocol as wire
from dfuse.engine.config import EngineConfig, TransportConfig
from dfuse.engine.core import EngineCore
from dfuse.engine.state import Request
from dfuse.engine.transport.base import byte_view
from dfuse.scheduler.core import FUSED

IMAGE_SHAPE = (1, 2, 2, 3)  # the played decoder's pixels: every byte is the request's seed


@dataclass(eq=False)
class PlayedProcess:
    """A worker process as the core sees it (launcher.WorkerProcess's interface), played by the test."""

    spec: wire.WorkerSpec
    pid: int
    exitcode: int | None = None
    stop_asked: bool = False
    remote = False

    @property
    def alive(self) -> bool:
        return self.exitcode is None

    def send_stop(self) -> None:
        self.stop_asked = True
        self.exitcode = 0 if self.exitcode is None else self.exitcode

    def wait_exit(self, timeout: float) -> bool:
        return self.exitcode is not None

    def kill(self) -> None:
        self.exitcode = -9 if self.exitcode is None else self.exitcode

    def reaped(self) -> None:
        pass


@dataclass(eq=False)
class PlayedWorker:
    """One process of one worker: what the core sent it, and its voice back."""

    process: PlayedProcess
    tasks: zmq.Socket
    results: zmq.Socket
    received: list = field(default_factory=list)  # every message decoded so far, in order
    unanswered: list = field(default_factory=list)  # tasks received and not answered yet

    @property
    def spec(self) -> wire.WorkerSpec:
        return self.process.spec

    def say(self, message) -> None:
        self.results.send(wire.encode(message))

    def take(self) -> list:
        """The messages that arrived since the last take (batches flattened into their tasks)."""
        new = []
        while self.tasks.poll(0):
            message = wire.worker_decoder.decode(self.tasks.recv())
            new.extend(message.tasks if isinstance(message, wire.StageBatch) else [message])
        self.received.extend(new)
        self.unanswered.extend(m for m in new if isinstance(m, wire.StageTask))
        return new


class CoreHarness:
    """`with CoreHarness(instances={"dit": 2}) as h:` a core whose workers the test plays."""

    def __init__(self, **config):
        config.setdefault("model", "synthetic:encoder=1ms,dit=1ms,decoder=1ms")
        config.setdefault("transport", TransportConfig(slot_mib=1, cpu_wake_latency_us=None))
        self.config = EngineConfig(**config)
        self._context = zmq.Context()
        self._pids = itertools.count(900_000)
        self._ids = itertools.count(1)
        self.current: dict[int, PlayedWorker] = {}  # worker id -> its latest process
        self._played: list[PlayedWorker] = []  # every process, to close their sockets
        self.spawned: list[wire.WorkerSpec] = []  # every process the core started, in order
        try:
            self.core = EngineCore(self.config, Path(self.config.model), launch=self._launch)
            self.core._begin()
        except BaseException:
            if hasattr(self, "core"):  # its pools, run dir and sockets
                self.core._shutdown()
            self._close_played()
            raise

    def _launch(self, spec: wire.WorkerSpec, janitor) -> PlayedProcess:
        tasks = self._context.socket(zmq.PULL)
        tasks.connect(spec.task_endpoint)
        results = self._context.socket(zmq.PUSH)
        results.connect(spec.result_endpoint)
        process = PlayedProcess(spec, next(self._pids))
        self.current[spec.worker_id] = played = PlayedWorker(process, tasks, results)
        self._played.append(played)
        self.spawned.append(spec)
        return process

    # --- driving the core ----------------------------------------------------------------------
    def turn(self, health: bool = False) -> None:
        """One pass of the core's loop. Its health checks (deaths, liveness, deadlines, moves'
        leavers) run only in a pass with `health`, never on the clock: a slow machine changes
        nothing a test sees."""
        self.core._next_health = 0.0 if health else float("inf")
        self.core._turn(wait_s=0.002)

    def settle(self, turns: int = 20) -> None:
        """Let messages in flight on the sockets arrive and be handled."""
        for _ in range(turns):
            self.turn()

    def until(self, condition, turns: int = 400) -> None:
        for _ in range(turns):
            if condition():
                return
            self.turn()
        raise AssertionError("the core did not get there")

    def worker(self, worker_id: int) -> PlayedWorker:
        return self.current[worker_id]

    def ids(self, stage: str) -> list[int]:
        return sorted(w.id for w in self.core.workers.values() if w.stage == stage)

    # --- playing the workers -------------------------------------------------------------------
    def ready(self, *worker_ids: int) -> None:
        """These workers (all when none named) say READY, as a process that loaded its weights."""
        for worker_id in worker_ids or list(self.current):
            played = self.current[worker_id]
            played.say(wire.Ready(worker_id, played.process.pid, 0.0, generation=played.spec.generation))
        self.until(lambda: all(self.core.workers[i].ready for i in worker_ids or self.current))

    def submit(self, seed: int, deadline_s: float | None = None) -> Request:
        params = wire.RequestParams("a prompt", None, 2, 1.0, 16, 16, seed)
        request = Request(next(self._ids), params, Future(),
                          deadline=None if deadline_s is None else time.monotonic() + deadline_s)
        self.core.submit(request)
        self.turn()
        return request

    def tasks(self, worker_id: int) -> list[wire.StageTask]:
        """The tasks sent to the worker since it was last asked (turning the loop a little first)."""
        return self.messages(worker_id, wire.StageTask)

    def done(self, worker_id: int, task: wire.StageTask, compute_s: float = 0.01) -> None:
        """The worker computed `task`: its outputs are in the slot it was given. A decoder's (or a
        fused worker's) pixels are written there for real (the engine copies them out); other
        stages' outputs only name their slot (the next played worker never reads them)."""
        played, worker = self.worker(worker_id), self.core.workers[worker_id]
        played.unanswered.remove(task)
        if worker.stage in ("decoder", FUSED):
            pixels = byte_view(worker.pool.segment.data, task.output.offset, IMAGE_SHAPE, torch.uint8)
            pixels.fill_(task.params.seed)
            outputs = [wire.TensorRef("image", task.output.pool, task.output.offset, IMAGE_SHAPE, "uint8")]
        else:
            outputs = [wire.TensorRef("latents", task.output.pool, task.output.offset, (4,), "float32")]
        played.say(wire.StageDone(worker_id, task.request_id, outputs, wire.StageTimings(0.0, compute_s)))

    def fail(self, worker_id: int, task: wire.StageTask, error: str = "stopped") -> None:
        self.worker(worker_id).unanswered.remove(task)
        self.worker(worker_id).say(wire.StageFailed(worker_id, task.request_id, error))

    def die(self, worker_id: int, exitcode: int = -9) -> None:
        """The worker's process ends (SIGKILL by default); the core's next health check sees it."""
        self.current[worker_id].process.exitcode = exitcode
        self.turn(health=True)

    def serve(self, *requests: Request, turns: int = 400) -> None:
        """Play every stage for these requests (whichever worker gets their tasks, including
        tasks received earlier and not answered) until their futures resolve."""
        ids = {r.id for r in requests}
        for _ in range(turns):
            if all(r.future.done() for r in requests):
                return
            self.turn()
            for worker_id, played in list(self.current.items()):
                played.take()
                for task in [t for t in played.unanswered if t.request_id in ids]:
                    self.done(worker_id, task)
        raise AssertionError(f"requests {sorted(ids)} were not served")

    def messages(self, worker_id: int, kind) -> list:
        """The messages of type `kind` the worker got since it was last asked (after a few turns)."""
        self.settle()
        return [m for m in self.worker(worker_id).take() if isinstance(m, kind)]

    def sent(self, worker_id: int, kind) -> list:
        """Every message of type `kind` the worker's current process got so far (after a few turns)."""
        self.settle()
        self.worker(worker_id).take()
        return [m for m in self.worker(worker_id).received if isinstance(m, kind)]

    def close(self) -> None:
        self.core._closing = True
        self.core._shutdown()
        self._close_played()

    def _close_played(self) -> None:
        for played in self._played:
            played.tasks.close(linger=0)
            played.results.close(linger=0)
        self._context.term()

    def __enter__(self) -> "CoreHarness":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
