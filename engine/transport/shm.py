"""Shared-memory segments and slots for CPU tensor handoff between processes on one host.

Layout: the engine creates one segment per producing worker, cut into equal slots.

    segment dfuse_<engine pid>_<token>_w<worker id>
    +-----------+-----------+-----------+
    |  slot 0   |  slot 1   |  slot 2   |      each slot: tensors packed at 64-byte offsets
    +-----------+-----------+-----------+

A producer writes its outputs straight into the slot the engine reserved for its task; the
consumer maps the same pages and reads views (no copy, cost independent of size). Slots are
credits owned by the engine (see `SlotPool`): a task is only dispatched when its producer has a
free slot, so memory never grows without bound.

We map /dev/shm files directly instead of `multiprocessing.shared_memory`: its resource tracker
unlinks segments behind our back (Python 3.11 registers attachers too) and is itself killed in a
group kill. Instead, segments are named after the engine pid: the engine unlinks them on close,
its workers unlink them when they see the engine die, and a new engine sweeps those of dead
engines at start-up. Files are created 0600: other local users cannot map them.
"""

from __future__ import annotations

import mmap
import os
import re
import secrets
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import numpy as np
import torch

from ..protocol import OutputSlot, TensorRef

SHM_DIR = "/dev/shm"
PREFIX = "dfuse_"
ALIGN = 64
_PAGE = mmap.PAGESIZE
_NAME_RE = re.compile(rf"^{PREFIX}(\d+)_")


class SlotOverflowError(ValueError):
    """A stage's outputs do not fit the slot reserved for them."""


def new_segment_prefix() -> str:
    """A per-engine name prefix: the pid lets others sweep it, the token avoids collisions."""
    return f"{PREFIX}{os.getpid()}_{secrets.token_hex(4)}_"


class Segment:
    """A shared-memory file mapped into this process, exposed as one flat uint8 tensor."""

    def __init__(self, name: str, size: int | None = None, *, create: bool = False):
        self.name = name
        path = os.path.join(SHM_DIR, name)
        flags = os.O_RDWR | (os.O_CREAT | os.O_EXCL if create else 0)
        fd = os.open(path, flags, 0o600)
        try:
            if create:
                os.ftruncate(fd, size)
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

    def view(self, offset: int, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        nbytes = _numel(shape) * _itemsize(dtype)
        if offset < 0 or offset + nbytes > self.size:
            raise ValueError(f"tensor [{offset}, {offset + nbytes}) outside segment {self.name}")
        return self.data[offset : offset + nbytes].view(dtype).view(shape)

    def unlink(self) -> None:
        unlink_segment(self.name)


class SegmentCache:
    """Segments a worker has attached, by name: each is mapped once per process."""

    def __init__(self) -> None:
        self._segments: dict[str, Segment] = {}

    def get(self, name: str) -> Segment:
        segment = self._segments.get(name)
        if segment is None:
            if not name.startswith(PREFIX) or "/" in name:
                raise ValueError(f"not a dfuse segment name: {name!r}")
            segment = self._segments[name] = Segment(name)
        return segment


def write_tensors(segment: Segment, slot: OutputSlot, tensors: Mapping[str, torch.Tensor]) -> list[TensorRef]:
    """Copy `tensors` into `slot` (packed, 64-byte aligned) and return refs to them."""
    refs, cursor = [], 0
    for name, tensor in tensors.items():
        nbytes = tensor.numel() * tensor.element_size()
        if cursor + nbytes > slot.nbytes:
            need = sum(t.numel() * t.element_size() + ALIGN for t in tensors.values())
            raise SlotOverflowError(
                f"stage outputs need about {need / 2**20:.1f} MiB but a transport slot holds "
                f"{slot.nbytes / 2**20:.1f} MiB: start the engine with a larger slot_mib"
            )
        offset = slot.offset + cursor
        segment.view(offset, tuple(tensor.shape), tensor.dtype).copy_(tensor)
        refs.append(TensorRef(name, segment.name, offset, tuple(tensor.shape), dtype_name(tensor.dtype)))
        cursor += -(-nbytes // ALIGN) * ALIGN
    return refs


def read_tensors(refs: Iterable[TensorRef], segments: SegmentCache) -> dict[str, torch.Tensor]:
    """Views of the referenced tensors (valid until the engine hands their slot to another task)."""
    return {r.name: segments.get(r.segment).view(r.offset, r.shape, dtype_from_name(r.dtype)) for r in refs}


@dataclass
class SlotPool:
    """Engine-side credits for one segment: which slots are free, which task holds the others."""

    segment: Segment
    slot_bytes: int
    holders: list[int | None] = field(init=False)  # request id holding each slot, or None

    def __post_init__(self) -> None:
        self.holders = [None] * (self.segment.size // self.slot_bytes)

    @classmethod
    def create(cls, name: str, slot_bytes: int, n_slots: int) -> "SlotPool":
        return cls(Segment(name, slot_bytes * n_slots, create=True), slot_bytes)

    @property
    def free(self) -> int:
        return self.holders.count(None)

    def acquire(self, request_id: int) -> OutputSlot | None:
        """Reserve a free slot for `request_id`, or None when all are taken (back-pressure)."""
        for index, holder in enumerate(self.holders):
            if holder is None:
                self.holders[index] = request_id
                return OutputSlot(self.segment.name, index * self.slot_bytes, self.slot_bytes)
        return None

    def release(self, offset: int) -> None:
        self.holders[offset // self.slot_bytes] = None

    def release_request(self, request_id: int) -> None:
        """Free whatever `request_id` holds here (its task failed or was dropped)."""
        self.holders = [None if h == request_id else h for h in self.holders]


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


_DTYPES = {str(d).removeprefix("torch."): d for d in (
    torch.float32, torch.float16, torch.bfloat16, torch.float64,
    torch.uint8, torch.int8, torch.int32, torch.int64, torch.bool,
)}


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def dtype_from_name(name: str) -> torch.dtype:
    try:
        return _DTYPES[name]
    except KeyError:
        raise ValueError(f"unsupported tensor dtype {name!r}; allowed: {sorted(_DTYPES)}") from None


def _numel(shape: tuple[int, ...]) -> int:
    return int(np.prod(shape, dtype=np.int64)) if shape else 1


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()
