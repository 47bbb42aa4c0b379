"""What the engine core does when a worker process dies: replace it, and put its requests back.

A mixin of `EngineCore` (engine/core.py), kept apart because it is the one part of the loop that
reasons about failure: who gets charged an attempt, what a dead GPU producer takes with it.
It uses the core's state (`workers`, `_queues`, `config`, `ready`) and its request exits
(`_enqueue`, `_fail`, `_release_inputs`, `_spawn`, `_fatal`), all on the core thread.

A dead worker's in-flight requests go back to the front of their stage's queue: their inputs
are still in the upstream slot. Host pools belong to the engine and outlive any worker; a GPU
pool lives in its producer's memory and dies with it, so requests whose inputs were there
start over from the first stage.
"""

from __future__ import annotations

import logging
import os
import time

import zmq

from ..scheduler.core import FUSED, STAGES
from . import protocol as wire
from .state import Request, RequestFailed, Worker
from .transport.slots import SlotPool

log = logging.getLogger("dfuse.engine")


HEALTH_TICK_S = 0.1  # a respawn deferred for a device's leaving workers is tried again this soon
SPAWN_BACKOFF_S = (0.1, 5.0)  # the first retry of a failed replacement spawn, and the longest wait
LOAD_RETRY_BACKOFF_S = (0.5, 30.0)  # the same, after max_attempts deaths in a row while loading


STALL_FACTOR = 10  # a compute is wedged past this many times its worker's usual task time (and compute_stall_s)


