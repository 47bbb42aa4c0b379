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
after the engine pid: the engine unlinks them on close, its workers unlink them when they see
the engine die, and a new engine sweeps those of dead engines at start-up. Files are created
0600: other local users cannot map them.
"""

from __future__ import annotations

import logging
import mmap
import os
import re
import secrets
from dataclasses import dataclass, field

import numpy as np
import torch

from ..protocol import OutputSlot

log = logging.getLogger("dfuse.transport")
SHM_DIR = "/dev/shm"
PREFIX = "dfuse_"
_PAGE = mmap.PAGESIZE
_NAME_RE = re.compile(rf"^{PREFIX}(\d+)_")


def new_segment_prefix() -> str:
    """A per-engine name prefix: the pid lets others sweep it, the token avoids collisions."""
    return f"{PREFIX}{os.getpid()}_{secrets.token_hex(4)}_"


def is_segment_name(name: str) -> bool:
    return name.startswith(PREFIX) and "/" not in name and name not in (".", "..")


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
        return cls(name, slot_bytes, n_slots, Segment(name, slot_bytes * n_slots, create=True))

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
        raise ValueError(
            f"transport: cannot reserve {size / 2**20:.0f} MiB in {SHM_DIR} ({e.strerror}); lower "
            "transport.slot_mib or transport.slots_per_worker, or give the machine more shared memory"
        ) from None


def unlink_segment(name: str) -> None:
    try:
        os.unlink(os.path.join(SHM_DIR, name))
    except FileNotFoundError:
        pass


def list_segments(prefix: str = PREFIX) -> list[str]:
    try:
        return sorted(n for n in os.listdir(SHM_DIR) if n.startswith(prefix))
    except FileNotFoundError:
        return []


def unlink_segments(prefix: str) -> None:
    for name in list_segments(prefix):
        unlink_segment(name)


def sweep_stale_segments() -> list[str]:
    """Unlink segments left by dfuse engines that no longer run (e.g. killed with SIGKILL)."""
    swept = []
    for name in list_segments():
        match = _NAME_RE.match(name)
        if match and not _pid_alive(int(match.group(1))):
            unlink_segment(name)
            swept.append(name)
    return swept


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
