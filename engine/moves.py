"""Moves of workers between stages, as the engine core does them: a mixin of
`EngineCore` (engine/core.py), on the core thread, using its `workers`, `_queues`, `_stats`,
`_elastic` and `_send_control`.

A move drains the worker (no new tasks; its tasks finish and downstream reads its outputs), then
switches its stage in the same process (wire.Become) and waits for its READY. On a pooled
engine a device's set of stages may also grow (a new worker starts there, its weights from the
host weight cache) or shrink (a worker drains the same way, then stops and its pool goes).
"""

from __future__ import annotations

import collections
import logging
import time
from dataclasses import dataclass

import zmq

from . import protocol as wire
from ..scheduler.core import FUSED, STAGES, Placement
from .devices import FUSED_ALONE, ROLES, as_role, device_cpus, fused_alone, role_stages
from .elastic import combo_of, rebalance
from .launcher import STOP_TIMEOUT_S
from .recovery import unlink_ipc_file
from .state import Worker
from .transport.shm_files import unlink_segment
from .transport.slots import SlotPool
from .worker_layout import check_moves

log = logging.getLogger("dfuse.engine")


class WorkerMoves:
    def place(self, placement: dict[str, list[str]]) -> None:
        """Make each named device host exactly its stages (a pooled engine): the switches,
        starts and stops that take the current placement there, together. Called from the
        user's thread, like EngineCore.move."""
        unknown = sorted(set(placement) - set(self.config.pool))
        if unknown:
            raise ValueError(f"placement: {unknown} are not devices of this engine ({list(self.config.pool)})")
        snapshot = dict(self.workers)  # one copy (the core thread may add or remove workers meanwhile)
        workers = {w.id: (w.device, w.moving_to or w.stage) for w in snapshot.values() if not w.stopping}
        current = {d: combo_of({s for dev, s in workers.values() if dev == d}) for d in self.config.pool}
        target = dict(current)
        for device, stages in placement.items():
            if isinstance(stages, str) or not isinstance(stages, (list, tuple, set, frozenset)):
                raise ValueError(f"placement ({device}): expected a list of stages among {', '.join(ROLES)} (got {stages!r})")
            roles = {as_role(s) for s in stages}
            if roles - set(ROLES):
                raise ValueError(f"placement ({device}): expected stages among {', '.join(STAGES)}, or {FUSED} "
                                 f"alone (got {stages!r})")
            if not fused_alone(roles):
                raise ValueError(f"placement ({device}): {FUSED_ALONE} (got {stages!r})")
            target[device] = combo_of(roles)
        plan = rebalance(Placement(current).diff(Placement(target)), workers)
        self.move(plan.switches, plan.starts, plan.stops)

    def _start_moves(self, moves: list[tuple[int, str]], starts: list[tuple[str, str]] = (), stops: list[int] = (),
                     *, reason: str, strict: bool = False) -> None:
        """Start these together, or none of them: moves (worker id, new stage), starts (device,
        stage: a new worker) and stops (worker ids). `strict`: raise why they cannot start (to
        the user who asked) rather than log it."""
        try:  # again: things may have changed since it was asked
            check_moves(self.workers, self.config, moves, starts, stops, self._lost_devices())
            new = self._new_workers(starts)  # their pools first: a full /dev/shm drops the whole batch
        except (ValueError, OSError) as e:
            if strict:
                raise
            log.info("moves %s, starts %s, stops %s dropped: %s", moves, starts, stops, e)
            return
        now = time.monotonic()
        for worker_id, stage in moves:
            worker = self.workers[worker_id]
            worker.moving_to, worker.switch_started = stage, now
            log.info("moving worker %d on %s from %s to %s (%s)", worker_id, worker.device, worker.stage, stage, reason)
            self._stats.moved(now, worker_id, worker.stage, stage, reason)
        for worker_id in stops:
            worker = self.workers[worker_id]
            worker.stopping = True
            log.info("stopping worker %d, %s on %s (%s)", worker_id, worker.stage, worker.device, reason)
            self._stats.moved(now, worker_id, worker.stage, IDLE, reason)
        for worker in new:
            log.info("starting worker %d, %s on %s (%s)", worker.id, worker.stage, worker.device, reason)
            self._stats.moved(now, worker.id, IDLE, worker.stage, reason)  # recorded before stats() can see it
            worker.switch_started = now
            self.workers[worker.id] = worker
            if self._device_leaving(worker.device):
                worker.waits_for_device = True  # _advance_moves starts it once they have exited
            else:
                self._start_new(worker)

    def _start_new(self, worker: Worker) -> None:
        worker.waits_for_device = False
        try:
            self._spawn(worker)
        except (OSError, zmq.ZMQError) as e:  # the machine refuses a process now: recovery tries again
            log.warning("could not start worker %d (%s); retrying", worker.id, e)
            worker.process, worker.respawn_at = None, time.monotonic() + 1.0

    def _device_leaving(self, device: str) -> bool:
        """Removed workers' processes on `device` have not exited yet: they still hold their
        weights there (a GPU must not hold two sets at once). Bounded: each exits or is killed
        within STOP_TIMEOUT_S. New and restarted workers wait only for these, never for workers
        still draining: a draining worker's outputs may wait for the new worker to read them."""
        return any(entry.device == device for entry in self._leaving)

    def _device_has_leavers(self, device: str) -> bool:
        """For a mover (a switch in place): also workers still draining on its device. A mover is
        never the reader a draining worker waits for (check_moves counts only staying ones)."""
        return self._device_leaving(device) or any(w.stopping and w.device == device for w in self.workers.values())

    def _new_workers(self, starts: list[tuple[str, str]]) -> list[Worker]:
        """Workers for `starts`, each with its output pool on the host, where any consumer can
        read it (a GPU consumer through its copy stream); not spawned yet. Ids are never reused:
        consumers know a pool by its name, which carries the id. All or none: OSError (a full
        /dev/shm) leaves no pool behind."""
        workers: list[Worker] = []
        try:
            for device, stage in starts:
                worker_id = self._next_worker_id
                self._next_worker_id += 1
                size, count = self.config.transport.slot_bytes, self.config.slots_per_worker(stage)
                if self._cluster is not None and self._cluster.is_remote(device):
                    # Its node's agent makes it when the worker starts (_ready_remote_pool): the
                    # core does not wait here for an agent that may still be starting.
                    pool = SlotPool(f"(pending w{worker_id})", size, count, served_at=PENDING)
                else:
                    pool = SlotPool.create_host(f"{self.segment_prefix}w{worker_id}", size, count)
                workers.append(Worker(worker_id, stage, device, pool, cpus=device_cpus(device)))
        except OSError:
            for worker in workers:
                self._unlink_pool(worker)
            raise
        return workers

    def _rebalance(self) -> None:
        """Ask the elastic policy for moves (it decides once per interval)."""
        workers = {w.id: (w.device, w.moving_to or w.stage) for w in self.workers.values() if not w.stopping}
        busy = collections.Counter(s for w in self.workers.values() if w.inflight for s in role_stages(w.stage))
        queues = {stage: len(q) for stage, q in self._queues.items()}
        plan = self._elastic.step(time.monotonic(), workers, queues, busy, self._lost_devices())
        if plan:
            self._start_moves(plan.switches, plan.starts, plan.stops, reason="elastic")

    def _advance_moves(self) -> None:
        """A drained mover switches stage in its own process (wire.Become): no process start, no
        imports, and it keeps its output pool. It takes work again when it says READY in its
        new stage.

        Drained means its tasks are done and downstream has read every output it produced: a
        slot still held there is a slot its new stage cannot write, and if the mover became the
        only worker of that stage, the request holding it could never run (no free output slot).
        A DiT worker becoming a decoder need not wait for its last outputs to be read: it will
        read them itself if no one else does, and the slot dispatch kept free
        (EngineConfig.move_reserve) is the one it writes to; its decoded pixels always leave
        for the engine. Two devices swapping dit and decoder need this: each worker is the only
        reader the other's outputs will have. Every other mover drains fully, and
        check_moves makes sure a reader of its outputs stays. A mover whose device has workers
        stopping in the same batch (E+D turning fused: E switches, D stops) waits for them to
        leave, so a GPU never holds the old and the new weights at once."""
        for worker in list(self.workers.values()):
            if worker.stopping and not worker.inflight and worker.pool.free == worker.pool.n_slots:
                self._remove_worker(worker)
                continue
            if worker.waits_for_device and not self._device_leaving(worker.device):
                self._start_new(worker)
                continue
            if worker.moving_to is None or not worker.ready or worker.inflight:
                continue
            if self._device_has_leavers(worker.device):
                continue  # its new weights load once the device's leaving workers have freed theirs
            drained = worker.pool.free == worker.pool.n_slots
            reads_its_own = (self.config.move_reserve and worker.pool.free >= self.config.move_reserve
                             and (worker.stage, worker.moving_to) == STAGES[-2:])
            if drained or reads_its_own:
                worker.stage, worker.moving_to, worker.ready = worker.moving_to, None, False
                worker.loading_since = time.monotonic()
                worker.task_s = None  # its speed at the old stage says nothing of the new one
                worker.pool_info = None
                self._send_control(worker, wire.Become(worker.stage))

    def _restart_stranded(self) -> None:
        """Requests waiting for a later stage that no worker serves or is coming to serve (the
        split pipeline gave way to fused workers) start over from the first stage, where a fused
        worker takes them; their upstream slots are released, so the leaving producers drain.
        Workers on a device lost with its node are not coming (until it is back)."""
        lost = self._lost_devices()
        staying = [w for w in self.workers.values() if not w.stopping and w.device not in lost]
        if not any((w.moving_to or w.stage) == FUSED for w in staying):
            return  # no fused worker to take them: they wait, or fail if none of their stage can come
        for stage in STAGES[1:]:
            queue = self._queues[stage]
            coming = [w for w in staying if (w.moving_to or w.stage) == stage]
            if queue and not coming:
                for request in queue.remove_where(lambda r: True):
                    log.info("request %d restarts: no %s worker is left to take it", request.id, stage)
                    self._start_over(request)

    def _remove_worker(self, worker: Worker) -> None:
        """A drained stopping worker leaves: its process stops, its socket, socket file and pool go."""
        del self.workers[worker.id]
        if worker.process is not None:  # it holds no task: the word on its death pipe ends it at once
            worker.process.send_stop()
            self._leaving.append(Leaving(worker.device, worker.process, time.monotonic() + STOP_TIMEOUT_S))
        if worker.socket is not None:
            endpoint = worker.socket.getsockopt_string(zmq.LAST_ENDPOINT)
            worker.socket.close(linger=0)
            unlink_ipc_file(endpoint)
        if not worker.pool.on_gpu:
            self._unlink_pool(worker)  # the pages go when the last process mapping them lets go
            for other in self.workers.values():
                self._send_control(other, wire.ClosePool(worker.pool.name))
        log.info("worker %d (%s on %s) stopped", worker.id, worker.stage, worker.device)
        self._layout_changed()

    def _layout_changed(self) -> None:
        """A move completed (a worker serves its new stage, or left): memory budgets follow the
        stages to their devices (a GPU that now holds more weights has less room for activations)."""
        if self.on_layout is not None:
            try:
                self.on_layout([(w.device, w.stage) for w in self.workers.values() if not w.stopping])
            except Exception:  # the old budgets stay: a measurement that failed must not stop the core
                log.exception("could not measure the memory budgets after a move")


    def _reap_leaving(self, closing: bool = False) -> None:
        """Reap the processes of removed workers that have exited; kill those still there past
        their deadline (or all, when the engine closes). Never waits: the core serves meanwhile.
        A killed one stays listed until it has exited (a remote kill is only asked for), or for
        one more STOP_TIMEOUT_S at most."""
        still = []
        for entry in self._leaving:
            if entry.process.exitcode is not None:
                entry.process.reaped()
                continue
            if (closing or time.monotonic() >= entry.deadline) and not entry.killed:
                entry.process.kill()  # a local one is reaped by it
                entry.killed, entry.deadline = True, time.monotonic() + STOP_TIMEOUT_S
                if entry.process.exitcode is not None:
                    continue
            if not closing and time.monotonic() < entry.deadline:
                still.append(entry)
            elif entry.killed and not closing:
                log.warning("a removed worker's process on %s did not exit after a kill", entry.device)
        self._leaving = still

    def _unlink_pool(self, worker: Worker) -> None:
        if worker.pool.served_at == PENDING:
            return
        if worker.pool.served_at is not None:
            self._cluster.remove_pool(worker.device, worker.pool.name)
        else:
            unlink_segment(worker.pool.name)


@dataclass
class Leaving:
    """A removed worker's process, told to stop, until it has exited (engine/moves.py _reap_leaving)."""

    device: str
    process: object  # launcher.WorkerProcess or cluster.RemoteWorkerProcess
    deadline: float  # monotonic: killed then (and dropped one STOP_TIMEOUT_S after the kill)
    killed: bool = False


IDLE = "idle"  # a move's stage when a worker starts or stops (stats().moves)
PENDING = "(pending)"  # the slot server of a pool its node's agent has not made yet
