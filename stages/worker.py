"""The stage worker process: load one stage, say READY, then serve tasks until told to stop.

Threads in a worker:
    heartbeat says every second that the process runs, and how long its compute has been stuck
    receiver  PULL socket -> decode against the schema (drops bad frames) -> open announced
              GPU pools, prefetch each task's inputs (map, or copy on the copy stream) ->
              local task queue
    watcher   blocks on the death pipe; when the engine dies: unlink its segments, exit
    main      the compute loop: take a task, run the stage on its (prefetched) inputs, write
              the outputs into the reserved slot, send StageDone on its own PUSH socket; a
              task the engine cancels (CancelTask, noted by the receiver) stops at its next
              denoising step
The receiver accepts and prepares the next task while main computes, so message latency and
input transfers hide behind the current task's compute. Each zmq socket has one thread.
"""

from __future__ import annotations

import gc
import logging
import os
import queue
import shutil
import signal
import threading
import time
import traceback
from multiprocessing.connection import Connection

import msgspec
import torch
import zmq

from ..engine import protocol as wire
from ..engine.protocol import WorkerSpec
from ..engine.cpu_affinity import pin_this_process
from ..engine.devices import is_cpu, torch_device
from ..engine.models.libraries import quiet_libraries
from ..engine.transport.endpoint import Endpoint
from ..engine.transport.shm_files import unlink_segments
from ..engine.transport.drop_log import DropLog
from ..engine.transport.tcp import FrameSigner
from .decoder import DecoderStage
from .dit import DiTStage
from .encoder import EncoderStage
from .fused import FusedStage
from . import weights
from .families import load_family
from .log_forward import KEPT, LogForwarder

log = logging.getLogger("dfuse.worker")

STAGE_CLASSES = {cls.kind: cls for cls in (EncoderStage, DiTStage, DecoderStage, FusedStage)}
# A worker on another node than the engine's (engine/cluster.py) talks over TCP: every frame it
# sends carries an HMAC under the engine's secret, and a frame it receives without one, or seen
# before, is dropped. None on the engine's own host (Unix sockets). One signer per socket and
# thread (transport/tcp.py): the results socket's here; the heartbeat and the receiver make theirs.
_signer: FrameSigner | None = None
MAX_TASK_FRAME_BYTES = 16 << 20  # a batch of tasks with long prompts is well under this


def _encode(message, signer: FrameSigner | None = None) -> bytes:
    frame = wire.encode(message)
    signer = signer or _signer
    return frame if signer is None else signer.sign(frame)


