"""Where workers live: the link of each stage pair, each worker's output pool, and the rules a
move between stages must keep. Decided in the engine process, before and while the engine core runs."""

from __future__ import annotations

from typing import Collection, Mapping, Sequence

from ..scheduler.core import FUSED, STAGES
from .config import EngineConfig
from .cpu_affinity import describe, openmp_affinity, physical_cores, plan, usable_cpus
from .devices import FUSED_ALONE, ROLES, device_cpus, fused_alone
from .state import Worker
from .transport.base import GPU_LINKS, choose_link, cuda_peer_access, pool_kind, probe_places
from .transport.slots import SlotPool

_CONSUMERS = {stage: STAGES[i + 1] for i, stage in enumerate(STAGES[:-1])}


def choose_links(workers: Sequence[tuple[str, str]], cluster=None, gpu_pools: bool = True) -> dict[str, str]:
    """The transport of every stage pair ("encoder->dit": "shm" | "cuda_ipc" | "tcp" ...), probed
    from where each side lives; where a pair's workers sit on several devices, the links it uses
    ("cuda_ipc+host_staged"). The last stage hands its pixels to the engine on its host.
    `cluster` (engine/cluster.py): workers on different nodes hand over by TCP. `gpu_pools=False`
    (EngineConfig.gpu_pools): outputs never stay in GPU memory, GPU to GPU is "host_staged"."""
    places = _probe(workers, cluster)
    node_of = cluster.node_of if cluster is not None else None
    links = {}
    for stage, consumer in _CONSUMERS.items():
        kinds = {_link(places, producer, reader, node_of, gpu_pools) for producer in _devices(workers, stage)
                 for reader in _devices(workers, consumer)}
        links[f"{stage}->{consumer}"] = "+".join(sorted(kinds))
    last = {"tcp" if cluster is not None and cluster.is_remote(d) else "shm" for d in _devices(workers, STAGES[-1])}
    links[f"{STAGES[-1]}->engine"] = "+".join(sorted(last or {"shm"}))
    return links


def build_workers(config: EngineConfig, segment_prefix: str, cluster=None) -> dict[int, Worker]:
    """Every configured worker, with the output pool its links need: its pool is on its GPU only
    when every consumer can map GPU memory (same GPU, or peer access) and the engine keeps GPU
    pools (EngineConfig.gpu_pools: not under the elastic policy); host pools are created
    here (the engine owns them), a GPU pool is allocated by its worker on its device, a pool on
    another node by that node's agent (engine/node_agent.py)."""
    places = _probe(config.workers, cluster)
    node_of = cluster.node_of if cluster is not None else None
    workers: dict[int, Worker] = {}
    for device, stage in config.workers:
        worker_id = len(workers)
        consumers = _devices(config.workers, _CONSUMERS[stage]) if stage in _CONSUMERS else []
        links = [_link(places, device, reader, node_of, config.gpu_pools) for reader in consumers] or ["shm"]
        name, size = f"{segment_prefix}w{worker_id}", config.transport.slot_bytes
        count = config.slots_per_worker(stage)
        if cluster is not None and cluster.is_remote(device):
            pool = cluster.new_pool(device, worker_id, size, count)
        elif pool_kind(links) == "cuda":
            pool = SlotPool(name, size, count)
        else:
            pool = SlotPool.create_host(name, size, count)
        workers[worker_id] = Worker(worker_id, stage, device, pool)
    return workers


def _probe(workers: Sequence[tuple[str, str]], cluster) -> dict:
    """Places of the devices on the engine's host (those of other nodes are not probed from here)."""
    return probe_places(device for device, _ in workers if cluster is None or not cluster.is_remote(device))


def _devices(workers: Sequence[tuple[str, str]], stage: str) -> list[str]:
    return list(dict.fromkeys(d for d, s in workers if s == stage))


def _link(places, producer: str, consumer: str, node_of=None, gpu_pools: bool = True) -> str:
    if node_of is not None and node_of(producer) != node_of(consumer):
        return "tcp"
    if producer not in places or consumer not in places:  # both on one other node: host pools there
        return "shm"
    link = choose_link(places[producer], places[consumer], cuda_peer_access)
    return link if gpu_pools or link not in GPU_LINKS else "host_staged"