class WorkerRecovery:
    def _on_heartbeat(self, worker: Worker, message: wire.Heartbeat) -> None:
        worker.stalled_s = message.stalled_s

    def _check_workers(self) -> None:
        for worker in self.workers.values():
            if worker.process is None:
                if worker.respawn_at is not None and time.monotonic() >= worker.respawn_at:
                    self._respawn(worker)
                continue
            if worker.process.alive:
                self._check_liveness(worker)
                continue
            code = worker.process.exitcode
            if not worker.ready:
                worker.load_deaths += 1
                # At first start-up a death while loading means the model or device is unusable.
                # Later it is a replacement killed too (chaos, an OOM killer under pressure): the
                # engine never gives up on it, it only waits longer between tries (_respawn) and
                # fails the requests its stage cannot serve meanwhile.
                if not self.ready.is_set():
                    self._fatal(f"{worker.stage} worker {worker.id} exited with code {code} before it was "
                                f"ready ({worker.load_deaths} time(s) in a row; its own error, if any, is on stderr above)")
                    return
                if worker.load_deaths >= self.config.max_attempts:
                    self._fail_unservable(worker, f"worker {worker.id} died {worker.load_deaths} times in a row while "
                                                  f"loading (last exit code {code}); the engine keeps restarting it")
            if getattr(worker.process, "node_lost", False):  # its node's agent is gone: no exit code came
                log.warning("%s worker %d on %s is gone with its node's dfuse agent (the node left the Ray cluster, "
                            "or the agent was killed); replacing it", worker.stage, worker.id, worker.device)
                self._recover(worker, "its node's agent is gone")
                continue
            log.warning("%s worker %d died (exit code %s); restarting it", worker.stage, worker.id, code)
            self._recover(worker, f"exit code {code}")

    def _check_liveness(self, worker: Worker) -> None:
        """A process that runs but does not work: silent past heartbeat_timeout_s (SIGSTOP, a
        stuck kernel), or its compute stuck on one task (a deadlock). It is killed and replaced
        like a dead one; its queued requests go to the other workers. Only the request a stuck
        compute held is charged an attempt: a stopped process is no request's fault."""
        if not worker.ready:
            self._check_loading(worker)
            return
        if not worker.responsive:
            self._reroute_waiting(worker)
        silent = time.monotonic() - worker.last_heard
        stall_limit = max(self.config.compute_stall_s, STALL_FACTOR * (worker.task_s or 0.0))
        if silent > self.config.heartbeat_timeout_s:
            reason, charge = f"not heard from for {silent:.1f} s (stopped or wedged)", False
        elif worker.inflight and worker.stalled_s > stall_limit:
            reason, charge = f"its compute made no progress for {worker.stalled_s:.0f} s", True
        else:
            return
        log.warning("%s worker %d (pid %s): %s; replacing it", worker.stage, worker.id, worker.process.pid, reason)
        worker.stalled_s = 0.0
        self._recover(worker, f"killed: {reason}", charge=charge)

    def _check_loading(self, worker: Worker) -> None:
        """A replacement or a switch that never says READY (stuck on a filesystem, a driver) is
        killed past startup_timeout_s, and counts as a death while loading: requests waiting for
        its stage are not held by it forever. (At first start-up the Engine itself gives up.)"""
        if not self.ready.is_set() or worker.loading_since is None:
            return
        loading_s = time.monotonic() - worker.loading_since
        if loading_s > self.config.startup_timeout_s:
            log.warning("%s worker %d (pid %s) is not ready %.0f s after it started (startup_timeout_s); killing it",
                        worker.stage, worker.id, worker.process.pid, loading_s)
            worker.loading_since = None  # killed once; its death is seen at the next check
            worker.process.kill()

    def _reroute_waiting(self, worker: Worker) -> None:
        """A silent worker's tasks queued behind the one it computes go back to the engine's queue
        at once, for the other workers. Their slots here stay held (as orphans) until this worker
        answers them, if it wakes (it computes them for nothing: no cancel is sent, whose mark
        could outlive the task and stop that request's next task here), or dies."""
        for batch in worker.batches[1:]:
            for request_id in batch:
                request = worker.inflight.pop(request_id)
                worker.orphans[request_id] = request.output_offset
                self._queues[request.stage].push(request)  # its inputs are still in the upstream slot
            log.warning("%s worker %d is silent; %d request(s) queued there go to the other workers",
                        worker.stage, worker.id, len(batch))
        del worker.batches[1:]

    def _fail_unservable(self, worker: Worker, why: str) -> None:
        """A worker keeps dying while it loads, or its node is gone: if its stage has no ready
        worker, the requests waiting there fail now with the reason (rather than wait for a
        restart that may never come); the other stages and devices serve on, and the restarts go on.
        While another worker of the stage is still loading they wait for it instead: up to
        startup_timeout_s for each of its tries (a request's own timeout bounds that wait)."""
        queue = STAGES[0] if worker.stage == FUSED else worker.stage  # a fused worker takes new requests
        serves = (queue, FUSED if queue == STAGES[0] else queue)
        if any(w.stage in serves and w.moving_to is None and not w.stopping
               and (w.ready or self._starting(w, besides=worker)) for w in self.workers.values()):
            return
        error = RequestFailed(f"no {worker.stage} worker is ready: {why}")
        fused_ready = any(w.ready and w.stage == FUSED and w.moving_to is None and not w.stopping
                          for w in self.workers.values())
        for request in self._queues[queue].remove_where(lambda r: True):
            if fused_ready and queue != STAGES[0]:
                self._start_over(request)  # a fused worker can still serve it, from the start
            else:
                self._fail(request, error)

    def _starting(self, worker: Worker, besides: Worker) -> bool:
        """Loading now, in a process that runs (e.g. on a node that came back), not failing its
        loads and not killed for loading too long: requests may wait for it, at most
        startup_timeout_s per try (then it is killed: _check_loading)."""
        return (worker is not besides and worker.process is not None and worker.process.alive
                and worker.loading_since is not None and worker.load_deaths < self.config.max_attempts)

    def _recover(self, worker: Worker, cause: str, charge: bool = True) -> None:
        """`charge=False`: the worker asked to be replaced after reporting its failing request,
        so the requests still queued there did not run and none is charged an attempt."""
        worker.died_at = time.monotonic()
        worker.process.kill()
        node_lost = getattr(worker.process, "node_lost", False)  # a cluster worker whose agent (node) is gone
        # Its socket's file in the run dir (one per generation, see _spawn) would stay behind
        # with every restart: closing a bound ipc socket does not unlink it.
        endpoint = worker.socket.getsockopt(zmq.LAST_ENDPOINT).decode()
        worker.socket.close()
        worker.socket = None  # what is sent to it meanwhile waits in its outbox (_send), not on a closed socket
        unlink_ipc_file(endpoint)
        worker.ready = False
        # A worker computes its tasks in the order it got them: only the first was running when
        # it died and may be the cause (a poison request); the ones queued beside it are not
        # charged an attempt, or they would share a poison request's fate. Every request of a
        # computing batch is charged (the poison one cannot be told apart), and each runs alone
        # from now on, so an innocent one cannot die with the poison again.
        computing = worker.batches[0] if worker.batches and charge else set()
        for request in list(worker.inflight.values()):
            worker.pool.release(request.output_offset, request.id)
            request.attempts += request.id in computing
            request.solo = request.solo or (request.id in computing and len(computing) > 1)
            if request.inputs_lost:
                self._start_over(request)
            elif request.attempts >= self.config.max_attempts:
                self._fail(request, RequestFailed(
                    f"the {worker.stage} workers running request {request.id} died {request.attempts} "
                    f"times (last: {cause}); giving up"
                ))
            else:
                self._queues[request.stage].push(request)  # inputs are still in the upstream slot
        worker.inflight.clear()
        worker.batches.clear()
        for request_id, offset in worker.orphans.items():
            worker.pool.release(offset, request_id)
        worker.orphans.clear()
        if worker.pool.on_gpu or node_lost:
            worker.pool_info = None  # consumers starting now must wait for the new pool's handle
            self._restart_requests_reading(worker.pool)
        if node_lost:
            self._cluster.forget(worker.device, worker.process.agent)  # its replacement needs a new agent
        if worker.stopping:  # it was leaving anyway: no replacement; it goes once its outputs are read
            worker.process, worker.died_at = None, None
            return
        worker.restarts += 1
        if worker.moving_to is not None:  # it died while draining: it comes back in its new stage
            worker.stage, worker.moving_to = worker.moving_to, None
            worker.task_s = None  # its speed at the old stage says nothing of the new one
        self._respawn(worker)

    def _respawn(self, worker: Worker) -> None:
        """Start the replacement; if the machine refuses (out of file descriptors or processes),
        the other workers keep serving and it is tried again later, with growing waits: an
        engine never gives up on a worker because a spawn failed once. A worker that died
        max_attempts times in a row while loading also waits, longer each time."""
        beyond = worker.load_deaths - self.config.max_attempts
        if beyond >= 0 and worker.respawn_at is None:
            first, longest = LOAD_RETRY_BACKOFF_S
            wait = min(longest, first * 2 ** beyond)
            worker.process, worker.respawn_at = None, time.monotonic() + wait
            log.warning("%s worker %d died %d times in a row while loading; next try in %.1f s",
                        worker.stage, worker.id, worker.load_deaths, wait)
            return
        if self._device_leaving(worker.device):  # a removed worker there still holds its weights: soon gone
            worker.process, worker.respawn_at = None, time.monotonic() + HEALTH_TICK_S
            return
        worker.respawn_at = None
        try:
            self._spawn(worker)
        except OSError as e:
            if getattr(e, "node_lost", False):  # the device's node left the cluster: serve with what is left
                lost = ", ".join(sorted(self._lost_devices(), key=self.config.pool.index))
                self._fail_unservable(worker, f"device(s) {lost} left the Ray cluster (their nodes are gone)")
            worker.process = None  # nothing runs for it until a later try succeeds
            worker.spawn_failures += 1
            first, longest = SPAWN_BACKOFF_S
            wait = min(longest, first * 2 ** (worker.spawn_failures - 1))
            worker.respawn_at = time.monotonic() + wait
            log.warning("could not start a replacement for %s worker %d (%s); trying again in %.1f s",
                        worker.stage, worker.id, e, wait)
            return
        worker.spawn_failures, worker.respawn_at = 0, None

    def _restart_requests_reading(self, pool: SlotPool) -> None:
        """A dead GPU producer's pool died with it, as a pool on a lost node did (host pools belong
        to the engine, or to their node's agent, and survive a worker).
        Queued requests whose inputs lived there start over from the first stage now; those a
        consumer already has start over when it reports, and keep their slot in the dead pool
        till then, so the producer's replacement cannot write where the consumer still reads."""
        for queue in self._queues.values():
            for request in queue.remove_where(lambda r: r.input_pool is pool):
                self._start_over(request)
        for consumer in self.workers.values():
            for request in consumer.inflight.values():
                request.inputs_lost = request.inputs_lost or request.input_pool is pool

    def _start_over_unreachable(self, request: Request, reader: str, data: str, error: str) -> None:
        """`reader` ("the dit stage", "the engine") could not read the request's `data` from
        another node: the node that holds them may have left (its raylet killed) before the engine
        saw it. The request starts over on what is left, charged an attempt, so a link that never
        works fails it in the end."""
        request.attempts += 1
        if request.attempts >= self.config.max_attempts:
            self._fail(request, RequestFailed(
                f"{reader} could not read request {request.id}'s {data} from another node "
                f"{request.attempts} times (last: {error})"))
            return
        log.warning("request %d: %s could not read its %s from another node (%s); it starts over",
                    request.id, reader, data, error)
        self._start_over(request)

    def _start_over(self, request: Request) -> None:
        self._release_inputs(request)
        request.inputs, request.stage_index, request.inputs_lost = [], 0, False
        self._enqueue(request)


def unlink_ipc_file(endpoint: str) -> None:
    if endpoint.startswith("ipc://"):
        try:
            os.unlink(endpoint.removeprefix("ipc://"))
        except OSError:  # gone already: nothing was left
            pass