def run_stage_worker(spec: WorkerSpec, death_pipe: Connection) -> None:
    """Process entry point, named by the engine (engine/launcher.py WORKER_ENTRY), which never imports it."""
    global _signer
    secret = bytes.fromhex(spec.secret) if spec.secret else None
    _signer = FrameSigner(secret) if secret and spec.task_endpoint.startswith("tcp://") else None
    if spec.cpus:  # before any thread of ours starts: they all inherit it
        pin_this_process(spec.cpus)
    # Ctrl-C reaches the whole process group; the engine decides how its workers stop.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    logging.basicConfig(level=os.environ.get("DFUSE_LOG", "WARNING"), format=f"[{spec.stage}#{spec.worker_id}] %(message)s")
    forwarder = None
    if _signer is not None:  # on another node: its warnings go to the engine too (stages/log_forward.py)
        forwarder = LogForwarder(spec.worker_id)
        logging.getLogger().addHandler(forwarder)
    threading.Thread(target=_watch_engine, args=(spec, death_pipe), daemon=True, name="death-watch").start()
    os.environ["HF_HUB_OFFLINE"] = "1"  # the engine resolved the model to a folder: N workers never ask the hub
    quiet_libraries()
    if is_cpu(spec.device):
        torch.set_num_threads(spec.cpu_threads)
    else:
        torch.cuda.set_device(torch.device(spec.device))

    context = zmq.Context()
    results = context.socket(zmq.PUSH)
    results.setsockopt(zmq.LINGER, 5000)
    results.connect(spec.result_endpoint)
    device = torch.device(torch_device(spec.device))
    endpoint = Endpoint(device, secret)
    weights.attach(spec.segment_prefix, spec.run_dir, spec.variant)
    try:
        started = time.perf_counter()
        stage = load_stage(spec, spec.stage)
        pool = endpoint.create_gpu_pool(*spec.gpu_pool) if spec.gpu_pool else None
    except Exception as e:  # any load failure must reach the engine as a message, not a hang
        _forward_logs(results, None, forwarder)  # what it warned of while loading, first
        results.send(_encode(wire.LoadFailed(spec.worker_id, f"{type(e).__name__}: {e}")))
        results.close()
        context.term()
        return

    tasks: queue.Queue = queue.Queue()
    cancelled = CancelledTasks()
    # The task socket exists before READY: the engine sends work right after. On the engine's
    # host the engine binds it; on another node this worker binds it (on its node's address) and
    # READY says where, so the engine connects to exactly this worker: a stranger who connects
    # can only push frames, which lack the signature and are dropped, and cannot pull tasks.
    task_socket = context.socket(zmq.PULL)
    task_address, opener = None, None
    if _signer is not None:
        task_socket.setsockopt(zmq.MAXMSGSIZE, MAX_TASK_FRAME_BYTES)  # a stranger's huge frame is not buffered
        task_address = f"{spec.task_endpoint}:{task_socket.bind_to_random_port(spec.task_endpoint)}"
        opener = FrameSigner(secret, accept=bytes.fromhex(spec.task_session))  # its engine-side signer's frames only
    else:
        task_socket.connect(spec.task_endpoint)
    receiver = threading.Thread(target=_receive, args=(task_socket, opener, endpoint, tasks, cancelled), daemon=True)
    receiver.start()
    load_s = time.perf_counter() - started
    log.info("loaded %s weights on %s in %.2f s", spec.dtype, spec.device, load_s)
    results.send(_encode(wire.Ready(spec.worker_id, os.getpid(), load_s, pool, task_address, spec.generation)))
    loop = _ComputeLoop(spec, stage, endpoint, results, tasks, cancelled)
    stop_beating = threading.Event()
    heart = threading.Thread(target=_beat, args=(context, spec, loop, stop_beating, forwarder), daemon=True,
                             name="heartbeat")
    heart.start()
    loop.run()
    stop_beating.set()
    heart.join()
    results.close()
    context.term()


def _beat(context, spec: WorkerSpec, loop: "_ComputeLoop", stop: threading.Event,
          forwarder: LogForwarder | None = None) -> None:
    """Heartbeats on a socket of their own (a zmq socket belongs to one thread): the engine
    notices a process that stopped running (SIGSTOP, a stuck kernel) by their silence, and a
    compute stuck on one task by the stall they report. A worker on another node sends what it
    logged since the last beat with it (`forwarder`)."""
    socket = context.socket(zmq.PUSH)
    socket.setsockopt(zmq.LINGER, 0)
    socket.setsockopt(zmq.SNDHWM, 8 + KEPT)  # room for a second's logs; an engine that reads nothing gets no more
    signer = FrameSigner(bytes.fromhex(spec.secret)) if _signer is not None else None  # a session of its own
    socket.connect(spec.result_endpoint)
    try:
        while not stop.wait(wire.HEARTBEAT_INTERVAL_S):
            try:
                socket.send(_encode(wire.Heartbeat(spec.worker_id, round(loop.stalled_s(), 3)), signer), zmq.NOBLOCK)
            except zmq.Again:  # the engine reads nothing now: what it missed is not kept
                pass
            _forward_logs(socket, signer, forwarder)
        _forward_logs(socket, signer, forwarder)  # the last second's
    finally:
        socket.close()


def _forward_logs(socket: zmq.Socket, signer: FrameSigner | None, forwarder: LogForwarder | None) -> None:
    """Send what the worker logged since the last call (stages/log_forward.py). Never raises:
    a log that cannot be sent must not stop the heartbeats (the engine would replace a working
    worker for their silence)."""
    for message in forwarder.take() if forwarder is not None else ():
        try:
            socket.send(_encode(message, signer), zmq.NOBLOCK)
        except Exception:  # zmq.Again (the engine reads nothing now), or a record that cannot be encoded
            pass


def load_stage(spec: WorkerSpec, kind: str):
    """Load a stage, its components from the engine's host weight cache where another worker
    already published them (stages/weights.py); publish what had to come from disk."""
    dtype = getattr(torch, spec.dtype)
    family = load_family(spec.model_path, spec.device)
    stage = STAGE_CLASSES[kind](family, spec.model_path, torch.device(torch_device(spec.device)), dtype)
    stage.load()
    weights.publish(stage.model, dtype)
    return stage


