"""GPU slot pools shared between processes with CUDA IPC.

A producer on a GPU allocates its whole pool once and exports it once (one IPC memory handle
plus one interprocess event per slot). Consumers open the handle once per process and read
views of it: per-tensor exports would pin caching-allocator blocks and leak into the IPC limbo
until `torch.cuda.ipc_collect()` (FACTS.md, CUDA IPC practice).

Ordering, per slot:
    producer: write slot k on its compute stream -> record event[k] -> StageDone
    consumer: stream.wait_event(event[k]) unless it has completed -> read (view, or copy on
              its copy stream) -> synchronize -> StageDone, and only then may the engine hand
              slot k out again.
"""

from __future__ import annotations

import torch

from ..protocol import CudaIpcHandle, PoolInfo
from .base import cuda_index_by_uuid


class CudaPool:
    """The producer's side: memory and events it owns and keeps alive while the worker runs."""

    def __init__(self, name: str, device: torch.device, slot_bytes: int, n_slots: int):
        self.name = name
        self.device = device
        self.slot_bytes = slot_bytes
        self.buffer = torch.empty(slot_bytes * n_slots, dtype=torch.uint8, device=device)
        self.events = [torch.cuda.Event(interprocess=True) for _ in range(n_slots)]
        for event in self.events:
            event.record(torch.cuda.current_stream(device))  # an IPC handle needs a recorded event

    def export(self) -> PoolInfo:
        fields = self.buffer.untyped_storage()._share_cuda_()
        (device_index, handle, size, offset, ref_handle, ref_offset, event_handle, event_sync) = fields
        memory = CudaIpcHandle(device_index, handle, size, offset, ref_handle, ref_offset, event_handle, event_sync)
        uuid = str(torch.cuda.get_device_properties(self.device).uuid)
        return PoolInfo(self.name, uuid, self.slot_bytes, len(self.events), memory, [e.ipc_handle() for e in self.events])

    def record_written(self, offset: int) -> None:
        self.events[offset // self.slot_bytes].record(torch.cuda.current_stream(self.device))


class OpenedCudaPool:
    """A consumer's mapping of a producer's pool (opened once per process)."""

    def __init__(self, info: PoolInfo):
        self.info = info
        index = cuda_index_by_uuid(info.device_uuid)
        self.device = torch.device("cuda", index)
        m = info.memory
        with torch.cuda.device(index):
            storage = torch.UntypedStorage._new_shared_cuda(
                index, m.handle, m.size, m.offset, m.ref_counter_handle, m.ref_counter_offset,
                m.event_handle, m.event_sync_required,
            )
            self.buffer = torch.empty(0, dtype=torch.uint8, device=self.device).set_(storage)
            self.events = [torch.cuda.Event.from_ipc_handle(self.device, h) for h in info.slot_events]

    def wait_written(self, offset: int, stream: torch.cuda.Stream) -> None:
        event = self.events[offset // self.info.slot_bytes]
        # Producers synchronize before reporting, so the event has nearly always completed. Asking
        # is cheap; waiting on an interprocess event made the consumer's next synchronize cost
        # about half a whole hop more on an H100 (bench/results/README.md, handoff on a GPU).
        if not event.query():
            stream.wait_event(event)
