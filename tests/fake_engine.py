"""The engine's side of one stage worker, built by hand, for tests that talk to a real worker
process directly (frames the engine would never send, a spec the engine would not choose here)."""

import os
import shutil
import tempfile
import time

import zmq

from dfuse.engine import protocol as wire
from dfuse.engine.launcher import spawn_worker, stop_all
from dfuse.engine.protocol import WorkerSpec
from dfuse.engine.transport.shm_files import new_segment_prefix, unlink_segments

MODEL = "synthetic:encoder=1ms,dit=1ms,decoder=1ms"
WORKER_ID = 7


class FakeEngine:
    """The engine's side of one worker, built by hand: a PUSH bound at the task endpoint, a PULL
    bound at the result endpoint, a death pipe, and the worker spawned like the launcher does."""

    def __init__(self, stage: str, cpus: tuple[int, ...] | None = None):
        self.run_dir = tempfile.mkdtemp(prefix="dfuse-fuzz-")
        self.prefix = new_segment_prefix()
        self.context = zmq.Context()
        self.tasks = self.context.socket(zmq.PUSH)
        self.tasks.setsockopt(zmq.LINGER, 0)
        self.tasks.setsockopt(zmq.SNDTIMEO, 10_000)  # a flood of frames may meet the high-water mark
        self.tasks.bind(f"ipc://{self.run_dir}/tasks")
        self.results = self.context.socket(zmq.PULL)
        self.results.bind(f"ipc://{self.run_dir}/results")
        spec = WorkerSpec(
            worker_id=WORKER_ID, stage=stage, model_path=MODEL, device="cpu", dtype="float32", cpu_threads=1,
            task_endpoint=f"ipc://{self.run_dir}/tasks", result_endpoint=f"ipc://{self.run_dir}/results",
            engine_pid=os.getpid(), segment_prefix=self.prefix, run_dir=self.run_dir, cpus=cpus,
        )
        self.process = spawn_worker(spec)  # .pid, .exitcode, .kill() as the engine's own handle
        self.heartbeats = 0

    def receive(self, timeout_s: float):
        """The next answer from the worker (heartbeats, its every-second "I run", are counted in
        `heartbeats`, not returned); None after `timeout_s`, or at once if it died."""
        deadline = time.monotonic() + timeout_s
        while True:
            while not self.results.poll(100):
                if self.process.exitcode is not None or time.monotonic() > deadline:
                    return None
            message = wire.engine_decoder.decode(self.results.recv())
            if not isinstance(message, wire.Heartbeat):
                return message
            self.heartbeats += 1

    def send(self, frame: bytes) -> None:
        self.tasks.send(frame)

    def close(self) -> None:
        stop_all([self.process])  # as the engine stops its workers: STOP on the death pipe
        self.tasks.close(linger=0)
        self.results.close(linger=0)
        self.context.term()
        unlink_segments(self.prefix)
        shutil.rmtree(self.run_dir, ignore_errors=True)