class TaskCancelled(Exception):
    """Raised from a denoising step of a task the engine cancelled."""


class CancelledTasks:
    """Request ids the engine cancelled: noted by the receiver thread, taken by the compute loop."""

    LIMIT = 4096  # a cancel can cross the task's end: keep the ids of those from piling up

    def __init__(self) -> None:
        self._ids: dict[int, None] = {}  # insertion-ordered: the oldest goes first
        self._lock = threading.Lock()

    def add(self, request_id: int) -> None:
        with self._lock:
            self._ids[request_id] = None
            if len(self._ids) > self.LIMIT:
                del self._ids[next(iter(self._ids))]

    def __contains__(self, request_id: int) -> bool:
        return request_id in self._ids

    def take(self, request_id: int) -> bool:
        """Whether `request_id` was cancelled; forgets it (each cancel is acted on once)."""
        with self._lock:
            if request_id not in self._ids:
                return False
            del self._ids[request_id]
            return True


class _ComputeLoop:
    """Short loop on the main thread: one task at a time, dispatch by message type."""

    def __init__(self, spec: WorkerSpec, stage, endpoint: Endpoint, results: zmq.Socket, tasks: queue.Queue,
                 cancelled: CancelledTasks):
        self.spec = spec
        self.stage = stage
        self.endpoint = endpoint
        self.results = results
        self.tasks = tasks
        self.cancelled = cancelled
        self.running = True
        self.handlers = {wire.StageTask: self.on_task, wire.StageBatch: self.on_batch, wire.Become: self.on_become}
        self.progressed_at: float | None = None  # a task's start or its last step; None: idle

    def run(self) -> None:
        while self.running:
            received_at, message = self.tasks.get()
            self.progressed_at = time.monotonic()
            try:
                self.handlers[type(message)](message, received_at)
            finally:
                self.progressed_at = None

    def stalled_s(self) -> float:
        """Seconds the current task has gone without a step (0 when idle); read by the heartbeat."""
        progressed_at = self.progressed_at
        return 0.0 if progressed_at is None else time.monotonic() - progressed_at

    def on_become(self, message: wire.Become, received_at: float) -> None:
        """Switch stage in place. The engine sends this only once every task here is done, so
        nothing is computing; the old stage's weights are freed before the new ones load."""
        if message.stage not in STAGE_CLASSES:  # only a forged frame can say this: ignore it
            log.warning("ignored a switch to unknown stage %r", message.stage)
            return
        started = time.perf_counter()
        self.stage = None
        gc.collect()
        if self.endpoint.cuda:
            torch.cuda.empty_cache()
        try:
            self.stage = load_stage(self.spec, message.stage)
        except Exception as e:  # the engine restarts this worker in its new stage
            self._send(wire.LoadFailed(self.spec.worker_id, f"{type(e).__name__}: {e}"))
            self.running = False
            return
        self.spec = msgspec.structs.replace(self.spec, stage=message.stage)
        self._send(wire.Ready(self.spec.worker_id, os.getpid(), time.perf_counter() - started, None,
                              generation=self.spec.generation))

    def _skip_if_cancelled(self, task: wire.StageTask) -> bool:
        """A task cancelled while it waited here is answered without running."""
        if not self.cancelled.take(task.request_id):
            return False
        self.endpoint.discard_prefetched(task.request_id)
        self._send(wire.StageFailed(self.spec.worker_id, task.request_id, "cancelled before it started"))
        return True

    def on_task(self, task: wire.StageTask, received_at: float) -> None:
        try:
            self._run_task(task, received_at)
        finally:
            self.endpoint.release(task.request_id)  # its inputs from other nodes: their buffers serve later reads

    def _run_task(self, task: wire.StageTask, received_at: float) -> None:
        started = time.perf_counter()
        if self._skip_if_cancelled(task):
            return
        try:
            try:
                inputs = self.endpoint.fetch(task.request_id, task.inputs)
            except ConnectionError as e:  # from another node's slot server (transport/tcp.py)
                self._send(wire.StageFailed(self.spec.worker_id, task.request_id, f"could not read its inputs: {e}",
                                            inputs_unreachable=True))
                return
            fetched = time.perf_counter()
            writer = self.endpoint.writer(task.output)
            outputs = self.stage.run(inputs, task.params, self._step_hook(task), writer)
            refs = writer.put_all(outputs)
            self.endpoint.finish(task.output)
        except TaskCancelled as e:
            # GPU work it queued may still run: on this worker's stream, before anything the
            # next task writes; it may read inputs the engine recycles, into a result discarded.
            self.cancelled.take(task.request_id)
            self._send(wire.StageFailed(self.spec.worker_id, task.request_id, str(e)))
            return
        except (torch.OutOfMemoryError, MemoryError) as e:
            self._send(wire.StageFailed(self.spec.worker_id, task.request_id, self._out_of_memory(task, e)))
            return
        except torch.AcceleratorError as e:
            # An illegal address or a device-side assert leaves the CUDA context unusable: every
            # later call would fail too. Report this request, then wait for the engine to replace us
            # (exiting here could lose the report: see wire.StageFailed.replace_me).
            log.error("request %d hit a device error; asking to be replaced:\n%s", task.request_id, traceback.format_exc())
            self._send(wire.StageFailed(self.spec.worker_id, task.request_id,
                                        f"{type(e).__name__}: {e} (the {self.spec.stage} worker restarts)", replace_me=True))
            threading.Event().wait()  # until the engine kills this process: nothing more runs here
        except Exception as e:  # a failing request must not take the worker down
            log.warning("request %d failed:\n%s", task.request_id, traceback.format_exc())
            self._send(wire.StageFailed(self.spec.worker_id, task.request_id, f"{type(e).__name__}: {e}"))
            return
        timings = wire.StageTimings(queued_s=started - received_at, compute_s=time.perf_counter() - started,
                                    fetch_s=fetched - started, stages=self.stage.stage_seconds())
        self._send(wire.StageDone(self.spec.worker_id, task.request_id, refs, timings, self._warnings(task.params)))

    def on_batch(self, batch: wire.StageBatch, received_at: float) -> None:
        """Several requests as one call of the stage, then one StageDone per request. If the
        batched call raises (one bad request, or a batch too big for memory), the requests run
        again one by one, so only the request at fault fails. A request cancelled meanwhile is
        dropped and the others start again together."""
        try:
            self._run_batch(batch, received_at)
        finally:
            for task in batch.tasks:
                self.endpoint.release(task.request_id)

    def _run_batch(self, batch: wire.StageBatch, received_at: float) -> None:
        started = time.perf_counter()
        tasks = [t for t in batch.tasks if not self._skip_if_cancelled(t)]
        if len(tasks) <= 1:
            for task in tasks:
                self.on_task(task, received_at)
            return
        try:
            inputs = [self.endpoint.fetch(t.request_id, t.inputs) for t in tasks]
            fetch_s = time.perf_counter() - started
            outputs = self.stage.run_batch(inputs, [t.params for t in tasks], [self._step_hook(t) for t in tasks])
            writers = [self.endpoint.writer(t.output) for t in tasks]
            refs = [w.put_all(o) for w, o in zip(writers, outputs)]
            for task in tasks:
                self.endpoint.finish(task.output)
        except TaskCancelled:
            # The batch stopped for one request: the others start again, still as one batch
            # (a batched call cannot drop a member midway). Their progress restarts from step 1.
            self._run_batch(wire.StageBatch(tasks), received_at)
            return
        except Exception as e:  # incl. out of memory; the single path reports each request's own error
            log.warning("a batch of %d failed (%s: %s); running its requests one by one",
                        len(tasks), type(e).__name__, e)
            gc.collect()
            if self.endpoint.cuda:
                torch.cuda.empty_cache()
            for task in tasks:
                self.on_task(task, received_at)
            return
        compute_s = time.perf_counter() - started
        for task, task_refs in zip(tasks, refs):
            timings = wire.StageTimings(started - received_at, compute_s, batch_size=len(tasks), fetch_s=fetch_s)
            self._send(wire.StageDone(self.spec.worker_id, task.request_id, task_refs, timings,
                                      self._warnings(task.params)))

    def _warnings(self, params: wire.RequestParams) -> list[str]:
        """The stage's warnings for the request's caller (a prompt cut to its text encoder's
        length); they come after its compute, outside its timing. A check that fails costs only
        its warning, never the request."""
        try:
            return self.stage.warnings(params)
        except Exception:  # noqa: BLE001
            log.warning("could not check the prompts of a request:\n%s", traceback.format_exc())
            return []

    def _out_of_memory(self, task: wire.StageTask, error: BaseException) -> str:
        """Give the memory back so the next request starts clean, and say what did not fit."""
        gc.collect()
        if self.endpoint.cuda:
            torch.cuda.empty_cache()
        p = task.params
        return (f"out of memory on {self.spec.device} in the {self.spec.stage} stage for a {p.width}x{p.height} "
                f"request ({type(error).__name__}: {error}); the worker recovered and serves on")

    def _step_hook(self, task: wire.StageTask):
        """Called after every denoising step: stops a cancelled task, reports progress if asked."""
        def on_step(step: int, total: int) -> None:
            self.progressed_at = time.monotonic()
            if task.request_id in self.cancelled:
                raise TaskCancelled(f"cancelled at step {step} of {total}")
            if task.report_progress:
                self._send(wire.Progress(self.spec.worker_id, task.request_id, step, total))

        return on_step

    def _send(self, message) -> None:
        self.results.send(_encode(message))


