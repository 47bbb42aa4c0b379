"""One frozen config tree for an engine; every field validated when it is built."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Mapping

from ..scheduler.core import STAGES
from .checks import check_fields, checked, flag, integer, number, optional, positive
from .cpu_affinity import usable_cpus
from .cpu_wake import MAX_US as MAX_WAKE_LATENCY_US
from .elastic import ElasticConfig

DEFAULT_MODEL = "tiny-sd3"
MAX_INSTANCES = 64
POLICIES = ("static", "elastic")


@dataclass(frozen=True)
class TransportConfig:
    """Shared-memory slots that carry tensors from one stage to the next."""

    slot_mib: int = field(default=16, metadata=checked(integer(1, 4096)))
    """Size of one slot in MiB; a stage's outputs for one request must fit (SD3 1024 px with CFG: ~11 MiB)."""
    slots_per_worker: int = field(default=3, metadata=checked(integer(1, 64)))
    """Slots in each producing worker's pool: how far a producer may run ahead of its consumer."""
    cpu_wake_latency_us: int | None = field(default=0, metadata=checked(optional(integer(0, MAX_WAKE_LATENCY_US))))
    """The longest wake-up the engine lets idle CPUs take while it runs (Linux CPU latency QoS,
    engine/cpu_wake.py). 0 keeps them polling instead of halting, so a stage that slept while its
    producer computed wakes at once (a hop after a long write: ~100 us faster on a VM). Costs power;
    needs write access to /dev/cpu_dma_latency (else ignored, logged). None: leave it to the OS."""

    def __post_init__(self):
        check_fields(self, "transport.")

    @property
    def slot_bytes(self) -> int:
        return self.slot_mib * 2**20


DEFAULT_MAX_BATCH = {"encoder": 8, "dit": 4, "decoder": 4}
MAX_BATCH = 64
_BATCH_SIZE = integer(1, MAX_BATCH)
_INSTANCES = integer(1, MAX_INSTANCES)
_GIB = positive(2**20, "a number of GiB")


@dataclass(frozen=True)
class BatchConfig:
    """Per-stage batching: a free worker takes several compatible queued requests as one call.

    Off by default: a batched call changes the last bits of the outputs on CPU (FACTS.md), and
    unbatched dfuse output equals diffusers' unbatched pipeline call bit for bit. When on, the
    encoder batches any prompts, the DiT requests of one shape, step count and guidance, the
    decoder latents of one shape under an activation-memory cap (engine/batching.py)."""

    enabled: bool = field(default=False, metadata=checked(flag()))
    """Turn batching on (False: every task carries one request, exactly as without this config)."""
    max_batch: Mapping[str, int] = field(default_factory=lambda: dict(DEFAULT_MAX_BATCH))
    """Most requests in one call, per stage (an int sets every stage). Each request keeps its own
    output slot, so a worker's pool gets at least max_batch + 1 slots when batching is on."""
    max_wait_ms: float = field(default=0.0, metadata=checked(number(0, 60_000)))
    """How long the head of a queue may wait for companions before a partial batch is sent to a
    free worker; 0 takes whatever is queued at once (no added latency at low load)."""
    max_batch_gib: float | None = field(default=None, metadata=checked(optional(_GIB)))
    """Estimated activation memory (the families' peak_bytes) one batch may use; None: the
    device's memory budget from memory admission. Binds mostly the decoder (grows with pixels)."""

    def __post_init__(self):
        check_fields(self, "batching.")
        sizes = _per_stage("batching.max_batch", self.max_batch, int, DEFAULT_MAX_BATCH)
        for stage, size in sizes.items():
            _BATCH_SIZE(f"batching.max_batch.{stage}", size)
        object.__setattr__(self, "max_batch", MappingProxyType(sizes))

    def batch_limit(self, stage: str) -> int:
        """Most requests per call in `stage` (1 when batching is off)."""
        return self.max_batch[stage] if self.enabled else 1


