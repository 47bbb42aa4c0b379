"""Slot credits: which output slots of a producer's pool are free, which request holds the others.

One bookkeeping for both kinds of pool: a host pool (a /dev/shm segment the engine creates, shm.py)
and a GPU pool (allocated and exported by its worker, cuda_ipc.py). A task is only dispatched when
its producer has a free slot, so memory never grows without bound.
"""

from __future__ import annotations

import errno
import logging
import os
from dataclasses import dataclass, field

from ..protocol import OutputSlot
from .shm import Segment
from .shm_files import SHM_DIR, ShmFull

log = logging.getLogger("dfuse.transport")


@dataclass
class SlotPool:
    """Engine-side credits for one producer's pool: which slots are free, which request holds
    the others. The memory itself is a host segment (`segment`) or the producer's GPU memory."""

    name: str
    slot_bytes: int
    n_slots: int
    segment: Segment | None = None  # host pools only: the engine creates (and unlinks) them
    served_at: str | None = None  # a host pool on another node: its agent's slot server (engine/cluster.py)
    holders: list[int | None] = field(init=False)  # request id holding each slot, or None

    def __post_init__(self) -> None:
        self.holders = [None] * self.n_slots

    @classmethod
    def create_host(cls, name: str, slot_bytes: int, n_slots: int) -> "SlotPool":
        size = slot_bytes * n_slots
        try:
            segment = Segment(name, size, create=True)
        except ShmFull as e:
            raise ShmFull(
                f"transport: cannot reserve {size / 2**20:.0f} MiB in {SHM_DIR} ({os.strerror(e.errno or errno.ENOSPC)}); "
                "lower transport.slot_mib or transport.slots_per_worker, or give the machine more shared memory",
                e.errno,
            ) from None
        return cls(name, slot_bytes, n_slots, segment)

    @property
    def on_gpu(self) -> bool:
        """Its memory is its producer's GPU (a CUDA IPC pool), not a host segment here or on another node."""
        return self.segment is None and self.served_at is None

    @property
    def free(self) -> int:
        return self.holders.count(None)

    def acquire(self, request_id: int) -> OutputSlot | None:
        """Reserve a free slot for `request_id`, or None when all are taken (back-pressure)."""
        for index, holder in enumerate(self.holders):
            if holder is None:
                self.holders[index] = request_id
                return OutputSlot(self.name, index * self.slot_bytes, self.slot_bytes)
        return None

    def release(self, offset: int, request_id: int) -> None:
        """Give back the slot `request_id` holds. A release by anyone else is a bug upstream:
        it is logged and refused rather than freeing a slot another request still reads."""
        index = offset // self.slot_bytes
        if self.holders[index] != request_id:
            log.error("refused release of slot %d of %s by request %s: held by %s", index, self.name,
                      request_id, self.holders[index])
            return
        self.holders[index] = None