def pin_cpu_workers(config: EngineConfig, workers: Mapping[int, Worker]) -> str:
    """Cores of their own for the CPU workers, when they all fit (engine/cpu_affinity.py), set
    as `Worker.cpus`; returns one line for users: where they run, and why there. A worker keeps
    its cores through restarts and moves: they are its, not its stage's."""
    on_core_sets = [w for w in workers.values() if device_cpus(w.device)]
    for worker in on_core_sets:  # a core-set device is its cores: always pinned there
        worker.cpus = device_cpus(worker.device)
    parts = []
    if any(w.device == "cpu" for w in workers.values()):
        parts.append(_pin_whole_host_workers(config, [w for w in workers.values() if w.device == "cpu"]))
    if on_core_sets:
        parts.append("on their devices' cores: " + ", ".join(f"worker {w.id} on {describe(w.cpus)}" for w in on_core_sets))
    return "; ".join(parts) or "no CPU workers"


def _pin_whole_host_workers(config: EngineConfig, cpu_workers: list[Worker]) -> str:
    if not config.pin_cpu_workers:
        return "left to the OS (pin_cpu_workers=False)"
    openmp = openmp_affinity()
    if openmp:
        return f"left to OpenMP's own placement ({openmp} is set)"
    threads, cpus = config.threads_per_worker("cpu"), usable_cpus()
    blocks = plan([threads] * len(cpu_workers), physical_cores(cpus))
    if blocks is None:
        return (f"left to the OS: {len(cpu_workers)} CPU workers x {threads} thread(s) need more than the "
                f"{len(cpus)} cores here")
    for worker, block in zip(cpu_workers, blocks):
        worker.cpus = block
    return "pinned, cores of their own: " + ", ".join(f"worker {w.id} on {describe(w.cpus)}" for w in cpu_workers)


