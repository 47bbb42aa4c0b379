"""The engine's event loop: per-stage queues, dispatch, slot credits, crash recovery.

One thread (the engine core) owns every zmq socket and all routing state, so nothing here needs a
lock; other threads only append to the inbox and ring the wake socket. Each request walks the
stages in order; between two hops its tensors stay in the producer's slot, and the slot is
released when the consumer reports done (or the request is dropped):

    queue[encoder] -> encoder worker -> StageDone(refs) -> queue[dit] -> dit worker -> ...
                      writes slot E                        reads slot E, writes slot D;
                                                           on StageDone slot E is released

A worker that dies is replaced on the same device; its in-flight requests go back to the front
of their queue (their inputs are still in the upstream slot; the queue keeps their place by
priority and arrival, engine/queues.py) until `max_attempts` is reached (engine/recovery.py).

With batching on (EngineConfig.batching), a free worker takes the queue's head plus compatible
requests behind it as one task (engine/batching.py); each request still holds its own output
slot and gets its own StageDone, so everything above stays per request. Which worker takes a
task is engine/task_dispatch.py; how a request leaves (done, failed, dropped, expired),
engine/request_exits.py. Tests drive this loop one turn at a time, with workers of their own
(`launch`, tests/core_harness.py).

A fused worker (stages/fused.py) takes a new request from the encoder queue and runs it start to
finish in its own process; its StageDone carries the final pixels and each stage's time.

On a Ray cluster (engine/cluster.py) workers on other nodes get their task sockets and a results
socket over TCP, every frame signed (transport/tcp.py); the engine serves its host's pools to
them with a SlotServer, and reads a remote decoder's pixels from its node's.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from concurrent import futures
from pathlib import Path

import msgspec
import zmq

from ..scheduler.core import FUSED, STAGES
from . import protocol as wire
from .config import EngineConfig
from .devices import describe_device, device_kind
from .dispatch import observe
from .completions import Completions, CopyOut, resolve
from .elastic import Elastic
from .host_resources import HostResources
from .worker_layout import build_workers, check_moves, choose_links, pin_cpu_workers
from .queues import StageQueue
from .moves import WorkerMoves
from .recovery import WorkerRecovery
from .remote_workers import RemoteWorkers
from .request_exits import RequestExits
from .worker_spawn import WorkerSpawn
from .task_dispatch import TaskDispatch
from .stats import EngineStats, StatsRecorder
from .state import (
    EngineClosed,
    Request,
    RequestFailed,
    RequestTimeout,
    StageTiming,
    Worker,
)
from .launcher import stop_all
from .startup import StartupProgress
from .transport.drop_log import DropLog

log = logging.getLogger("dfuse.engine")
prompt_log = logging.getLogger("dfuse.engine.prompts")  # what the stages say of a request's prompts

HEALTH_INTERVAL_S = 0.1  # how often worker liveness is checked: a crash is seen within ~0.1 s
MOVE_ANSWER_S = 10.0  # how long Engine.move/place wait for the core to accept or refuse


class EngineCore(TaskDispatch, WorkerRecovery, WorkerMoves, RemoteWorkers, WorkerSpawn, RequestExits):
    def __init__(self, config: EngineConfig, model_path: Path, true_cfg: bool = False, memory=None, launch=None,
                 cluster=None):
        """`launch(spec, janitor)` starts a worker's process on this host and returns its handle
        (alive, exitcode, pid, kill, send_stop, wait_exit, reaped); by default a real one
        (launcher.spawn_worker). Tests of the core's own rules pass processes of their own.
        `cluster`: the engine's RayCluster (engine/cluster.py) for config.cluster "ray", which
        the core owns from here: it closes it when it shuts down, or fails to start."""
        self.config = config
        self._launch = launch
        self.model_path = model_path
        self._memory = memory  # (stage GB, device GB) estimates for a pooled elastic plan (engine/auto_placement.py)
        self._true_cfg = true_cfg  # the family runs CFG only as true CFG (Flux): what a request costs
        self.ready = threading.Event()
        self.startup_error: str | None = None
        self._closing = False
        self._shut_down = False  # set under _wake_lock once the sockets are gone
        self._inbox: collections.deque = collections.deque()
        self._queues = {stage: StageQueue() for stage in STAGES}
        self._stats = StatsRecorder()
        self._drops = DropLog(log)  # frames dropped on the results sockets (the cluster's is on the network)
        self._batch_wake: float | None = None  # a partial batch waits for companions until then
        self._leaving: list = []  # moves.Leaving: removed workers' processes told to stop, until they exit
        self.batch_caps: dict[str, int] = {}  # activation bytes per batch and stage: set by the engine
        self.on_layout = None  # called with the workers' (device, role) once a move changed them: by the engine
        # run dir, segment prefix and its lock, janitor, and the CPU latency request
        self._host = HostResources(config.transport.cpu_wake_latency_us)
        self.run_dir, self.segment_prefix = self._host.run_dir, self._host.segment_prefix
        self._context = zmq.Context()
        self._cluster = cluster
        self.completions = Completions()  # futures are resolved there, user callbacks beside it: never here
        # The final pixels leave the decoder's slot on a thread of their own (engine/completions.py)
        self._copy_out = CopyOut(lambda *copied: self._post(("copied", copied)))
        try:
            if (config.cluster == "ray") != (cluster is not None):
                raise ValueError("cluster: an engine on a Ray cluster is given its RayCluster (engine/cluster.py)")
            self._init_sockets()
            self._init_workers()
        except BaseException:  # e.g. /dev/shm full: leave nothing of a half-built engine behind
            self._host.release()
            for name in ("_results", "_wake_pull", "_wake_push"):  # those made before the failure
                if hasattr(self, name):
                    getattr(self, name).close(linger=0)
            if self._cluster is not None:
                self._close_cluster()
            self._context.term()
            self._copy_out.close()
            self.completions.close()
            raise
        self._thread = threading.Thread(target=self._loop, name="dfuse-core", daemon=True)

    # --- setup -----------------------------------------------------------------------------
    def _init_sockets(self) -> None:
        self._results = self._context.socket(zmq.PULL)
        self._results.bind(self._host.endpoint("results"))
        self._wake_pull = self._context.socket(zmq.PULL)
        self._wake_pull.bind("inproc://wake")
        self._wake_push = self._context.socket(zmq.PUSH)
        self._wake_push.connect("inproc://wake")
        self._wake_lock = threading.Lock()
        self._poller = zmq.Poller()
        self._poller.register(self._results, zmq.POLLIN)
        self._poller.register(self._wake_pull, zmq.POLLIN)
        if self._cluster is not None:
            self._init_cluster_sockets()

    def _init_workers(self) -> None:
        self.links = choose_links(self.config.workers, self._cluster, self.config.gpu_pools)
        self.workers: dict[int, Worker] = build_workers(self.config, self.segment_prefix, self._cluster)
        self._next_worker_id = len(self.workers)  # workers a move starts get new ids (engine/moves.py)
        self.cpu_pinning = pin_cpu_workers(self.config, self.workers)  # before any worker spawns
        self._devices = {device: describe_device(device) for device in self.config.pool}
        if self._cluster is not None:  # CPU devices of other nodes: that node's memory
            self._devices.update(self._node_cpu_devices())
        self._startup = StartupProgress(self.workers)
        self._elastic = self._init_elastic() if self.config.policy == "elastic" else None

    def _init_elastic(self) -> Elastic:
        pooled = self.config.pooled
        return Elastic(self.config.elastic, {w.id: w.device for w in self.workers.values()},
                       {s: list(self.config.pool) if pooled else self.config.devices_of(s) for s in STAGES},
                       pooled=pooled, device_kinds={d: device_kind(d) for d in self.config.pool},
                       memory=self._memory, true_cfg=self._true_cfg)

    # --- called from other threads -----------------------------------------------------------
    @property
    def cluster(self):
        """The Ray cluster of workers on other nodes (engine/cluster.py), or None."""
        return self._cluster

    def start(self) -> None:
        self._thread.start()

    def submit(self, request: Request) -> None:
        self._post(("submit", request))

    def move(self, moves: list[tuple[int, str]], starts: list[tuple[str, str]] = (), stops: list[int] = ()) -> None:
        """Turn each worker into a worker of its new stage, start and stop workers, together,
        losing nothing: movers take no new work, finish what they hold, and switch role in their
        own processes; stoppers drain likewise, then leave."""
        # A copy: the core thread may change them meanwhile.
        check_moves(dict(self.workers), self.config, moves, starts, stops, self._lost_devices())
        accepted: futures.Future = futures.Future()
        self._post(("move", (moves, starts, stops, accepted)))
        # The core checks again, against its state when it gets there (a worker may have died or
        # begun another move since): the caller hears its verdict, not only the log.
        try:
            accepted.result(timeout=MOVE_ANSWER_S)
        except futures.TimeoutError:  # (not the builtin before Python 3.11)
            raise TimeoutError(f"the engine core did not take the moves within {MOVE_ANSWER_S:g} s; they may still "
                               "start (the log says whether they did)") from None

    def close(self, timeout: float = 30.0) -> None:
        self._post(("close", None))
        self._thread.join(timeout)

    def stats(self, model: str, family: str) -> EngineStats:
        """A snapshot for users and the CLI (read without locks: values may be a moment old)."""
        decisions = list(self._elastic.decisions[-20:]) if self._elastic else []
        hold = self._host.cpu_wake
        return self._stats.snapshot(
            self.workers.values(), self._queues, self.links, self.config.policy, decisions, self._devices, model=model,
            family=family, cpu_wake_latency_us=hold.max_us if hold is not None and hold.held else None,
            cpu_pinning=self.cpu_pinning,
            lost_devices=self._cluster.lost_devices(self.config.pool) if self._cluster else [],
        )

    def _post(self, item) -> None:
        with self._wake_lock:  # zmq sockets are not thread-safe; the lock serialises the wake
            if self._shut_down:
                if item[0] == "copied":  # a copy finished while the engine closes: _shutdown settles it
                    self._inbox.append(item)
                elif item[0] == "submit":
                    resolve(item[1].future, error=EngineClosed(self.startup_error or "the engine is closed"))
                elif item[0] == "move":
                    item[1][-1].set_exception(EngineClosed("the engine is closed"))
                return
            self._inbox.append(item)
            try:
                self._wake_push.send(b"", zmq.NOBLOCK)
            except zmq.Again:  # thousands of wakes unread: the core thread is awake, and sees the inbox
                pass

    # --- the loop ----------------------------------------------------------------------------
    def _loop(self) -> None:
        try:
            self._begin()
            while not self._closing:
                self._turn()
        except Exception as e:
            log.exception("engine core crashed")
            self._fatal(f"engine core crashed: {type(e).__name__}: {e}")
        finally:
            self._shutdown()

    def _begin(self) -> None:
        self._handlers = {
            wire.Ready: self._on_ready,
            wire.LoadFailed: self._on_load_failed,
            wire.StageDone: self._on_done,
            wire.StageFailed: self._on_failed,
            wire.Progress: self._on_progress,
            wire.Heartbeat: self._on_heartbeat,
            wire.WorkerLog: self._on_worker_log,
        }
        self._next_health = 0.0
        self._startup.starting()
        for worker in self.workers.values():
            self._spawn(worker)

    def _turn(self, wait_s: float = HEALTH_INTERVAL_S) -> None:
        """One pass of the loop: wait up to `wait_s` for a message or a wake, take in what came,
        check the workers' health when due, and dispatch."""
        if self._batch_wake is not None:  # a partial batch's wait ends sooner
            wait_s = min(wait_s, max(0.0, self._batch_wake - time.monotonic()))
        events = dict(self._poller.poll(wait_s * 1000))
        if self._wake_pull in events:
            while self._wake_pull.poll(0):
                self._wake_pull.recv()
        self._drain_inbox()
        if self._results in events:
            self._drain_results(self._handlers, self._results)
        if self._cluster is not None and self._remote_results in events:
            self._drain_results(self._handlers, self._remote_results, self._cluster.opener)
        for worker in self.workers.values():
            self._flush_outbox(worker)
        self._advance_moves()
        if time.monotonic() >= self._next_health:
            self._check_workers()
            if self._cluster is not None:
                self._cluster.watch()  # nodes that left or came back, with or without workers there
            self._reap_leaving()
            self._restart_stranded()  # requests no worker will serve (the split gave way to fused ones)
            self._expire_waiting()
            self._startup.remind()
            if self._elastic and self.ready.is_set():
                self._rebalance()
            self._next_health = time.monotonic() + HEALTH_INTERVAL_S
        self._dispatch()

    def _drain_inbox(self) -> None:
        while self._inbox:
            kind, item = self._inbox.popleft()
            if kind == "submit":
                if self.startup_error:
                    self.completions.resolve(item.future, error=RequestFailed(self.startup_error))
                else:
                    item.queued_at = time.monotonic()
                    if self._elastic:
                        self._elastic.arrival(item.queued_at, item.params)
                    self._queues[STAGES[0]].push(item)
            elif kind == "move":
                *batch, accepted = item
                try:
                    self._start_moves(*batch, reason="asked", strict=True)
                except (ValueError, OSError) as e:
                    log.warning("moves %s refused: %s", batch, e)  # also for a caller who stopped waiting
                    accepted.set_exception(e)
                except BaseException as e:  # the core is crashing: the caller hears, then the loop's handler
                    accepted.set_exception(e)
                    raise
                else:
                    accepted.set_result(None)
            elif kind == "close":
                self._closing = True
            elif kind == "copied":  # the final pixels are out of the slot (or could not be read)
                self._copied(*item)

    def _drain_results(self, handlers, socket: zmq.Socket, signer=None) -> None:
        while True:
            try:
                frame = socket.recv(zmq.NOBLOCK)
            except zmq.Again:
                return
            if signer is not None:  # from another node: only frames signed with this engine's secret count
                signed, frame = frame, signer.open(frame)
                if frame is None:
                    self._drops.warning("dropped an unsigned or forged message on the cluster socket (%d bytes)", len(signed))
                    continue
            try:
                message = wire.engine_decoder.decode(frame)
            except msgspec.MsgspecError as e:
                if not self.ready.is_set():
                    # Before READY only our own workers talk here: their messages not decoding
                    # means engine and workers run different code (it changed on disk mid-start).
                    self._fatal(f"a stage worker sent a message this engine cannot decode ({e}); "
                                "did the dfuse code change while the engine was starting?")
                    return
                self._drops.warning("dropped a malformed message from a worker (%d bytes): %s", len(frame), e)
                continue
            worker = self.workers.get(message.worker_id)
            if worker is None:
                self._drops.warning("dropped a message from unknown worker %r", message.worker_id)
                continue
            if (signer is not None) != self._is_remote(worker):  # a worker speaks on its own socket only
                self._drops.warning("dropped a message for worker %d on the wrong socket", worker.id)
                continue
            worker.last_heard = time.monotonic()
            handlers[type(message)](worker, message)

    # --- messages from workers ---------------------------------------------------------------
    def _on_ready(self, worker: Worker, message: wire.Ready) -> None:
        if message.generation != worker.generation or worker.process is None:
            self._drops.warning("dropped a READY from a replaced process of worker %d", worker.id)
            return
        worker.ready, worker.load_s, worker.load_deaths, worker.loading_since = True, message.load_s, 0, None
        if worker.died_at is not None:
            self._stats.recovery_s.append(time.monotonic() - worker.died_at)
            worker.died_at = None
        if worker.switch_started is not None:
            switch_s = time.monotonic() - worker.switch_started
            self._stats.switch_s.append(switch_s)
            if self._elastic:
                self._elastic.switched(switch_s)
            log.info("worker %d now serves %s (switch %.2f s)", worker.id, worker.stage, switch_s)
            worker.switch_started = None
            self._layout_changed()
        self._startup.ready(worker, message)
        if self._cluster is not None:
            self._remote_ready(worker, message)
        if message.pool is not None:  # a (re)started GPU producer: consumers map its new pool
            worker.pool_info = message.pool
            for consumer in self._consumers_of(worker):
                if consumer.ready:  # the others map it when they say READY (below)
                    self._send_control(consumer, wire.OpenPool(message.pool))
        # A (re)started consumer maps the GPU pools it reads before its first task.
        for producer in self._producers_of(worker):
            if producer.pool_info is not None:
                self._send_control(worker, wire.OpenPool(producer.pool_info))
        if all(w.ready for w in self.workers.values()):
            self.ready.set()

    def _consumers_of(self, worker: Worker) -> list[Worker]:
        if worker.stage == FUSED:  # its pixels go to the engine
            return []
        index = STAGES.index(worker.stage) + 1
        return [w for w in self.workers.values() if index < len(STAGES) and w.stage == STAGES[index]]

    def _producers_of(self, worker: Worker) -> list[Worker]:
        if worker.stage == FUSED:  # it computes its own inputs
            return []
        index = STAGES.index(worker.stage) - 1
        return [w for w in self.workers.values() if index >= 0 and w.stage == STAGES[index]]

    def _send_control(self, worker: Worker, message) -> None:
        """Pool announcements and Become must arrive, and before any later task: they wait in
        the worker's outbox until its socket takes them (a worker that just said READY may not
        have finished connecting yet)."""
        worker.outbox.append(message)
        self._flush_outbox(worker)

    def _flush_outbox(self, worker: Worker) -> None:
        while worker.outbox and self._send(worker, worker.outbox[0]):
            worker.outbox.pop(0)

    def _send(self, worker: Worker, message) -> bool:
        if worker.socket is None:  # its replacement could not be started yet: kept for it
            return False
        frame = wire.encode(message)
        if worker.signer is not None:  # on another node: signed for its process alone
            frame = worker.signer.sign(frame)
        try:
            worker.socket.send(frame, zmq.NOBLOCK)
            return True
        except zmq.Again:  # the worker's receiver is not connected (yet, or any more)
            return False

    def _on_load_failed(self, worker: Worker, message: wire.LoadFailed) -> None:
        if not self.ready.is_set():  # at first start-up: the model or device is unusable
            self._fatal(f"{worker.stage} worker {worker.id} could not load the model: {message.error}")
            return
        # A replacement (e.g. a CUDA OOM while the dead process's memory is still being freed):
        # it exits now, and the health check restarts it, up to max_attempts times in a row.
        log.warning("replacement %s worker %d could not load: %s", worker.stage, worker.id, message.error)

    def _on_done(self, worker: Worker, message: wire.StageDone) -> None:
        request = self._take_inflight(worker, message.request_id)
        if request is None:
            return  # a late message about a request already re-queued or dropped
        if request.inputs_lost:  # computed from memory freed under it: not a result
            worker.pool.release(request.output_offset, request.id)
            self._start_over(request)
            return
        self._release_inputs(request)
        if worker.stage == FUSED:
            self._on_fused_done(worker, request, message)
            return
        self._add_warnings(request, message.warnings)
        request.timings[worker.stage] = StageTiming(
            worker.id, message.timings.queued_s, message.timings.compute_s, request.waited_s,
            message.timings.batch_size, worker.device, message.timings.fetch_s, time.monotonic(),
        )
        self._stats.stage_times[worker.stage].append(message.timings.compute_s)
        worker.task_s = observe(worker.task_s, message.timings.compute_s)
        # The cost model is per request: a batch's time is shared by its requests.
        self._learn(worker, request, worker.stage, message.timings.compute_s / max(1, message.timings.batch_size))
        if request.stage_index == len(STAGES) - 1:
            self._finish(request, worker, message.outputs)
            return
        request.inputs, request.input_pool, request.input_offset = message.outputs, worker.pool, request.output_offset
        request.stage_index += 1
        self._enqueue(request)

    def _on_fused_done(self, worker: Worker, request: Request, message: wire.StageDone) -> None:
        """A fused worker ran the whole request: each stage's timing from its breakdown (the
        queue and fetch times are the first stage's; each stage ended where the next began),
        then the pixels leave as a decoder's do."""
        self._add_warnings(request, message.warnings)
        t = message.timings
        finished_at = time.monotonic()
        for stage in reversed(STAGES):
            first = stage == STAGES[0]
            seconds = t.stages.get(stage, 0.0)
            request.timings[stage] = StageTiming(worker.id, t.queued_s if first else 0.0, seconds,
                                                 request.waited_s if first else 0.0, 1, worker.device,
                                                 t.fetch_s if first else 0.0, finished_at, fused=True)
            finished_at -= seconds
            self._stats.stage_times[stage].append(seconds)
            self._learn(worker, request, stage, seconds)
        request.timings = {stage: request.timings[stage] for stage in STAGES}  # pipeline order
        worker.task_s = observe(worker.task_s, t.compute_s)
        request.stage_index = len(STAGES) - 1
        self._finish(request, worker, message.outputs)

    def _add_warnings(self, request: Request, warnings: list[str]) -> None:
        for warning in warnings:
            if warning not in request.warnings:  # a stage run again (its inputs lost) says it again
                request.warnings.append(warning)
                prompt_log.warning("%s", warning)

    def _learn(self, worker: Worker, request: Request, stage: str, seconds: float) -> None:
        """One request's compute seconds in `stage` on `worker`'s device, for the elastic cost model."""
        if self._elastic:
            self._elastic.computed(stage, worker.device, request.params, seconds)

    def _enqueue(self, request: Request) -> None:
        """Between two stages: drop what was cancelled or is past its deadline, queue the rest."""
        if request.future.cancelled():
            self._drop(request)
        elif request.expired():
            self._fail(request, RequestTimeout(f"request {request.id} passed its deadline before the {request.stage} stage"))
        else:
            request.queued_at = time.monotonic()
            self._queues[request.stage].push(request)

    def _take_inflight(self, worker: Worker, request_id: int) -> Request | None:
        """Remove a finished request from the worker's books (and from its task's batch)."""
        offset = worker.orphans.pop(request_id, None)
        if offset is not None:  # the late answer to a task re-routed while this worker was silent
            worker.pool.release(offset, request_id)
            return None
        request = worker.inflight.pop(request_id, None)
        for batch in worker.batches:
            if request_id in batch:
                batch.discard(request_id)
                if not batch:
                    worker.batches.remove(batch)
                break
        return request

    def _on_failed(self, worker: Worker, message: wire.StageFailed) -> None:
        request = self._take_inflight(worker, message.request_id)
        if request is not None:
            worker.pool.release(request.output_offset, request.id)
            if request.inputs_lost:  # the failure may be the lost inputs' doing, not the request's
                self._start_over(request)
            elif request.future.cancelled():  # stopped because its caller cancelled it
                self._drop(request)
            elif message.inputs_unreachable:
                self._start_over_unreachable(request, f"the {worker.stage} stage", "inputs", message.error)
            else:
                self._fail(request, RequestFailed(f"the {worker.stage} stage failed: {message.error}"))
        if message.replace_me and worker.ready:
            log.warning("%s worker %d reported a device fault; replacing it", worker.stage, worker.id)
            self._recover(worker, "device fault", charge=False)

    def _on_progress(self, worker: Worker, message: wire.Progress) -> None:
        request = worker.inflight.get(message.request_id)
        if request is not None and request.on_progress is not None:
            stage = "dit" if worker.stage == FUSED else worker.stage  # only the DiT reports steps
            self.completions.progress(request.on_progress, stage, message.step, message.total)

    def _fatal(self, error: str) -> None:
        """Nothing more can be served: fail everything waiting and stop."""
        self.startup_error = self.startup_error or error
        self._closing = True
        self.ready.set()

    # --- worker processes --------------------------------------------------------------------
    def _shutdown(self) -> None:
        """Stop every worker, fail what is left, remove every segment and socket."""
        # Nothing may be submitted from here on (a done-callback below could try): close the
        # door first, then fail everything that got in.
        with self._wake_lock:
            self._shut_down = True
            self._wake_push.close(linger=0)
        alive = [w for w in self.workers.values() if w.process is not None]
        stop_all([w.process for w in alive])  # all at once: closing death pipes stops them now
        self._reap_leaving(closing=True)
        self._copy_out.close()  # the copies in progress read segments released below
        for kind, item in self._inbox:
            if kind == "copied":
                self._copied(*item, closing=True)
        error = EngineClosed(self.startup_error or "the engine closed before this request completed")
        pending = [r for q in self._queues.values() for r in q] + [r for w in alive for r in w.inflight.values()]
        pending += [item for kind, item in self._inbox if kind == "submit"]
        for kind, item in self._inbox:
            if kind == "move":
                item[-1].set_exception(EngineClosed("the engine closed before the move started"))
        for request in pending:
            self.completions.resolve(request.future, error=error)
        self._host.release()
        if self._cluster is not None:  # its agents stop their nodes' workers and give back their pools
            self._close_cluster()
        # Every socket, including one bound for a worker whose spawn then failed: term() would
        # wait forever on a socket left open.
        for sock in [w.socket for w in self.workers.values() if w.socket is not None] + [self._results, self._wake_pull]:
            sock.close(linger=0)
        self._context.term()
        self.completions.close()  # the callers hear before close() returns
        self.ready.set()
