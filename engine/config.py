"""One frozen config tree for an engine; every field validated when it is built."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Mapping, Sequence

from ..scheduler.core import FUSED, STAGES
from .checks import check_fields, checked, flag, integer, number, optional, positive
from .cpu_affinity import usable_cpus
from .cpu_wake import MAX_US as MAX_WAKE_LATENCY_US
from .devices import canonical_device, check_disjoint, device_cpus, is_cpu, place_workers, split_node
from .elastic import ElasticConfig

DEFAULT_MODEL = "tiny-sd3"
MAX_INSTANCES = 64
POLICIES = ("static", "elastic")
DISPATCH_RULES = ("earliest-finish", "fewest-in-flight")


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
    producer computed wakes at once (what a hop saves: bench/results/README.md, handoff). Costs power;
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
    """A built-in tiny model name (tiny-sd3), the path of a local diffusers model folder, or a
    Hugging Face repo id (owner/name: its snapshot in the HF cache, downloaded where missing)."""
    revision: str | None = None
    """The hub revision (branch, tag or commit) of a repo id `model`; None: its default branch."""
    variant: str | None = None
    """The weight files to load, as diffusers' `variant` (fp16: model.fp16.safetensors); None: the plain ones."""
    devices: Mapping[str, str] | Sequence[str] | str = field(default_factory=lambda: {s: "cpu" for s in STAGES})
    """Either the device of each stage's instances ("cpu", "cuda:N", or a mapping stage -> device),
    or, with `placement`, the pool of devices (a list: "cuda:N", "cpu", core sets "cpu:A-B"; see
    engine/devices.py)."""
    instances: Mapping[str, int] = field(default_factory=lambda: {s: 1 for s in STAGES})
    """Number of worker processes per stage (without a placement)."""
    placement: Mapping[str, Sequence[str]] | str | None = None
    """Which stages each device hosts, one worker per (device, stage): {"cpu:0": ["encoder",
    "decoder"], "cpu:1": ["dit"]}. Its devices must be in `devices` when that is a list (default:
    the placement's own devices). "auto" (the default with a list of `devices`): the planner's
    choice, made by the Engine once it knows the model (engine/auto_placement.py); until then
    the config has no workers."""
    workers: tuple[tuple[str, str], ...] = field(init=False, repr=False)
    """(device, stage) of every worker, by stage in pipeline order: derived from the above."""
    cpu_threads: int | None = field(default=None, metadata=checked(optional(integer(1, 1024), mention=False)))
    """Torch threads per CPU worker; None divides the machine's cores among the CPU workers."""
    pin_cpu_workers: bool = field(default=True, metadata=checked(flag()))
    """Give each CPU worker cores of its own when all their threads fit in this process's cores
    (engine/cpu_affinity.py); when they do not, or with False, the OS places them."""
    dtype: str = "auto"
    """Weights and activations dtype: auto (float32 on CPU, bfloat16 on CUDA), float32, float16, bfloat16."""
    transport: TransportConfig = field(default_factory=TransportConfig)
    """Shared-memory handoff between stages."""
    memory_limit_gib: Mapping[str, float] | float = field(default_factory=dict)
    """Activation memory a request may use per device, e.g. {"cpu": 8}, or one number for each
    device's memory; unset devices: detected. Kept as the mapping."""
    max_inflight_per_worker: int = field(default=2, metadata=checked(integer(1, 64)))
    """Tasks sent to one worker at once: one computing, the next already queued beside it (a
    fused worker gets one at a time: engine/task_dispatch.py)."""
    max_attempts: int = field(default=3, metadata=checked(integer(1, 100)))
    """A request whose worker dies this many times fails instead of being retried again."""
    heartbeat_timeout_s: float = field(default=10.0, metadata=checked(positive(3600)))
    """A ready worker not heard from for this long (SIGSTOPped, a stuck kernel) is replaced and its
    tasks re-queued; silent for 3 heartbeats (3 s) it already gets no new tasks."""
    compute_stall_s: float = field(default=600.0, metadata=checked(positive(1e6)))
    """A worker whose compute makes no progress (no denoising step, no finished task) for this long,
    and for 10x its usual task time, is replaced; the request it held is charged an attempt."""
    startup_timeout_s: float = field(default=600.0, metadata=checked(positive(1e6)))
    """How long to wait for all workers to load their weights and say READY; later, how long a
    replacement or a worker switching stage may load before it is killed and started again."""
    policy: str = "static"
    """static: workers keep their stage. elastic: the engine moves workers between stages on one
    device as the workload's bottleneck moves (scheduler/controller.py on live statistics)."""
    dispatch: str = "earliest-finish"
    """Which worker of a stage takes its next task: earliest-finish (predicted from each worker's
    measured speed, engine/dispatch.py) or fewest-in-flight (blind to speed: the baseline
    `dfuse bench dispatch` compares it with)."""
    elastic: ElasticConfig = field(default_factory=ElasticConfig)
    """How the elastic policy watches and decides (used with policy="elastic")."""
    batching: BatchConfig = field(default_factory=BatchConfig)
    """Per-stage batching of compatible requests (off by default)."""
    cluster: str | None = None
    """None: every worker on this host. "ray": devices may name a node of a Ray cluster
    (`NODE/DEVICE`, engine/cluster.py), whose workers Ray starts there."""
    ray_address: str | None = None
    """The Ray cluster's address (HOST:PORT of its head) with cluster="ray"; always explicit, so
    the engine never joins a cluster it happens to find."""

    def __post_init__(self):
        if not isinstance(self.transport, TransportConfig):
            raise ValueError(f"transport: must be a TransportConfig (got {type(self.transport).__name__})")
        if not isinstance(self.model, (str, os.PathLike)) or not str(self.model):
            raise ValueError(f"model: expected a built-in name or a folder path, got {self.model!r}")
        object.__setattr__(self, "model", str(self.model))
        for name in ("revision", "variant"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value.strip()):
                raise ValueError(f"{name}: expected a non-empty string or None (got {value!r})")
        if self.placement is None and not _is_pool(self.devices):
            self._init_stage_devices()
        else:
            self._init_placement()
        check_fields(self)
        if self.dtype not in ("auto", "float32", "float16", "bfloat16"):
            raise ValueError(f"dtype: must be one of auto, float32, float16, bfloat16 (got {self.dtype!r})")
        memories = sorted({memory_of(d) for d in self.pool})
        limits = self.memory_limit_gib
        if isinstance(limits, (int, float)) and not isinstance(limits, bool):  # one budget for each memory
            limits = {memory: limits for memory in memories}
        if not isinstance(limits, Mapping):
            raise ValueError(f"memory_limit_gib: expected GiB (a number for every device) or a mapping of "
                             f"device -> GiB, got {limits!r}")
        given = limits
        limits = {_memory_name(device): gib for device, gib in given.items()}
        if len(limits) < len(given):
            raise ValueError(f"memory_limit_gib: {sorted(given)} name one memory twice (every CPU "
                             "device shares the host's: give it once, as 'cpu')")
        for device, gib in limits.items():
            if device not in memories:
                raise ValueError(f"memory_limit_gib: {device!r} is not a device of this engine ({memories})")
            _GIB(f"memory_limit_gib.{device}", gib)
        object.__setattr__(self, "memory_limit_gib", MappingProxyType(limits))
        if not isinstance(self.elastic, ElasticConfig):
            raise ValueError(f"elastic: must be an ElasticConfig (got {type(self.elastic).__name__})")
        if not isinstance(self.batching, BatchConfig):
            raise ValueError(f"batching: must be a BatchConfig (got {type(self.batching).__name__})")
        if self.policy not in POLICIES:
            raise ValueError(f"policy: must be one of {', '.join(POLICIES)} (got {self.policy!r})")
        self._check_cluster()
        if self.dispatch not in DISPATCH_RULES:
            raise ValueError(f"dispatch: must be one of {', '.join(DISPATCH_RULES)} (got {self.dispatch!r})")

    def _check_cluster(self) -> None:
        if self.cluster not in (None, "ray"):
            raise ValueError(f"cluster: must be 'ray' or None (one host) (got {self.cluster!r})")
        remote = [d for d in self.pool if split_node(d)[0] is not None]
        if remote and self.cluster is None:
            raise ValueError(f"devices: {remote} name a node, which needs cluster='ray' and ray_address "
                             "(--cluster ray --ray-address HOST:PORT)")
        if self.cluster == "ray":
            address = self.ray_address
            host, _, port = address.rpartition(":") if isinstance(address, str) else ("", "", "")
            if not host or not port.isdecimal():
                raise ValueError(f"ray_address: the Ray head's HOST:PORT, e.g. 127.0.0.1:6379 (got {address!r})")
        elif self.ray_address is not None:
            raise ValueError("ray_address: only with cluster='ray'")

    def _init_stage_devices(self) -> None:
        """The per-stage form: `instances[stage]` workers of each stage on its one device."""
        one_for_all = isinstance(self.devices, str)  # then an error names `device`, not a stage the user never named
        devices = _per_stage("device", self.devices, str)
        devices = {stage: canonical_device("device" if one_for_all else f"device ({stage})", device)
                   for stage, device in devices.items()}
        check_disjoint(list(dict.fromkeys(devices.values())), "device")
        object.__setattr__(self, "devices", MappingProxyType(devices))
        instances = _per_stage("instances", self.instances, int)
        for stage, count in instances.items():
            _INSTANCES(f"instances.{stage}", count)
        object.__setattr__(self, "instances", MappingProxyType(instances))
        object.__setattr__(self, "workers", tuple((devices[s], s) for s in STAGES for _ in range(instances[s])))

    def _init_placement(self) -> None:
        """The pool form: one worker per (device, stage) of the placement."""
        if self.placement is None or self.placement == "auto":
            if not _is_pool(self.devices):
                raise ValueError("placement: 'auto' needs the pool of devices it places over (devices=[...])")
            pool = tuple(canonical_device(f"devices[{i}]", d) for i, d in enumerate(self.devices))
            if len(set(pool)) < len(pool):
                raise ValueError(f"devices: {list(pool)} names a device twice")
            check_disjoint(list(pool), "devices")
            object.__setattr__(self, "placement", "auto")
            object.__setattr__(self, "devices", pool)
            object.__setattr__(self, "workers", ())
            object.__setattr__(self, "instances", MappingProxyType({s: 0 for s in STAGES}))
            return
        if isinstance(self.placement, str):
            raise ValueError(f"placement: expected 'auto' or a mapping of device -> stages (got {self.placement!r})")
        pool = list(self.devices) if _is_pool(self.devices) else [
            canonical_device(f"placement ({device})", device) for device in self.placement]
        workers = place_workers(pool, self.placement)
        counts = {s: sum(w == s for _, w in workers) for s in STAGES}
        # The default, the counts this placement makes (a config rebuilt by dataclasses.replace),
        # or an auto placement's zeros (the Engine replaces "auto" with the planner's placement).
        if dict(self.instances) not in ({s: 1 for s in STAGES}, {s: 0 for s in STAGES}, counts):
            raise ValueError("instances: not with a placement, where each (device, stage) is one worker; list a "
                             "stage on several devices instead")
        object.__setattr__(self, "devices", tuple(canonical_device(f"devices[{i}]", d) for i, d in enumerate(pool)))
        object.__setattr__(self, "workers", workers)
        object.__setattr__(self, "instances", MappingProxyType(counts))

    @property
    def pooled(self) -> bool:
        """The pool form (devices + placement): each device hosts a set of stages, one worker
        each, and under the elastic policy a device may come to host any stages."""
        return isinstance(self.devices, tuple)

    @property
    def gpu_pools(self) -> bool:
        """Whether a GPU producer may keep its outputs in its GPU's memory for consumers that can
        map it (CUDA IPC on its GPU, P2P across): a static engine, for the fastest hop. Under the
        elastic policy every output goes through pinned host memory instead (a D2H copy by its
        producer, an H2D copy by its consumer on its copy stream), so that any worker can move
        and its outputs outlive it."""
        return self.policy != "elastic"

    @property
    def pool(self) -> tuple[str, ...]:
        """Every device of this engine (those of the per-stage form, or the pool's)."""
        if isinstance(self.devices, tuple):
            return self.devices
        return tuple(dict.fromkeys(self.devices.values()))

    def devices_of(self, stage: str) -> list[str]:
        """The devices that run `stage`, in pool order (a fused worker's device runs every stage)."""
        return list(dict.fromkeys(d for d, s in self.workers if s in (stage, FUSED)))

    def stage_device(self, stage: str) -> str:
        """The one device of `stage`'s workers (the per-stage form, or a pool where it has one device)."""
        (device,) = dict.fromkeys(d for d, s in self.workers if s == stage)
        return device

    def layout(self) -> dict[str, list[str]]:
        """Device -> the stages of its workers, in pipeline order (a stage repeats per instance)."""
        hosts: dict[str, list[str]] = {d: [] for d in self.pool}
        for device, stage in self.workers:
            hosts[device].append(stage)
        return hosts

    def slots_per_worker(self, stage: str) -> int:
        """Output slots of a `stage` worker, at least transport.slots_per_worker:
        - a batch needs one per request, and one more lets the next batch start while
          downstream still reads the last one;
        - every task queued at a consumer holds its input slot until it is done, so a producer
          feeding N consumers needs N x max_inflight_per_worker + 1 not to stall on credits (one
          encoder feeding three DiTs with 3 slots served 36 of 50 req/s in `dfuse bench sweep`)."""
        # Under the elastic policy a worker may come to serve any stage of its device (of the
        # pool, pooled): its pool (which stays through moves) is sized for the most demanding of
        # them, plus the slot a move keeps free (move_reserve).
        # A fused worker's outputs are final pixels, which only the engine reads, as a decoder's.
        stages = [STAGES[-1] if stage == FUSED else stage]
        if self.policy == "elastic" or self.pooled:
            stages = list(STAGES) if self.pooled else [
                s for s in STAGES if self.stage_device(s) == self.stage_device(stage)]
        needed = self.transport.slots_per_worker
        for s in stages:
            limit = self.batching.batch_limit(s)
            own = 1 if limit == 1 else limit + 1
            needed = max(needed, own, self.max_consumers(s) * self.max_inflight_per_worker + 1)
        return needed + self.move_reserve

    @property
    def move_reserve(self) -> int:
        """Output slots dispatch leaves free on the encoder and DiT workers of a pooled engine:
        a DiT worker moving to the decoder then always has a slot to write to while its last
        outputs wait to be read, by itself if it was the only one (engine/moves.py). Without it,
        two devices swapping dit and decoder could wait on each other forever."""
        return 1 if self.pooled else 0

    def max_consumers(self, stage: str) -> int:
        """How many workers may read a `stage` worker's outputs: the next stage's instances, or
        under the elastic policy every worker of its device that a move could turn into one
        (each other stage there keeps at least one); on a pool, one per device."""
        index = STAGES.index(stage)
        if index == len(STAGES) - 1:
            return 1  # the engine reads the final pixels
        consumer = STAGES[index + 1]
        if self.policy != "elastic":
            return self.instances[consumer]
        if self.pooled:  # every device could come to host the consumer (once: a device's stages are a set)
            return len(self.pool)
        device = self.stage_device(consumer)
        sharing = [s for s in STAGES if self.stage_device(s) == device]
        return max(self.instances[consumer], sum(self.instances[s] for s in sharing) - (len(sharing) - 1))

    def threads_per_worker(self, device: str = "cpu") -> int:
        """Torch threads of a CPU worker on `device`: cpu_threads if set; on a core set, one per
        core; on `cpu`, the cores this process may use divided among the `cpu` workers (on
        another node's `cpu`, its agent divides that node's cores: `remote_cpu_share`)."""
        if self.cpu_threads is not None:
            return self.cpu_threads
        cores = device_cpus(device)
        if cores:
            return len(cores)
        cpu_workers = sum(d == "cpu" for d, _ in self.workers)
        return max(1, len(usable_cpus()) // max(1, cpu_workers))

    def remote_cpu_share(self, device: str, workers_there: int) -> int:
        """For a worker on another node's whole host ("b/cpu"): how many workers share that
        node's cores, for its agent to size their threads from the cores it has (this host's
        count says nothing of that node's); 0 where threads are fixed here (cpu_threads, a core set)."""
        node, local = split_node(device)
        return max(1, workers_there) if node is not None and local == "cpu" and self.cpu_threads is None else 0

    def torch_dtype(self, device: str):
        import torch

        if self.dtype == "auto":
            return torch.float32 if is_cpu(device) else torch.bfloat16
        return getattr(torch, self.dtype)

    def itemsizes(self) -> dict[str, int]:
        """Bytes per element of each stage's activations (the largest where devices differ; any
        device of the pool while placement is "auto")."""
        return {s: max(self.torch_dtype(d).itemsize for d in self.devices_of(s) or self.pool) for s in STAGES}


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


def parse_memory_limits(text: str) -> float | dict[str, float]:
    """Parse the CLI form "8" (GiB for each device's memory) or "cpu=8,cuda:0=40";
    EngineConfig checks the devices and the numbers."""
    problem = ValueError(f"memory_limit_gib: expected GiB as one number (8) or device=GiB pairs like "
                         f"cpu=8,cuda:0=40 (got {text!r})")

    def gib(value: str) -> float:
        try:
            return float(value)
        except ValueError:
            raise problem from None

    if "=" not in text:
        return gib(text)
    limits = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        device, sep, value = part.partition("=")
        if not sep or not device.strip():
            raise problem
        limits[device.strip()] = gib(value)
    return limits


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


def memory_of(device: str) -> str:
    """The memory a device's activations come from: every CPU device shares its host's ("cpu",
    "b/cpu" on node b)."""
    node, _ = split_node(device)
    return ("cpu" if node is None else f"{node}/cpu") if is_cpu(device) else device


def _memory_name(device) -> str:
    """A memory_limit_gib key as memory_of names it ("cuda" is "cuda:0", a core set "cpu")."""
    if not isinstance(device, str):
        return device
    node, local = split_node(device)
    return (f"{node}/cuda:0" if node else "cuda:0") if local == "cuda" else memory_of(device)


def _is_pool(devices) -> bool:
    return isinstance(devices, Sequence) and not isinstance(devices, (str, bytes))