@dataclass(frozen=True)
class EngineConfig:
    """Everything an Engine needs to start its stage workers."""

    model: str = DEFAULT_MODEL
    """A built-in tiny model name (tiny-sd3) or the path of a local diffusers model folder."""
    devices: Mapping[str, str] = field(default_factory=lambda: {s: "cpu" for s in STAGES})
    """Device of each stage's instances: "cpu", "cuda" or "cuda:N"."""
    instances: Mapping[str, int] = field(default_factory=lambda: {s: 1 for s in STAGES})
    """Number of worker processes per stage."""
    cpu_threads: int | None = field(default=None, metadata=checked(optional(integer(1, 1024), mention=False)))
    """Torch threads per CPU worker; None divides the machine's cores among the CPU workers."""
    pin_cpu_workers: bool = field(default=True, metadata=checked(flag()))
    """Give each CPU worker cores of its own when all their threads fit in this process's cores
    (engine/cpu_affinity.py); when they do not, or with False, the OS places them."""
    dtype: str = "auto"
    """Weights and activations dtype: auto (float32 on CPU, bfloat16 on CUDA), float32, float16, bfloat16."""
    transport: TransportConfig = field(default_factory=TransportConfig)
    """Shared-memory handoff between stages."""
    memory_limit_gib: Mapping[str, float] = field(default_factory=dict)
    """Activation memory a request may use per device, e.g. {"cpu": 8}; unset devices: detected."""
    max_inflight_per_worker: int = field(default=2, metadata=checked(integer(1, 64)))
    """Tasks sent to one worker at once: one computing, the next already queued beside it."""
    max_attempts: int = field(default=3, metadata=checked(integer(1, 100)))
    """A request whose worker dies this many times fails instead of being retried again."""
    startup_timeout_s: float = field(default=600.0, metadata=checked(positive(1e6)))
    """How long to wait for all workers to load their weights and say READY."""
    policy: str = "static"
    """static: workers keep their stage. elastic: the engine moves workers between stages on one
    device as the workload's bottleneck moves (scheduler/controller.py on live statistics)."""
    elastic: ElasticConfig = field(default_factory=ElasticConfig)
    """How the elastic policy watches and decides (used with policy="elastic")."""
    batching: BatchConfig = field(default_factory=BatchConfig)
    """Per-stage batching of compatible requests (off by default)."""

    def __post_init__(self):
        if not isinstance(self.transport, TransportConfig):
            raise ValueError(f"transport: must be a TransportConfig (got {type(self.transport).__name__})")
        if not isinstance(self.model, (str, os.PathLike)) or not str(self.model):
            raise ValueError(f"model: expected a built-in name or a folder path, got {self.model!r}")
        object.__setattr__(self, "model", str(self.model))
        devices = _per_stage("device", self.devices, str)
        devices = {stage: check_device(f"device ({stage})", device) for stage, device in devices.items()}
        object.__setattr__(self, "devices", MappingProxyType(devices))
        instances = _per_stage("instances", self.instances, int)
        for stage, count in instances.items():
            _INSTANCES(f"instances.{stage}", count)
        object.__setattr__(self, "instances", MappingProxyType(instances))
        check_fields(self)
        if self.dtype not in ("auto", "float32", "float16", "bfloat16"):
            raise ValueError(f"dtype: must be one of auto, float32, float16, bfloat16 (got {self.dtype!r})")
        if not isinstance(self.memory_limit_gib, Mapping):
            raise ValueError(f"memory_limit_gib: expected a mapping of device -> GiB, got {self.memory_limit_gib!r}")
        limits = {_canonical_device(device): gib for device, gib in self.memory_limit_gib.items()}
        for device, gib in limits.items():
            if device not in self.devices.values():
                raise ValueError(f"memory_limit_gib: {device!r} is not a device of this engine ({sorted(set(self.devices.values()))})")
            _GIB(f"memory_limit_gib.{device}", gib)
        object.__setattr__(self, "memory_limit_gib", MappingProxyType(limits))
        if not isinstance(self.elastic, ElasticConfig):
            raise ValueError(f"elastic: must be an ElasticConfig (got {type(self.elastic).__name__})")
        if not isinstance(self.batching, BatchConfig):
            raise ValueError(f"batching: must be a BatchConfig (got {type(self.batching).__name__})")
        if self.policy not in POLICIES:
            raise ValueError(f"policy: must be one of {', '.join(POLICIES)} (got {self.policy!r})")

    def slots_per_worker(self, stage: str) -> int:
        """Output slots of a `stage` worker, at least transport.slots_per_worker:
        - a batch needs one per request, and one more lets the next batch start while
          downstream still reads the last one;
        - every task queued at a consumer holds its input slot until it is done, so a producer
          feeding N consumers needs N x max_inflight_per_worker + 1 not to stall on credits (one
          encoder feeding three DiTs with 3 slots served 36 of 50 req/s in `dfuse bench sweep`)."""
        # Under the elastic policy a worker may come to serve any stage of its device: its pool
        # (which stays through moves) is sized for the most demanding of them.
        stages = [stage]
        if self.policy == "elastic":
            stages = [s for s in STAGES if self.devices[s] == self.devices[stage]]
        needed = self.transport.slots_per_worker
        for s in stages:
            limit = self.batching.batch_limit(s)
            own = 1 if limit == 1 else limit + 1
            needed = max(needed, own, self.max_consumers(s) * self.max_inflight_per_worker + 1)
        return needed

    def max_consumers(self, stage: str) -> int:
        """How many workers may read a `stage` worker's outputs: the next stage's instances, or
        under the elastic policy every worker of its device that a move could turn into one
        (each other stage there keeps at least one)."""
        index = STAGES.index(stage)
        if index == len(STAGES) - 1:
            return 1  # the engine reads the final pixels
        consumer = STAGES[index + 1]
        if self.policy != "elastic":
            return self.instances[consumer]
        device = self.devices[consumer]
        sharing = [s for s in STAGES if self.devices[s] == device]
        return max(self.instances[consumer], sum(self.instances[s] for s in sharing) - (len(sharing) - 1))

    def threads_per_worker(self) -> int:
        if self.cpu_threads is not None:
            return self.cpu_threads
        cpu_workers = sum(n for s, n in self.instances.items() if self.devices[s] == "cpu")
        return max(1, len(usable_cpus()) // max(1, cpu_workers))

    def torch_dtype(self, device: str):
        import torch

        if self.dtype == "auto":
            return torch.float32 if device == "cpu" else torch.bfloat16
        return getattr(torch, self.dtype)


def parse_devices(text: str) -> str | dict[str, str]:
    """Parse the CLI form "cuda:0" (every stage) or "encoder=cpu,dit=cuda:0,decoder=cuda:0";
    EngineConfig checks the names and devices."""
    if "=" not in text:
        return text.strip()
    devices = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        stage, _, device = part.partition("=")
        devices[stage.strip()] = device.strip()
    return devices


def parse_instances(text: str) -> dict[str, int]:
    """Parse the CLI form "encoder=1,dit=2,decoder=1" (stages left out keep 1 instance)."""
    counts = {s: 1 for s in STAGES}
    for part in filter(None, (p.strip() for p in text.split(","))):
        stage, sep, value = part.partition("=")
        if not sep or stage.strip() not in STAGES or not value.strip().isdecimal():
            raise ValueError(
                f"instances: expected stage=count pairs like encoder=1,dit=2,decoder=1 with stages "
                f"{', '.join(STAGES)} (got {part!r})"
            )
        counts[stage.strip()] = int(value)
    return counts


def _per_stage(name: str, value, kind: type, defaults: Mapping | None = None) -> dict:
    """Accept one value for all stages or a mapping stage -> value (missing stages: default)."""
    if isinstance(value, kind) and not isinstance(value, bool):
        return {s: value for s in STAGES}
    if not isinstance(value, Mapping):
        raise ValueError(f"{name}: expected a {kind.__name__} or a mapping of stage -> {kind.__name__}, got {value!r}")
    unknown = set(value) - set(STAGES)
    if unknown:
        raise ValueError(f"{name}: unknown stage(s) {sorted(unknown)}; stages are {', '.join(STAGES)}")
    default = "cpu" if kind is str else 1
    return {s: value.get(s, defaults[s] if defaults else default) for s in STAGES}


def _canonical_device(device):
    """'cuda' means the first GPU, as in torch; spelled out, so that every process, every
    comparison of two stages' devices and `torch.cuda.set_device` see one name for it."""
    return "cuda:0" if device == "cuda" else device


def check_device(name: str, device: str) -> str:
    """The device, checked and in its canonical form."""
    if not isinstance(device, str):
        raise ValueError(f"{name}: must be 'cpu', 'cuda' or 'cuda:N' (got {device!r})")
    if device == "cpu":
        return device
    kind, _, index = device.partition(":")
    if kind != "cuda" or (index and not index.isdecimal()):
        raise ValueError(f"{name}: must be 'cpu', 'cuda' or 'cuda:N' (got {device!r})")
    import torch

    count = torch.cuda.device_count()
    if count == 0 or int(index or 0) >= count:
        available = ", ".join(["cpu"] + [f"cuda:{i}" for i in range(count)])
        raise ValueError(f"{name}: {device!r} is not available here; available devices: {available}")
    return _canonical_device(device)
