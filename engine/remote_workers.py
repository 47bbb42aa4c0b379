"""The engine core's side of workers on other nodes of a Ray cluster (engine/cluster.py): a mixin
of `EngineCore` (engine/core.py), on the core thread, using its `_cluster`, `workers`, `_context`,
`_poller` and `_send_control`.

- Workers there send to a results socket of their own, over TCP, every frame signed
  (transport/tcp.py FrameSigner); each binds its task socket on its node and says where in its
  READY, and the engine connects to exactly that address.
- Their pools are their node's agent's (engine/node_agent.py): a worker whose agent died gets a
  new pool from the new agent before it starts again.
- Pools cross nodes over TCP: every worker learns where other nodes' pools are served
  (wire.RemotePool); the engine serves its host's pools with a SlotServer of its own, and reads a
  remote decoder's pixels from its node's on the copy-out thread.
"""

from __future__ import annotations

import logging

import zmq

from . import protocol as wire
from .devices import is_cpu, split_node
from .state import Worker
from .transport.base import byte_view, tensor_nbytes
from .transport.tcp import FrameSigner, SlotClient, SlotServer

log = logging.getLogger("dfuse.engine")
worker_log = logging.getLogger("dfuse.worker")  # what workers on other nodes logged, forwarded

MAX_RESULT_FRAME_BYTES = 4 << 20  # a worker's message is a few KiB (refs, timings, warnings)


class RemoteWorkers:
    def _init_cluster_sockets(self) -> None:
        """Listen for workers on other nodes on the address the cluster knows this node by."""
        host = self._cluster.host
        self._remote_results = self._context.socket(zmq.PULL)
        self._remote_results.setsockopt(zmq.MAXMSGSIZE, MAX_RESULT_FRAME_BYTES)  # a stranger's huge frame: refused
        self._remote_results_address = f"tcp://{host}:{self._remote_results.bind_to_random_port(f'tcp://{host}')}"
        self._poller.register(self._remote_results, zmq.POLLIN)
        # One signer per thread and socket (transport/tcp.py): the slot server's, the copy-out's.
        self._slot_server = SlotServer(host, FrameSigner(self._cluster.secret), self._host_pool)
        self._remote_reader = SlotClient(FrameSigner(self._cluster.secret))  # the copy-out thread's only

    def _close_cluster(self) -> None:
        for name in ("_slot_server", "_remote_reader"):
            if hasattr(self, name):
                getattr(self, name).close()
        if hasattr(self, "_remote_results"):
            self._remote_results.close(linger=0)
        self._cluster.close()

    def _node_cpu_devices(self) -> dict[str, tuple[str, float]]:
        """(kind, memory GiB) of the node-named CPU devices, their node's memory as measured there
        (asked once per node)."""
        described, by_node = {}, {}
        for device in self.config.pool:
            node = split_node(device)[0]
            if node is not None and is_cpu(device):
                if node not in by_node:
                    by_node[node] = self._cluster.node_memory(device)
                if by_node[node] is not None:
                    described[device] = (self._devices[device][0], round(by_node[node]["total"] / 2**30, 1))
        return described

    def _on_worker_log(self, worker: Worker, message: wire.WorkerLog) -> None:
        """What a worker on another node logged (stages/log_forward.py), in the engine's log."""
        level = min(max(message.level, logging.WARNING), logging.CRITICAL)
        worker_log.log(level, "%s worker %d on %s: %s", worker.stage, worker.id, worker.device, message.text)

    def _lost_devices(self) -> frozenset[str]:
        """The engine's devices whose Ray node left the cluster (none on one host): no move goes
        there, and the elastic policy plans without them, until they are back."""
        return frozenset(self._cluster.lost_devices(self.config.pool)) if self._cluster is not None else frozenset()

    def _is_remote(self, worker: Worker) -> bool:
        return self._cluster is not None and self._cluster.is_remote(worker.device)

    def _ready_remote_pool(self, worker: Worker) -> None:
        """Before a worker on another node starts: its agent is up (AgentStarting, an OSError,
        while it starts: the start is tried again), and its pool is that agent's (a new agent,
        after one died, has none of the old one's)."""
        self._cluster.agent(worker.device, wait=False)
        if not self._cluster.owns_pool(worker.device, worker.pool.name):
            pool = worker.pool
            worker.pool = self._cluster.new_pool(worker.device, worker.id, pool.slot_bytes, pool.n_slots, wait=False)

    def _remote_ready(self, worker: Worker, message: wire.Ready) -> None:
        """What only a READY tells of a worker on another node (its pid, its task socket); and
        the pools of other nodes, both ways."""
        if self._is_remote(worker) and worker.process is not None:
            worker.process.pid = message.pid
            if message.task_address:  # a new process (a switch in place says READY without one)
                worker.socket.connect(message.task_address)
        self._announce_remote_pools(worker)

    def _announce_remote_pools(self, worker: Worker) -> None:
        """A worker that says READY learns where other nodes' pools are served, and the workers
        of other nodes learn where its pool is (a new worker brings a new pool). Announced to all,
        whatever their stage: a move may make any worker read any pool."""
        node = self._cluster.node_of(worker.device)
        for other in self.workers.values():
            if other is worker or self._cluster.node_of(other.device) == node or other.pool.on_gpu:
                continue
            self._send_control(worker, wire.RemotePool(other.pool.name, self._served_at(other)))
            if other.ready:
                self._send_control(other, wire.RemotePool(worker.pool.name, self._served_at(worker)))

    def _served_at(self, worker: Worker) -> str:
        return worker.pool.served_at or self._slot_server.address

    def _host_pool(self, name: str):
        """The memory of a pool on this host, for the slot server's thread. The core thread may
        change `workers` meanwhile: list() copies it in one step under the GIL."""
        for worker in list(self.workers.values()):
            if worker.pool.name == name and worker.pool.segment is not None:
                return worker.pool.segment.data
        return None

    def _remote_pixels(self, worker: Worker, ref: wire.TensorRef, dtype):
        """A function that reads the final pixels from a pool on another node (run by the
        copy-out thread, the only user of `_remote_reader`)."""
        address, nbytes = worker.pool.served_at, tensor_nbytes(tuple(ref.shape), dtype)
        return lambda: byte_view(self._remote_reader.read(address, ref.pool, ref.offset, nbytes), 0, ref.shape, dtype)