def check_moves(workers: Mapping[int, Worker], config: EngineConfig, moves: Sequence[tuple[int, str]],
                starts: Sequence[tuple[str, str]] = (), stops: Sequence[int] = (), lost: Collection[str] = ()) -> None:
    """ValueError, naming the field, unless these can start now, together: `moves` (worker id,
    new stage) switch a worker in its own process, `starts` (device, stage) add a worker and
    `stops` (worker ids) remove one, the last two on a pooled engine only. Each stage keeps a
    worker once they are done (two workers may swap stages, each the last of its own), unless
    the whole split pipeline gives way to fused workers; on a pooled engine a worker may take any
    stage or the fused role, one worker per device and stage, a fused one alone on its device;
    in the per-stage form, only a stage configured on its device. Devices `lost` with their Ray
    node (engine/cluster.py) take no move, and their workers serve no stage meanwhile."""
    for device in [*(workers[w].device for w, _ in moves if w in workers), *(d for d, _ in starts),
                   *(workers[w].device for w in stops if w in workers)]:
        if device in lost:
            raise ValueError(f"placement: {device} has left with its node (the Ray cluster lost it); it takes "
                             "moves again once its node is back")
    for worker_id, stage in moves:
        worker = _busy_check(workers, worker_id)
        if stage not in ROLES:
            raise ValueError(f"stage: must be one of {', '.join(ROLES)} (got {stage!r})")
        if worker.stage == stage:
            raise ValueError(f"stage: worker {worker_id} already serves {stage}")
        if worker.pool.on_gpu:
            raise ValueError(f"worker_id: worker {worker_id} keeps its outputs in its GPU's memory (CUDA IPC), which a "
                             "static engine does for speed; an engine with policy='elastic' keeps every output in "
                             "pinned host memory, where moves can take them")
        if not config.pooled and stage == FUSED:
            raise ValueError(f"stage: {FUSED} (the fused role) runs only on an engine on a device pool "
                             "(devices= and placement=)")
        if not config.pooled and worker.device not in config.devices_of(stage):
            raise ValueError(f"stage: worker {worker_id} runs on {worker.device} but {stage} runs on "
                             f"{', '.join(config.devices_of(stage))}; only an engine on a device pool (devices= and "
                             "placement=) moves stages across devices")
    for worker_id in stops:
        _busy_check(workers, worker_id)
    if (starts or stops) and not config.pooled:
        raise ValueError("placement: only an engine on a device pool starts or stops workers as it moves stages")
    for device, stage in starts:
        if device not in config.pool or stage not in ROLES:
            raise ValueError(f"placement: cannot start a {stage} worker on {device}; devices are {list(config.pool)}")
    if config.pooled:  # a worker coming to a stage must be able to read its producers' pools
        for device, stage in [*starts, *((workers[w].device, s) for w, s in moves)]:
            unreadable = [p.id for p in workers.values() if _CONSUMERS.get(p.stage) == stage and p.pool.on_gpu
                          and p.device != device]
            if unreadable:
                raise ValueError(f"placement: a {stage} worker on {device} could not read the GPU pool of worker(s) "
                                 f"{unreadable} (outputs that stay on another GPU: a static engine's CUDA IPC); an "
                                 "engine with policy='elastic' keeps every output in pinned host memory")
    ids = [w for w, _ in moves] + list(stops)
    if len(set(ids)) < len(ids):
        raise ValueError("worker_id: a worker may make one move at a time")
    after = {w.id: (w.device, w.moving_to or w.stage) for w in workers.values() if not w.stopping and w.device not in lost}
    after |= {w: (workers[w].device, stage) for w, stage in moves}
    hosted = [where for w, where in after.items() if w not in stops] + list(starts)
    if config.pooled:
        for device, stage in hosted:
            if hosted.count((device, stage)) > 1:
                raise ValueError(f"stage: {device} would host two {stage} workers (one per device and stage)")
            if not fused_alone(s for d, s in hosted if d == device):
                raise ValueError(f"stage: {device} would host a {FUSED} worker beside others; {FUSED_ALONE}")
    # The split pipeline keeps every stage, or goes entirely if fused workers stay (the requests
    # inside it then start over on them: engine/moves.py _restart_stranded).
    split = {s for _, s in hosted if s in STAGES}
    fused = any(s == FUSED for _, s in hosted)
    for stage in STAGES if split or not fused else ():
        if stage not in split:
            leaving = [w for w, _ in moves if workers[w].stage == stage] + [w for w in stops if workers[w].stage == stage]
            if not leaving:  # a split stage left to none while others stay: a request sent down it never ends
                raise ValueError(f"placement: the split pipeline would have no {stage} worker beside its other "
                                 f"stages; keep one, or make every split device {FUSED}")
            raise ValueError(f"worker_id: worker {leaving[0]} is the last {stage} worker; moving it would "
                             "stall every request")
    # A leaving worker waits until its outputs are read (engine/moves.py): someone must stay (or
    # start) to read them, but a dit worker becoming a decoder on a pooled engine reads its own.
    staying = {w.stage for w in workers.values()
               if w.moving_to is None and not w.stopping and w.id not in ids and w.device not in lost}
    staying |= {stage for _, stage in starts}
    for worker_id, stage in [*moves, *((w, None) for w in stops)] if split else ():
        old = workers[worker_id].stage
        reader = _CONSUMERS.get(old)
        reads_its_own = config.move_reserve and (old, stage) == STAGES[-2:]
        if reader is not None and reader not in staying and not reads_its_own:
            raise ValueError(f"worker_id: worker {worker_id}'s {old} outputs would have no {reader} worker to read "
                             f"them while it moves; move a {reader} worker in first")


def _busy_check(workers: Mapping[int, Worker], worker_id: int) -> Worker:
    worker = workers.get(worker_id)
    if worker is None:
        raise ValueError(f"worker_id: no worker {worker_id!r}; workers are {sorted(workers)}")
    if worker.moving_to is not None or worker.stopping:
        raise ValueError(f"worker_id: worker {worker_id} is already moving")
    return worker
