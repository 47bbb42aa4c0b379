"""Memory admission: refuse, before it runs, a request whose activations cannot fit the device
of one of its stages, or switch its decode to tiles when that makes it fit.

Budgets are per device: `memory_limit_gib` from the config, else detected once at start-up
(CPU: MemAvailable after the workers loaded their weights, or less when this process's cgroup
has a memory limit; GPU: total memory minus the weight files placed on it, minus a reserve). The estimates come from each family (`peak_bytes`) and
are stated estimates, not measurements: admission catches requests that are far too big, and an
out-of-memory that still happens inside a worker is reported to the caller (the worker lives on).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import msgspec

from ..scheduler.core import STAGES
from .config import EngineConfig, memory_of
from .devices import host_memory_bytes, role_stages, split_node
from .models.base import FamilySpec, ModelInfo
from .models.catalog import stage_weight_bytes
from .protocol import RequestParams

GPU_RESERVE_BYTES = 2**30  # CUDA context, allocator slack
CPU_SHARE = 0.8  # leave room for the rest of the machine


def admit(
    family: FamilySpec, info: ModelInfo, params: RequestParams, budgets: Mapping[str, int], itemsizes: Mapping[str, int]
) -> RequestParams:
    """`params` as they may run (maybe with vae_tiling), or ValueError naming height/width
    (num_frames/height/width for a video)."""
    for stage in STAGES:
        need = family.peak_bytes(info, stage, params, itemsizes[stage])
        if need <= budgets[stage]:
            continue
        if stage == "decoder" and family.supports_vae_tiling() and not params.vae_tiling:
            tiled = msgspec.structs.replace(params, vae_tiling=True)
            if family.peak_bytes(info, stage, tiled, itemsizes[stage]) <= budgets[stage]:
                return tiled
        need_gib, budget_gib = _two_gib(need, budgets[stage])
        raise ValueError(
            f"{_shape(info, params)} request needs about {need_gib} GiB of "
            f"activations in the {stage} stage, more than the {budget_gib} GiB its device has "
            f"for them{' even when decoded in tiles' if stage == 'decoder' else ''}; ask for a smaller "
            f"{'video' if info.video else 'image'}"
        )
    return params


def check_transport(family: FamilySpec, info: ModelInfo, params: RequestParams, slot_bytes: int,
                    itemsizes: Mapping[str, int]) -> None:
    """ValueError naming the size fields when a stage's outputs for `params` cannot fit one
    transport slot: refused up front rather than failing in the worker after the DiT ran (a
    video's frames grow with num_frames x height x width; an 81-frame 832x480 clip is ~93 MiB)."""
    needs = {stage: family.output_bytes(info, stage, params, itemsizes[stage]) for stage in STAGES}
    if max(needs.values()) > slot_bytes:
        # Name the largest stage's outputs: they set the slot size suggested, so the message's two
        # sizes are about the same thing (the first stage over is not always the largest).
        stage = max(STAGES, key=needs.get)
        slot_mib = -(-needs[stage] // 2**20)
        raise ValueError(
            f"{_shape(info, params)} request makes {needs[stage] / 2**20:.1f} MiB of {stage} outputs, more than "
            f"one transport slot holds ({slot_bytes / 2**20:g} MiB); ask for a smaller "
            f"{'video (fewer frames)' if info.video else 'image'}, or start the engine with slots of "
            f"{slot_mib} MiB (dfuse run --slot-mib {slot_mib}; EngineConfig(transport=TransportConfig(slot_mib={slot_mib})))"
        )


def _two_gib(larger: int, smaller: int) -> tuple[str, str]:
    """Both sizes in GiB, with the fewest decimals (2 at least) that still tell them apart: a
    small budget would read "0.01 GiB ... more than 0.01 GiB" otherwise."""
    for decimals in range(2, 10):
        texts = f"{larger / 2**30:.{decimals}f}", f"{smaller / 2**30:.{decimals}f}"
        if texts[0] != texts[1]:
            break
    return texts


def _shape(info: ModelInfo, params: RequestParams) -> str:
    """The start of an error message: the fields that set the size, and the size asked for."""
    if info.video:
        return f"num_frames/height/width: a {params.num_frames}-frame {params.width}x{params.height}"
    return f"height/width: a {params.width}x{params.height}"


def detect_budgets(config: EngineConfig, model_path, root: Path = Path("/")) -> dict[str, int]:
    """Bytes of activations each stage may use: its device's budget (every CPU device shares the
    host's memory), the smallest where the stage runs on several devices. `root` is where /proc
    and /sys are read from (a fake tree in tests)."""
    return stage_budgets(config, memory_budgets(config, model_path, root))


def memory_budgets(config: EngineConfig, model_path, root: Path = Path("/"), workers=None,
                   gpus_only: bool = False, node_memory=None) -> dict[str, int]:
    """Activation bytes per memory (memory_of: "cpu", "cuda:0", "b/cpu" ...). `workers`: (device,
    role) of the workers now, after moves (default: the configured ones): a GPU's budget is what
    the weights of the stages it holds leave. `gpus_only`: only those (a move changes nothing
    else; free host memory read mid-move would count a leaving worker's). `node_memory(memory)`:
    what another node's agent measures there (RayCluster.node_memory): its host memory for
    "b/cpu", with its GPUs' totals for "b/cuda:0"; or None. Unmeasured memory refuses nothing."""
    workers = config.workers if workers is None else list(workers)
    by_memory: dict[str, int] = {}
    for memory in {memory_of(d) for d in config.pool}:
        node, local = split_node(memory)
        gpu = local != "cpu"
        if gpus_only and (not gpu or memory in config.memory_limit_gib):
            continue
        if memory in config.memory_limit_gib:
            by_memory[memory] = int(config.memory_limit_gib[memory] * 2**30)
        elif memory == "cpu":
            by_memory[memory] = int(_mem_available(root) * CPU_SHARE)
        elif node is not None:  # another node's, as its agent measures it there
            measured = node_memory(memory) if node_memory is not None else None
            if not gpu:
                by_memory[memory] = UNMEASURED if measured is None else int(measured["available"] * CPU_SHARE)
            else:
                total = (measured or {}).get("gpus", {}).get(local)
                by_memory[memory] = UNMEASURED if total is None else _gpu_budget(
                    memory, _stages_on(memory, workers), model_path, total)
        else:
            by_memory[memory] = _gpu_budget(memory, _stages_on(memory, workers), model_path)
    return by_memory


def _stages_on(memory: str, workers) -> list[str]:
    return list(dict.fromkeys(s for d, role in workers if d == memory for s in role_stages(role)))


def stage_budgets(config: EngineConfig, by_memory: dict[str, int], workers=None) -> dict[str, int]:
    """Each stage's budget: the smallest of its workers' memories (`workers` as in memory_budgets;
    a stage no worker serves now: the smallest of the pool's, any device may come to host it)."""
    workers = config.workers if workers is None else list(workers)
    budgets = {}
    for stage in STAGES:
        devices = {d for d, role in workers if stage in role_stages(role)} or set(config.pool)
        budgets[stage] = min(by_memory[memory_of(d)] for d in devices)
    return budgets


UNMEASURED = 2**62  # a budget not known: nothing is refused for want of memory


def host_memory() -> dict[str, int]:
    """This host's memory: "total" bytes, and "available", what its processes may still allocate
    (what a cluster node's agent reports of its node)."""
    return {"total": host_memory_bytes(), "available": _mem_available()}


def _mem_available(root: Path = Path("/")) -> int:
    """Bytes this process may still allocate: the host's MemAvailable, or the room left under
    its cgroup's memory limit when that is smaller (a container sees the host's /proc/meminfo:
    in a 1.5 GiB container it read 60 GiB and admitted a decode that was OOM-killed)."""
    known = [b for b in (_meminfo_available(root / "proc/meminfo"), _cgroup_room(root)) if b is not None]
    return min(known, default=UNMEASURED)


def _meminfo_available(path: Path) -> int | None:
    try:
        with open(path) as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


CGROUP_UNLIMITED = 2**60  # v1 writes "no limit" as 2**63 rounded down to a page
# (mount under root, limit file, usage file, memory.stat key of reclaimable page cache)
CGROUP_V2 = ("sys/fs/cgroup", "memory.max", "memory.current", "inactive_file")
CGROUP_V1 = ("sys/fs/cgroup/memory", "memory.limit_in_bytes", "memory.usage_in_bytes", "total_inactive_file")


def _cgroup_room(root: Path) -> int | None:
    """Limit minus usage of the tightest memory-limited cgroup holding this process (v2 `0::/path`
    or v1 `N:...memory...:/path` in /proc/self/cgroup), checked from its own cgroup up to the
    hierarchy's root: a limit is often set on a parent. None: no limit anywhere."""
    try:
        lines = (root / "proc/self/cgroup").read_text().splitlines()
    except OSError:
        return None
    rooms = []
    for line in lines:
        hierarchy, controllers, path = (line.split(":", 2) + ["", ""])[:3]
        if hierarchy == "0" and not controllers:
            rooms += _rooms(root, path, *CGROUP_V2)
        elif "memory" in controllers.split(","):
            rooms += _rooms(root, path, *CGROUP_V1)
    return min(rooms, default=None)


def _rooms(root: Path, path: str, mount: str, limit_file: str, usage_file: str, cache_key: str) -> list[int]:
    parts = [p for p in path.strip().split("/") if p]
    rooms = []
    # Up to the mount itself: without a cgroup namespace /proc/self/cgroup names the host's path
    # while the container's own cgroup is mounted at the root.
    for depth in range(len(parts), -1, -1):
        directory = root.joinpath(mount, *parts[:depth])
        limit = _read_int(directory / limit_file)  # "max" (v2) reads as None
        if limit is None or limit >= CGROUP_UNLIMITED:
            continue
        # Usage counts page cache (the weight files just read); what the kernel reclaims first
        # before an OOM kill is not taken.
        usage = (_read_int(directory / usage_file) or 0) - _stat(directory / "memory.stat", cache_key)
        rooms.append(max(0, limit - max(0, usage)))
    return rooms


def _read_int(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


def _stat(path: Path, key: str) -> int:
    try:
        for line in path.read_text().splitlines():
            name, _, value = line.partition(" ")
            if name == key:
                return int(value)
    except (OSError, ValueError):
        pass
    return 0


def _gpu_budget(device: str, stages: list[str], model_path, total: int | None = None) -> int:
    """What the weights of `stages` leave of GPU `device`'s memory (`total` bytes: as measured on
    another node; this host's GPUs are asked here)."""
    if total is None:
        import torch

        total = torch.cuda.get_device_properties(torch.device(device)).total_memory
    weights = sum(stage_weight_bytes(model_path, stage) for stage in stages) if isinstance(model_path, Path) else 0
    return max(0, total - weights - GPU_RESERVE_BYTES)
