"""Starting a worker's process, as the engine core does it: a mixin of `EngineCore`
(engine/core.py), on the core thread, using its `config`, `_context`, `_host` and `_cluster`.

Each process of a worker (a generation) gets a fresh task socket, so frames queued for a dead
one die with its socket; a worker on another node binds its own and says where in its READY.
"""

from __future__ import annotations

import os
import time

import zmq

from .launcher import spawn_worker
from .protocol import WorkerSpec
from .recovery import unlink_ipc_file
from .state import Worker
from .transport.tcp import FrameSigner


class WorkerSpawn:
    def _spawn(self, worker: Worker) -> None:
        remote = self._is_remote(worker)
        if remote:
            self._ready_remote_pool(worker)  # OSError (retried later) while its node's agent starts
        worker.generation += 1
        worker.outbox.clear()  # meant for the previous process; the new one is told at its READY
        # A fresh endpoint per generation: frames queued for a dead worker die with its socket.
        socket = self._context.socket(zmq.PUSH)
        socket.setsockopt(zmq.LINGER, 0)
        if remote:  # it binds on its node and says where in its READY (stages/worker.py)
            endpoint = f"tcp://{self._cluster.node_address(worker.device)}"
            worker.signer = FrameSigner(self._cluster.secret)  # a session of its own, for this process only
        else:
            endpoint = self._host.endpoint(f"w{worker.id}.{worker.generation}")
            socket.bind(endpoint)
        worker.socket = socket
        spec = WorkerSpec(
            worker_id=worker.id, stage=worker.stage, model_path=str(self.model_path), device=worker.device,
            dtype=str(self.config.torch_dtype(worker.device)).removeprefix("torch."),
            cpu_threads=self.config.threads_per_worker(worker.device), task_endpoint=endpoint,
            result_endpoint=self._remote_results_address if remote else self._host.endpoint("results"),
            engine_pid=os.getpid(),
            segment_prefix=self.segment_prefix, run_dir=self.run_dir,
            gpu_pool=None if not worker.pool.on_gpu else (worker.pool.name, worker.pool.slot_bytes, worker.pool.n_slots),
            cpus=worker.cpus, variant=self.config.variant, generation=worker.generation,
            task_session=worker.signer.session.hex() if remote else None, secret=self._cluster.secret.hex() if self._cluster else None,
            cpu_share=self.config.remote_cpu_share(worker.device, sum(
                w.device == worker.device and not w.stopping for w in self.workers.values())),
        )
        try:
            launch = self._launch or spawn_worker  # looked up now: tests may replace it on a running engine
            worker.process = self._cluster.spawn(worker.device, spec) if remote else launch(spec, self._host.janitor)
            worker.loading_since = time.monotonic()
        except OSError:  # no process: the socket bound for it must not stay (nor its file)
            worker.socket = None
            socket.close()
            unlink_ipc_file(endpoint)
            raise
