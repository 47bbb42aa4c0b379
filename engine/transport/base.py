"""Where each stage lives, which link joins two stages, and how tensors are packed in a slot.

Links, chosen once per stage pair at start-up (the same for every tensor of that pair):

    producer   consumer          link          pool memory        the consumer ...
    cpu        cpu               shm           /dev/shm segment   reads a view (zero copy)
    cpu|cuda   cpu|cuda (mixed)  shm           /dev/shm segment   the GPU side copies H2D / D2H
    cuda X     cuda X            cuda_ipc      producer's GPU     reads a view (zero copy)
    cuda X     cuda Y, P2P       cuda_p2p      producer's GPU     copies X->Y on a copy stream
    cuda X     cuda Y, no P2P    host_staged   /dev/shm, pinned   copies H2D on a copy stream

Under the elastic policy (EngineConfig.gpu_pools False) every GPU-to-GPU pair is host_staged:
outputs that stay in a producer's GPU memory could not outlive it or follow it to another stage.

GPUs are identified by UUID, not by index: an index means different GPUs in processes with
different CUDA_VISIBLE_DEVICES.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import numpy as np
import torch

from ..protocol import OutputSlot, TensorRef

ALIGN = 64  # every tensor in a slot starts on a 64-byte boundary (SIMD loads, cache lines)
GPU_LINKS = ("cuda_ipc", "cuda_p2p")


class SlotOverflowError(ValueError):
    """A stage's outputs do not fit the slot reserved for them."""


@dataclass(frozen=True)
class Place:
    """Where a stage runs: the device string of the config and, for a GPU, its UUID."""

    device: str  # "cpu" or "cuda:N"
    uuid: str | None = None

    @property
    def is_cuda(self) -> bool:
        return self.device.startswith("cuda")


PeerAccess = Callable[[Place, Place], bool]


def choose_link(producer: Place, consumer: Place, peer_access: PeerAccess) -> str:
    if not (producer.is_cuda and consumer.is_cuda):
        return "shm"
    if producer.uuid == consumer.uuid:
        return "cuda_ipc"
    return "cuda_p2p" if peer_access(producer, consumer) else "host_staged"


def pool_kind(links: Iterable[str]) -> str:
    """A producer's pool lives on its GPU only if every consumer can read GPU memory directly."""
    links = list(links)
    return "cuda" if links and all(link in GPU_LINKS for link in links) else "shm"


def probe_places(devices: Iterable[str]) -> dict[str, Place]:
    """Identify the devices the stages use; CUDA is only touched if a stage asked for it. Every
    CPU device ("cpu", a core set "cpu:0-3") is the host."""
    places = {}
    for device in set(devices):
        local = device.rpartition("/")[2]  # "a/cuda:0" on the engine's own node a is its cuda:0
        if local.startswith("cpu"):
            places[device] = Place("cpu")
        else:
            index = torch.device(local).index or 0
            places[device] = Place(f"cuda:{index}", str(torch.cuda.get_device_properties(index).uuid))
    return places


def cuda_peer_access(producer: Place, consumer: Place) -> bool:
    return torch.cuda.can_device_access_peer(torch.device(consumer.device).index or 0, torch.device(producer.device).index or 0)


def cuda_index_by_uuid(uuid: str) -> int:
    """This process's index of the GPU with `uuid` (indices differ between processes)."""
    for index in range(torch.cuda.device_count()):
        if str(torch.cuda.get_device_properties(index).uuid) == uuid:
            return index
    raise RuntimeError(f"GPU {uuid} is not visible in this process (check CUDA_VISIBLE_DEVICES)")


# --- packing tensors into a slot -----------------------------------------------------------------
def byte_view(buffer: torch.Tensor, offset: int, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """A typed view of `buffer` (a flat uint8 tensor) at `offset`."""
    nbytes = _numel(shape) * _itemsize(dtype)
    if offset < 0 or offset + nbytes > buffer.numel():
        raise ValueError(f"tensor [{offset}, {offset + nbytes}) lies outside its pool of {buffer.numel()} bytes")
    return buffer[offset : offset + nbytes].view(dtype).view(shape)


ViewFn = Callable[[str, int, tuple, torch.dtype], torch.Tensor]  # (pool, offset, shape, dtype) -> view


class SlotWriter:
    """Places a stage's outputs in its reserved slot; `empty` lets a stage produce in place."""

    def __init__(self, view: ViewFn, slot: OutputSlot):
        self.view = view
        self.slot = slot
        self.refs: list[TensorRef] = []
        self._cursor = 0

    def empty(self, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """A tensor that lives in the slot: whatever is written into it needs no further copy."""
        nbytes = _numel(shape) * _itemsize(dtype)
        if self._cursor + nbytes > self.slot.nbytes:
            raise SlotOverflowError(
                f"stage outputs need more than {(self._cursor + nbytes) / 2**20:.1f} MiB but a transport slot "
                f"holds {self.slot.nbytes / 2**20:.1f} MiB: start the engine with a larger transport slot_mib"
            )
        offset = self.slot.offset + self._cursor
        self._cursor += -(-nbytes // ALIGN) * ALIGN
        self.refs.append(TensorRef(name, self.slot.pool, offset, tuple(shape), dtype_name(dtype)))
        return self.view(self.slot.pool, offset, tuple(shape), dtype)

    def put(self, name: str, tensor: torch.Tensor) -> None:
        """Copy a finished tensor into the slot (a device-to-host copy when the pool is host memory)."""
        self.empty(name, tuple(tensor.shape), tensor.dtype).copy_(tensor)

    def put_all(self, tensors: Mapping[str, torch.Tensor]) -> list[TensorRef]:
        for name, tensor in tensors.items():
            if not any(ref.name == name for ref in self.refs):  # already produced in place
                self.put(name, tensor)
        return self.refs


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
    return dtype.itemsize


def tensor_nbytes(shape: tuple[int, ...], dtype: torch.dtype) -> int:
    return _numel(shape) * _itemsize(dtype)
