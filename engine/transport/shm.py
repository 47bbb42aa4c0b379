"""Shared-memory segments for tensor handoff between processes on one host.

Layout: every producing worker has one pool, cut into equal slots.

    pool dfuse_<engine pid>_<token>_w<worker id>
    +-----------+-----------+-----------+
    |  slot 0   |  slot 1   |  slot 2   |      each slot: tensors packed at 64-byte offsets
    +-----------+-----------+-----------+

A producer writes its outputs straight into the slot the engine reserved for its task; the
consumer maps the same pages and reads views (no copy, cost independent of size). Slots are
credits owned by the engine (see `SlotPool` in slots.py): a task is only dispatched when its producer has a
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

import logging
import mmap
import os

import numpy as np
import torch

from .shm_files import SHM_DIR, ShmFull, is_segment_name, unlink_segment

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


def _allocate(fd: int, name: str, size: int) -> None:
    """Reserve the pages now: ftruncate alone would succeed on a full /dev/shm and the first
    touch would kill the process with SIGBUS (e.g. Docker's default 64 MiB /dev/shm)."""
    try:
        os.posix_fallocate(fd, 0, size)
    except OSError as e:
        unlink_segment(name)  # the caller closes fd
        raise ShmFull(f"cannot reserve {size / 2**20:.0f} MiB in {SHM_DIR} for {name} ({e.strerror})", e.errno) from None