def _receive(socket: zmq.Socket, opener: FrameSigner | None, endpoint: Endpoint, tasks: queue.Queue,
             cancelled: CancelledTasks) -> None:
    """Receiver thread: decode every frame against the schema (malformed frames are dropped),
    note cancelled tasks, open announced pools, prefetch task inputs, queue tasks for the
    compute loop."""
    if endpoint.cuda:
        torch.cuda.set_device(endpoint.device)  # the current device is per thread
    drops = DropLog(log)  # a TCP task socket is on the network: forged frames must not flood the log
    while True:
        frame = socket.recv()
        if opener is not None:
            signed, frame = frame, opener.open(frame)
            if frame is None:
                drops.warning("dropped a frame without the engine's signature (%d bytes)", len(signed))
                continue
        try:
            message = wire.worker_decoder.decode(frame)
        except msgspec.MsgspecError as e:
            drops.warning("dropped a malformed message (%d bytes): %s", len(frame), e)
            continue
        received_at = time.perf_counter()
        if isinstance(message, wire.CancelTask):  # seen by the compute loop at the next step
            cancelled.add(message.request_id)
            continue
        if isinstance(message, wire.RemotePool):  # a pool on another node: read over TCP
            endpoint.open_remote(message.name, message.address)
            continue
        if isinstance(message, wire.ClosePool):  # its producer stopped, drained: nothing reads it now
            endpoint.close_pool(message.name)
            continue
        if isinstance(message, wire.OpenPool):
            try:
                endpoint.open_pool(message.pool)  # before any task that reads it: same socket, in order
            except Exception:  # tasks reading it will fail one by one, with the error
                log.warning("could not open pool %s:\n%s", message.pool.name, traceback.format_exc())
            continue
        for task in message.tasks if isinstance(message, wire.StageBatch) else [message]:
            if not isinstance(task, wire.StageTask):
                continue
            try:
                endpoint.prefetch(task.request_id, task.inputs)
            except Exception:  # the compute loop fetches again and reports the error with the task
                log.warning("could not prefetch request %d:\n%s", task.request_id, traceback.format_exc())
        tasks.put((received_at, message))


def _watch_engine(spec: WorkerSpec, death_pipe: Connection) -> None:
    """Exit as soon as the engine closes the pipe; if the engine died, clean up after it."""
    try:
        death_pipe.recv_bytes()  # only the engine stopping this worker on purpose writes
        os._exit(0)
    except (EOFError, OSError):
        pass
    # EOF: the engine is gone, or it closed the pipe without a word (it does so only after
    # killing this process). To be sure nobody is left to remove the engine's segments, wait
    # for the reparenting: the kernel closes a dying process's files before it reparents its
    # children.
    deadline = time.monotonic() + 1.0
    while os.getppid() == spec.engine_pid and time.monotonic() < deadline:
        time.sleep(0.02)
    if os.getppid() != spec.engine_pid:
        unlink_segments(spec.segment_prefix)
        shutil.rmtree(spec.run_dir, ignore_errors=True)
    os._exit(0)
