"""A worker's side of the transport: the pools it reads and the pool it writes.

The worker loop never needs to know the link: `fetch` returns input tensors on the worker's
device (a view when the memory is already there, else a copy made on the copy stream), `writer`
places outputs in the reserved slot, `finish` makes the task's reads and writes complete
before the worker reports done (after which the engine may reuse both slots).

`prefetch` runs on the receiver thread as soon as a task arrives, so the next task's inputs
are mapped (CPU) or copied on the copy stream (GPU) while the current task computes. Inputs in
a pool on another node (a Ray cluster) are pulled from its slot server then (transport/tcp.py),
into host buffers this worker keeps: `release` gives a task's back once the task is over.
"""

from __future__ import annotations

import logging
import threading

import torch

from ..protocol import OutputSlot, PoolInfo, TensorRef
from .base import SlotWriter, byte_view, dtype_from_name, tensor_nbytes
from .shm import Segment
from .tcp import FrameSigner, ReceiveBuffers, SlotClient

log = logging.getLogger("dfuse.transport")
_MAX_CACHED_VIEWS = 1024
_MAX_HELD_TASKS = 64  # tasks whose received inputs wait for `release`; past that the oldest are forgotten


class Endpoint:
    def __init__(self, device: torch.device, secret: bytes | None = None):
        """`secret`: the engine's, for a worker on a cluster node: it signs reads of other nodes' pools."""
        self.device = device
        self.cuda = device.type == "cuda"
        self.copy_stream = torch.cuda.Stream(device) if self.cuda else None
        self._lock = threading.Lock()  # the receiver thread prefetches beside the compute loop
        self._host: dict[str, Segment] = {}
        self._pinned: set[str] = set()  # host pools page-locked for this GPU's copies (cudaHostRegister)
        self._gpu: dict[str, object] = {}  # OpenedCudaPool by name
        self._own_gpu = None  # CudaPool, when this worker's outputs stay on its GPU
        self._remote: dict[str, str] = {}  # pool name -> the slot server of its node (transport/tcp.py)
        self._secret = secret
        self._client: SlotClient | None = None  # made on first use: most workers never need one
        self._pull_lock = threading.Lock()  # the client's socket: one read at a time
        self._prefetched: dict[int, tuple[dict[str, torch.Tensor], object, list[torch.Tensor]]] = {}  # tensors, copy event, buffers
        self._received = ReceiveBuffers()
        self._running: dict[int, list[torch.Tensor]] = {}  # request id -> the buffers its remote inputs are in
        # Requests of one shape reuse the same (slot, shape, dtype) views over and over: caching
        # them keeps the hop to a dict lookup, which matters most when the producer's large
        # write has just evicted this process's code and data from the shared cache.
        self._views: dict[tuple, torch.Tensor] = {}

    # --- pools -----------------------------------------------------------------------------
    def create_gpu_pool(self, name: str, slot_bytes: int, n_slots: int) -> PoolInfo:
        from .cuda_ipc import CudaPool

        self._own_gpu = CudaPool(name, self.device, slot_bytes, n_slots)
        return self._own_gpu.export()

    def open_pool(self, info: PoolInfo) -> None:
        from .cuda_ipc import OpenedCudaPool

        with self._lock:
            self._gpu[info.name] = OpenedCudaPool(info)  # a restarted producer replaces its pool
            self._views.clear()

    def open_remote(self, name: str, address: str) -> None:
        """Read pool `name` from the slot server at `address` (it lives on another node)."""
        with self._lock:
            self._remote[name] = address

    def close_pool(self, name: str) -> None:
        """Forget a host pool whose producer stopped (no task reads it any more). A pinned one is
        unpinned first: its mapping goes, and a later pool mapped at the same address must not
        meet a stale registration (a copy could read the old pages)."""
        with self._lock:
            segment = self._host.pop(name, None)
            self._remote.pop(name, None)
            self._views = {key: view for key, view in self._views.items() if key[0] != name}
            if segment is not None and name in self._pinned:
                self._pinned.discard(name)
                self.copy_stream.synchronize()  # no copy from it is still in flight
                _unpin(segment)

    def _buffer(self, pool: str) -> torch.Tensor:
        if self._own_gpu is not None and pool == self._own_gpu.name:
            return self._own_gpu.buffer
        if pool in self._gpu:
            return self._gpu[pool].buffer
        segment = self._host.get(pool)
        if segment is None:
            segment = self._host[pool] = Segment(pool)
            if self.cuda and _pin(segment):
                self._pinned.add(pool)
        return segment.data

    def view(self, pool: str, offset: int, shape: tuple, dtype: torch.dtype) -> torch.Tensor:
        key = (pool, offset, shape, dtype)
        view = self._views.get(key)
        if view is None:
            if len(self._views) >= _MAX_CACHED_VIEWS:
                self._views.clear()
            view = self._views[key] = byte_view(self._buffer(pool), offset, shape, dtype)
        return view

    # --- inputs ----------------------------------------------------------------------------
    def prefetch(self, request_id: int, refs: list[TensorRef]) -> None:
        pulled, buffers = self._pull_remote(refs)  # outside the lock: the compute loop's fetch must not wait on the network
        with self._lock:
            self._prefetched[request_id] = self._load_holding(refs, pulled, buffers)

    def fetch(self, request_id: int, refs: list[TensorRef]) -> dict[str, torch.Tensor]:
        """The task's inputs; its buffers from other nodes are the running task's until `release`."""
        with self._lock:
            loaded = self._prefetched.pop(request_id, None)
        if loaded is None:  # its prefetch failed: once more, here, so the error goes with the task
            pulled, buffers = self._pull_remote(refs)
            with self._lock:
                loaded = self._load_holding(refs, pulled, buffers)
        tensors, copied, buffers = loaded
        if buffers:
            with self._lock:
                self._running.setdefault(request_id, []).extend(buffers)
                while len(self._running) > _MAX_HELD_TASKS:  # never released: left to the collector
                    del self._running[next(iter(self._running))]
        if copied is not None:
            torch.cuda.current_stream(self.device).wait_event(copied)
        return tensors

    def discard_prefetched(self, request_id: int) -> None:
        """A task that will not run (cancelled): forget what was prefetched for it."""
        with self._lock:
            loaded = self._prefetched.pop(request_id, None)
        for buffer in loaded[2] if loaded is not None else ():
            self._received.give(buffer)

    def release(self, request_id: int) -> None:
        """The running task (the compute loop runs one at a time) is over, done or failed, and
        nothing reads its inputs any more: the buffers they arrived in from other nodes serve
        later reads. Only what `fetch` handed to it: a second task of the same request (rerouted
        here while the first still ran) keeps what was prefetched for it."""
        with self._lock:
            held = self._running.pop(request_id, ())
        for buffer in held:
            self._received.give(buffer)

    def _load_holding(self, refs: list[TensorRef], pulled: dict[str, torch.Tensor], buffers: list[torch.Tensor]):
        """_load, and the buffers `pulled` lives in; those go back if it fails."""
        try:
            return (*self._load(refs, pulled), buffers)
        except BaseException:
            for buffer in buffers:
                self._received.give(buffer)
            raise

    def _load(self, refs: list[TensorRef], pulled: dict[str, torch.Tensor] | None = None):
        """The task's input tensors (and the copy event to wait for, on a GPU); `pulled`: those
        already read from other nodes' pools (_pull_remote)."""
        if pulled:
            local, copied = self._load([ref for ref in refs if ref.name not in pulled])
            return {**pulled, **local}, copied
        if not self.cuda:  # a CPU worker reads every pool in place: no device checks to make
            return {ref.name: self.view(ref.pool, ref.offset, tuple(ref.shape), dtype_from_name(ref.dtype))
                    for ref in refs}, None
        tensors, copied = {}, None
        for ref in refs:
            view = self.view(ref.pool, ref.offset, tuple(ref.shape), dtype_from_name(ref.dtype))
            producer_pool = self._gpu.get(ref.pool)
            if view.device == self.device:
                if producer_pool is not None:  # same GPU: read in place once the writes landed
                    producer_pool.wait_written(ref.offset, torch.cuda.current_stream(self.device))
                tensors[ref.name] = view
                continue
            # Another GPU (peer access) or host memory: copy on the copy stream.
            if producer_pool is not None:
                producer_pool.wait_written(ref.offset, self.copy_stream)
            with torch.cuda.stream(self.copy_stream):
                tensors[ref.name] = view.to(self.device, non_blocking=True)
            # Allocated on the copy stream, used on the compute stream: the allocator must not
            # hand its memory out again before the compute stream is done with it.
            tensors[ref.name].record_stream(torch.cuda.current_stream(self.device))
            copied = copied or torch.cuda.Event()
        if copied is not None:
            copied.record(self.copy_stream)
        return tensors, copied

    def _pull_remote(self, refs: list[TensorRef]) -> tuple[dict[str, torch.Tensor], list[torch.Tensor]]:
        """Read the inputs that live in other nodes' pools: each pool's part of the task in one
        read (a task's inputs share a slot), the tensors then viewed in what came (on a GPU,
        copied there, and the buffer kept for the next read at once). The tensors, and the
        buffers they are views of. Its own lock: the receiver and the compute loop may both read."""
        with self._lock:
            remote = [(ref, self._remote[ref.pool]) for ref in refs if ref.pool in self._remote]
        if not remote:
            return {}, []
        tensors: dict[str, torch.Tensor] = {}
        buffers: list[torch.Tensor] = []
        with self._pull_lock:
            if self._client is None:
                if self._secret is None:
                    raise RuntimeError("a pool on another node, but this worker has no cluster secret")
                self._client = SlotClient(FrameSigner(self._secret))
            try:
                for pool in dict.fromkeys(ref.pool for ref, _ in remote):
                    mine = [(ref, address) for ref, address in remote if ref.pool == pool]
                    start = min(ref.offset for ref, _ in mine)
                    end = max(ref.offset + tensor_nbytes(tuple(ref.shape), dtype_from_name(ref.dtype)) for ref, _ in mine)
                    buffers.append(self._received.take(end - start))
                    data = self._client.read(mine[0][1], pool, start, end - start, into=buffers[-1])
                    for ref, _ in mine:
                        view = byte_view(data, ref.offset - start, tuple(ref.shape), dtype_from_name(ref.dtype))
                        tensors[ref.name] = view.to(self.device) if self.cuda else view  # pageable: copied on return
            except BaseException:
                for buffer in buffers:  # nothing of them was handed out
                    self._received.give(buffer)
                raise
        if self.cuda:
            for buffer in buffers:
                self._received.give(buffer)
            buffers = []
        return tensors, buffers

    # --- outputs ---------------------------------------------------------------------------
    def writer(self, slot: OutputSlot) -> SlotWriter:
        return SlotWriter(self.view, slot)

    def finish(self, slot: OutputSlot) -> None:
        """The task's reads and writes are complete when this returns."""
        if not self.cuda:
            return
        if self._own_gpu is not None and slot.pool == self._own_gpu.name:
            # Outputs may have been written on the copy stream: the slot's event follows both.
            torch.cuda.current_stream(self.device).wait_stream(self.copy_stream)
            self._own_gpu.record_written(slot.offset)
        # Inputs must be read before StageDone lets the engine recycle their slot.
        torch.cuda.current_stream(self.device).synchronize()


def _pin(segment: Segment) -> bool:
    """Page-lock a host segment in this process so H2D/D2H copies can run asynchronously;
    whether it is."""
    cudart = torch.cuda.cudart()
    code = int(cudart.cudaHostRegister(segment.data.data_ptr(), segment.size, 0))
    if code != 0:
        log.warning("could not pin %s (cudaHostRegister: %s): copies use pageable memory",
                    segment.name, cudart.cudaGetErrorString(cudart.cudaError(code)))
        _clear_cuda_error()
    return code == 0


def _unpin(segment: Segment) -> None:
    cudart = torch.cuda.cudart()
    code = int(cudart.cudaHostUnregister(segment.data.data_ptr()))
    if code != 0:
        log.warning("could not unpin %s (cudaHostUnregister: %s)", segment.name,
                    cudart.cudaGetErrorString(cudart.cudaError(code)))
        _clear_cuda_error()


def _clear_cuda_error() -> None:
    """A failed CUDA runtime call leaves its error pending in this thread, and the next kernel
    launch would raise it against an innocent request. torch's launch check reads (and so
    clears) it: let it do so on a throwaway launch."""
    try:
        torch.zeros(1, device=torch.cuda.current_device())
    except RuntimeError:
        pass
