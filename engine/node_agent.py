"""The engine's hands on another node of a Ray cluster: one Ray actor per (engine, node).

It owns on its node what the engine owns on its own host (engine/host_resources.py: a run dir,
a segment prefix with its liveness lock, a janitor), creates the output pools of the node's
workers there, serves them to other nodes over TCP (transport/tcp.py SlotServer), and starts the
node's stage workers with the same launcher as on one host: `spawn_worker`, so the worker loop,
its death pipe and its clean-up are the same code. The agent holds the death pipes: when the
engine goes, Ray kills its actors, the pipes close and the workers exit. When an actor's process
ends, Ray also SIGKILLs its children (the workers): nobody would clean up after them, so the
agent's janitor is not its child (Janitor.start detached) and removes what they left in /dev/shm.
(With Ray's RAY_kill_child_processes_on_worker_exit_with_raylet_subreaper set, the raylet adopts
and kills it too: then the next agent or engine on the node sweeps what was left.)

A worker's pool belongs to the agent, not to the worker: outputs a worker wrote stay readable
after it dies, as a host pool the engine owns does on one host. Kept free of Ray imports: the
engine wraps this class as an actor (engine/cluster.py).
"""

from __future__ import annotations

import logging
import os
import threading

import msgspec

from .cpu_affinity import usable_cpus
from .devices import gpu_totals
from .host_resources import HostResources
from .launcher import WorkerProcess, spawn_worker, stop_all
from .protocol import decode_spec, encode_spec
from .transport.slots import SlotPool
from .transport.tcp import FrameSigner, SlotServer

log = logging.getLogger("dfuse.node")


class NodeAgent:
    def __init__(self, secret: bytes, host: str):
        """`host`: this node's address as the cluster knows it; the slot server listens only there."""
        self._resources = HostResources(detached_janitor=True)  # Ray kills an actor's children with it
        self._pools: dict[str, SlotPool] = {}
        self._workers: dict[int, WorkerProcess] = {}
        self._lock = threading.Lock()  # the actor runs its calls on several threads
        self._gpus: dict[str, int] | None = None  # each GPU's total bytes, once told
        self._gpu_lock = threading.Lock()
        self._server = SlotServer(host, FrameSigner(secret), self._buffer)

    def info(self) -> dict:
        return {"pid": os.getpid(), "slot_server": self._server.address,
                "segment_prefix": self._resources.segment_prefix}

    def memory(self, gpus: bool = False) -> dict:
        """This node's host memory: {"total": bytes, "available": bytes} (admission.host_memory);
        `gpus`: with "gpus": {"cuda:0": total bytes, ...} (measured once: it takes a child process)."""
        from .admission import host_memory

        report: dict = dict(host_memory())
        if gpus:
            with self._gpu_lock:  # not self._lock: pools and workers must not wait on a child process
                if self._gpus is None:
                    self._gpus = gpu_totals()
            report["gpus"] = self._gpus or {}
        return report

    def _buffer(self, name: str):
        pool = self._pools.get(name)
        return None if pool is None else pool.segment.data

    def create_pool(self, worker_id: int, slot_bytes: int, n_slots: int) -> str:
        """A host pool for a worker of this node (its outputs); returns its name."""
        name = f"{self._resources.segment_prefix}w{worker_id}"
        with self._lock:
            if name not in self._pools:
                self._pools[name] = SlotPool.create_host(name, slot_bytes, n_slots)
        return name

    def remove_pool(self, name: str) -> None:
        from .transport.shm_files import unlink_segment

        with self._lock:
            if self._pools.pop(name, None) is not None:
                unlink_segment(name)

    def run(self, spec: bytes) -> int:
        """Start a worker from its spec (engine/protocol.py WorkerSpec, JSON) and wait for it to
        exit: returns its exit code (-N: signal N), which is how the engine learns of a death."""
        spec = msgspec.structs.replace(sized_for_this_node(decode_spec(spec)), engine_pid=os.getpid(),
                                       run_dir=self._resources.run_dir, segment_prefix=self._resources.segment_prefix)
        process = spawn_worker(spec, self._resources.janitor)
        with self._lock:
            self._workers[spec.worker_id] = process
        code = process.process.wait()
        process.reaped()
        with self._lock:
            if self._workers.get(spec.worker_id) is process:
                del self._workers[spec.worker_id]
        return code

    def stop(self, worker_id: int) -> None:
        """Stop a worker on purpose (it exits at once, as on one host)."""
        with self._lock:
            process = self._workers.get(worker_id)
        if process is not None:
            stop_all([process])

    def kill(self, worker_id: int) -> None:
        with self._lock:
            process = self._workers.get(worker_id)
        if process is not None and process.alive:
            process.process.kill()

    def shutdown(self) -> None:
        """Stop every worker, then give back the pools, the run dir and the janitor."""
        with self._lock:
            processes = list(self._workers.values())
        stop_all(processes)
        self._server.close()
        self._resources.release()


def sized_for_this_node(spec, cpus: int | None = None):
    """A worker on this node's whole host (`cpu_share` set by the engine): its torch threads are
    this node's usable cores divided among the workers sharing them."""
    if not spec.cpu_share:
        return spec
    cpus = len(usable_cpus()) if cpus is None else cpus
    return msgspec.structs.replace(spec, cpu_threads=max(1, cpus // spec.cpu_share))


def encoded(spec) -> bytes:
    """A WorkerSpec as the agent takes it (JSON bytes: no pickle of our types through Ray)."""
    return encode_spec(spec)
