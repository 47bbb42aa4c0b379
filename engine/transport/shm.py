"""Shared-memory segments for tensor handoff between processes on one host, and slot credits.

Layout: every producing worker has one pool, cut into equal slots.

    pool dfuse_<engine pid>_<token>_w<worker id>
    +-----------+-----------+-----------+
    |  slot 0   |  slot 1   |  slot 2   |      each slot: tensors packed at 64-byte offsets
    +-----------+-----------+-----------+

A producer writes its outputs straight into the slot the engine reserved for its task; the
consumer maps the same pages and reads views (no copy, cost independent of size). Slots are
credits owned by the engine (see `SlotPool`): a task is only dispatched when its producer has a
free slot, so memory never grows without bound.

Host pools are /dev/shm files created by the engine. We map them directly instead of using
`multiprocessing.shared_memory`: its resource tracker unlinks segments behind our back (Python
3.11 registers attachers too) and is itself killed in a group kill. Instead, segments are named
after the engine (`dfuse_<engine pid>_<token>_`): the engine unlinks them on close, its workers
unlink them when they see the engine die, its janitor (janitor.py, a process in a session of
its own) when the engine and its workers die together (a group SIGKILL or SIGTERM), and a new
engine sweeps those of dead engines at start-up. An engine is alive while it holds the flock on
its lock file `<prefix>lock` (shm_files.py), which holds across PID namespaces. Files are
created 0600: other local users cannot map them.
"""

from __future__ import annotations

import errno
import logging
import mmap
import os
from dataclasses import dataclass, field

import numpy as np
import torch

from ..protocol import OutputSlot
from .shm_files import SHM_DIR, ShmFull, is_segment_name, unlink_segment
from .shm_files import list_segments, new_segment_prefix  # noqa: F401  (for bench/ until its imports move to shm_files)

log = logging.getLogger("dfuse.transport")
_PAGE = mmap.PAGESIZE


class Segment:
    """A shared-memory file mapped into this process, exposed as one flat uint8 tensor."""

    def __init__(self, name: str, size: int | None = None, *, create: bool = False):
        if not is_segment_name(name):
            raise ValueError(f"not a dfuse segment name: {name!r}")
        self.name = name
        path = os.path.join(SHM_DIR, name)
        flags = os.O_RDWR | (os.O_CREAT | os.O_EXCL if create else 0)
        fd = os.open(path, flags, 0o600)
        try:
            if create:
                _allocate(fd, name, size)
            self.size = os.fstat(fd).st_size
            self._mmap = mmap.mmap(fd, self.size)
        finally:
            os.close(fd)  # the mapping keeps the pages alive
        # from_numpy(frombuffer) pins the mmap: closing it while a view lives raises instead of
        # segfaulting (torch.frombuffer does not pin).
        self.data = torch.from_numpy(np.frombuffer(self._mmap, dtype=np.uint8))
        # Touch every page now: first-touch faults cost 2.5-3x a copy on the hot path. The
        # creator writes (allocates the pages), an attacher only reads (maps them).
        if create:
            self.data[::_PAGE].zero_()
        elif self.size:
            self.data[::_PAGE].sum()


@dataclass
class SlotPool:
    """Engine-side credits for one producer's pool: which slots are free, which request holds
    the others. The memory itself is a host segment (`segment`) or the producer's GPU memory."""

    name: str
    slot_bytes: int
    n_slots: int
    segment: Segment | None = None  # host pools only: the engine creates (and unlinks) them
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


def _allocate(fd: int, name: str, size: int) -> None:
    """Reserve the pages now: ftruncate alone would succeed on a full /dev/shm and the first
    touch would kill the process with SIGBUS (e.g. Docker's default 64 MiB /dev/shm)."""
    try:
        os.posix_fallocate(fd, 0, size)
    except OSError as e:
        unlink_segment(name)  # the caller closes fd
        raise ShmFull(f"cannot reserve {size / 2**20:.0f} MiB in {SHM_DIR} for {name} ({e.strerror})", e.errno) from None
