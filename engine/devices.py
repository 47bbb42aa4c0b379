"""Devices and placements: the pool of devices an engine may use, and the stages each one hosts.

A device is `cuda:N` (one GPU), `cpu` (the whole host: workers' threads placed by the OS, or
pinned when they fit, engine/cpu_affinity.py), or a CPU core set `cpu:A`, `cpu:A-B`, `cpu:A,B`
(logical CPUs: its workers run on exactly those cores, with one torch thread per core). Two
one-core devices behave like two small GPUs, which makes placements testable on a CPU machine.

On a Ray cluster (engine/cluster.py) a device may name its node: `NODE/DEVICE` ("b/cuda:0",
"b/cpu:0-7"), where NODE is the node's `dfuse-node` label (or its IP). Such a device is checked
only for its spelling here: whether it exists is the node's to say, when its worker starts.

A placement maps each device to the stages it hosts: one worker per (device, stage).

    {"cpu:0": ["encoder", "decoder"], "cpu:1": ["dit"]}     encoder and decoder share core 0
    {"cuda:0": ["encoder", "dit", "decoder"], "cuda:1": ["dit"]}   a DiT on each GPU
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence

from ..scheduler.core import FUSED, STAGES
from .cpu_affinity import describe, usable_cpus

ROLES = (*STAGES, FUSED)  # what a worker may be: a stage, or the fused whole pipeline (stages/fused.py)
FUSED_ALIAS = "fused"  # the fused role's short name, for the CLI where "+" separates a device's stages


def as_role(name):
    """A worker role as given by a user: the fused role's alias named in full, anything else as it is."""
    return FUSED if name == FUSED_ALIAS else name


FUSED_ALONE = f"{FUSED} holds the whole pipeline; a device hosting it hosts nothing else"


def fused_alone(roles) -> bool:
    """The one rule of a device's roles beyond one worker per stage: a fused worker is alone there."""
    roles = list(roles)
    return FUSED not in roles or len(roles) == 1


def role_stages(role: str) -> tuple[str, ...]:
    """The pipeline stages a worker of `role` runs: its stage, or all of them when fused."""
    return STAGES if role == FUSED else (role,)


_NODE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")


def split_node(device: str) -> tuple[str | None, str]:
    """("b", "cuda:0") for "b/cuda:0"; (None, device) for a device of the engine's own host."""
    node, sep, local = device.rpartition("/")
    return (node, local) if sep else (None, device)


def local_part(device: str) -> str:
    """The device as its own node names it ("b/cpu:0-3" -> "cpu:0-3")."""
    return split_node(device)[1]


def canonical_device(field: str, device) -> str:
    """The device in its one spelling ("cuda" -> "cuda:0", "cpu:1,0" -> "cpu:0-1"), checked to
    exist here (a device on another node: its spelling only); ValueError naming `field` otherwise."""
    if not isinstance(device, str):
        raise ValueError(f"{field}: must be 'cpu', 'cuda' or 'cuda:N', or a core set 'cpu:A-B' (got {device!r})")
    node, local = split_node(device.strip())
    if node is not None:
        if not _NODE_NAME.fullmatch(node):
            raise ValueError(f"{field}: {node!r} is not a node name (letters, digits, '.', '_', '-'; got {device!r})")
        return f"{node}/{_spelled(field, device, local)}"
    kind, sep, rest = device.strip().partition(":")
    if kind == "cpu":
        return "cpu" if not sep else f"cpu:{describe(_core_set(field, device, rest))}"
    if kind != "cuda" or (rest and not rest.isdecimal()):
        raise ValueError(f"{field}: must be 'cpu', 'cuda' or 'cuda:N', or a core set 'cpu:A-B' (got {device!r})")
    import torch

    count = torch.cuda.device_count()
    if count == 0 or int(rest or 0) >= count:
        available = ", ".join(["cpu"] + [f"cuda:{i}" for i in range(count)])
        raise ValueError(f"{field}: {device!r} is not available here; available devices: {available}")
    return f"cuda:{int(rest or 0)}"


def _spelled(field: str, device: str, local: str) -> str:
    """A device of another node in its one spelling, without asking this host whether it exists."""
    kind, sep, rest = local.partition(":")
    if kind == "cpu":
        return "cpu" if not sep else f"cpu:{describe(_cores(field, device, rest))}"
    if kind != "cuda" or (rest and not rest.isdecimal()):
        raise ValueError(f"{field}: must be NODE/ followed by 'cpu', 'cuda:N' or a core set 'cpu:A-B' (got {device!r})")
    return f"cuda:{int(rest or 0)}"


def _cores(field: str, device: str, text: str) -> tuple[int, ...]:
    cores: set[int] = set()
    for part in text.split(","):
        low, dash, high = part.strip().partition("-")
        if not low.isdecimal() or (dash and not high.isdecimal()):
            raise ValueError(f"{field}: {device!r} is not a core set; write cpu:A, cpu:A-B or cpu:A,B")
        cores.update(range(int(low), int(high if dash else low) + 1))
    if not cores:
        raise ValueError(f"{field}: {device!r} is not a core set; write cpu:A, cpu:A-B or cpu:A,B")
    return tuple(sorted(cores))


def _core_set(field: str, device: str, text: str) -> tuple[int, ...]:
    cores = set(_cores(field, device, text))
    allowed = usable_cpus()
    outside = sorted(cores - set(allowed))
    if not cores or outside:
        raise ValueError(f"{field}: {device!r} names CPUs {describe(outside) or 'none'} that this process may not "
                         f"use; usable CPUs: {describe(allowed)}")
    return tuple(sorted(cores))


def device_cpus(device: str) -> tuple[int, ...] | None:
    """The cores of a core-set device (canonical form, on its node); None for `cpu` and GPUs."""
    device = local_part(device)
    if not device.startswith("cpu:"):
        return None
    cores: list[int] = []
    for part in device.removeprefix("cpu:").split(","):
        low, _, high = part.partition("-")
        cores += range(int(low), int(high or low) + 1)
    return tuple(cores)


def torch_device(device: str) -> str:
    """What torch calls it on its node: every CPU device is "cpu"."""
    device = local_part(device)
    return "cpu" if device.startswith("cpu") else device


def is_cpu(device: str) -> bool:
    return local_part(device).startswith("cpu")


def host_memory_bytes() -> int:
    """This host's physical memory."""
    return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


_GPU_TOTALS = """
import json, torch
print(json.dumps({f"cuda:{i}": torch.cuda.get_device_properties(i).total_memory
                  for i in range(torch.cuda.device_count())} if torch.cuda.is_available() else {}))
"""


def gpu_totals(timeout_s: float = 120.0) -> dict[str, int] | None:
    """Each GPU's total bytes on this host ({"cuda:0": ...}; {} without CUDA; None when it cannot
    be told), asked in a child process: asking here would leave a CUDA context in this one (a
    cluster node's agent, which holds no GPU memory otherwise)."""
    import json
    import subprocess
    import sys

    try:
        done = subprocess.run([sys.executable, "-c", _GPU_TOTALS], capture_output=True, text=True,
                              timeout=timeout_s, check=True)
        return {str(k): int(v) for k, v in json.loads(done.stdout).items()}
    except (OSError, subprocess.SubprocessError, ValueError, AttributeError):
        return None


def describe_device(device: str) -> tuple[str, float]:
    """(what it is, its memory in GiB) for users: the GPU's name, or the host's cores; a device
    of another node only by its name (0: not known here; the engine asks that node's agent for
    a CPU device's, engine/remote_workers.py)."""
    node, local = split_node(device)
    if node is not None:
        return (f"{len(device_cpus(local) or ())} CPU cores ({local.removeprefix('cpu:')})" if device_cpus(local)
                else local) + f" on node {node}", 0.0
    if is_cpu(device):
        cores = device_cpus(device) or usable_cpus()
        return f"{len(cores)} CPU core{'s' if len(cores) > 1 else ''} ({describe(cores)})", round(host_memory_bytes() / 2**30, 1)
    import torch

    properties = torch.cuda.get_device_properties(torch.device(device))
    return properties.name, round(properties.total_memory / 2**30, 1)


def place_workers(devices: Sequence, placement: Mapping) -> tuple[tuple[str, str], ...]:
    """(device, stage) of every worker of `placement` over the pool `devices`, by stage in
    pipeline order (fused workers last), then by device in pool order; ValueError naming
    `devices` or `placement`."""
    if isinstance(devices, (str, bytes)) or not isinstance(devices, Sequence):
        raise ValueError(f"devices: expected a list of devices such as ['cpu:0', 'cpu:1'] (got {devices!r})")
    pool = [canonical_device(f"devices[{i}]", d) for i, d in enumerate(devices)]
    if not pool:
        raise ValueError("devices: the pool is empty; give at least one device")
    if len(set(pool)) < len(pool):
        raise ValueError(f"devices: {pool} names a device twice")
    check_disjoint(pool, "devices")
    if not isinstance(placement, Mapping):
        raise ValueError(f"placement: expected a mapping of device -> stages such as "
                         f"{{'cpu:0': ['encoder', 'decoder'], 'cpu:1': ['dit']}} (got {placement!r})")
    hosts: dict[str, list[str]] = {}
    for device, stages in placement.items():
        name = canonical_device(f"placement ({device})", device)
        if name in hosts:
            raise ValueError(f"placement: {device!r} names {name} again; give each device once")
        if name not in pool:
            raise ValueError(f"placement: {device!r} is not in devices {pool}")
        stages = [stages] if isinstance(stages, str) else stages
        if not isinstance(stages, Sequence) or not stages:
            raise ValueError(f"placement ({device}): expected a list of stages from {', '.join(ROLES)} (got {stages!r})")
        stages = [as_role(stage) for stage in stages]
        for stage in stages:
            if stage not in ROLES:
                raise ValueError(f"placement ({device}): unknown stage {stage!r}; stages are {', '.join(STAGES)}, "
                                 f"or {FUSED} (alias {FUSED_ALIAS}: the whole pipeline in one process)")
        if not fused_alone(stages):
            raise ValueError(f"placement ({device}): {FUSED_ALONE} (got {list(stages)})")
        if len(set(stages)) < len(stages):
            raise ValueError(f"placement ({device}): {list(stages)} names a stage twice (one worker per device and stage)")
        hosts[name] = list(stages)
    split = [s for s in STAGES if any(s in stages for stages in hosts.values())]
    fused = any(FUSED in stages for stages in hosts.values())
    missing = [s for s in STAGES if s not in split]
    if missing and (split or not fused):
        # A request sent down the split pipeline needs every stage there; fused workers do not serve a part.
        raise ValueError(f"placement: no device hosts the {', '.join(missing)} stage; every stage needs one"
                         + (f" (the split pipeline beside the {FUSED} workers too)" if fused else ""))
    return tuple((device, stage) for stage in ROLES for device in pool if stage in hosts.get(device, ()))


def check_disjoint(devices: Sequence[str], field: str) -> None:
    """Core sets are devices of their own only if they share no core with another CPU device
    of their node (`cpu`, the whole host, shares every core)."""
    owner: dict[tuple[str | None, int], str] = {}
    whole: dict[str, str] = {}  # node -> its "cpu" device: another node's cores are not known here
    for device in devices:
        node, local = split_node(device)
        if not is_cpu(local):
            continue
        if node is not None and local == "cpu":
            other = whole.get(node) or next((d for (n, _), d in owner.items() if n == node), None)
            if other:
                raise ValueError(f"{field}: {other} and {device} share CPUs; CPU devices must not overlap")
            whole[node] = device
            continue
        if node is not None and node in whole:
            raise ValueError(f"{field}: {whole[node]} and {device} share CPUs; CPU devices must not overlap")
        for core in device_cpus(local) or usable_cpus():
            if (node, core) in owner:
                raise ValueError(f"{field}: {owner[node, core]} and {device} share CPU {core}; CPU devices must not overlap")
            owner[node, core] = device


def parse_device_list(text: str) -> list[str]:
    """The CLI form "cpu:0,cpu:1,cuda:0" (a core set's own commas stay with it: "cpu:0,1,cuda:0")."""
    devices: list[str] = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        if devices and local_part(devices[-1]).startswith("cpu:") and part[0].isdecimal() and "/" not in part:
            devices[-1] += f",{part}"
        else:
            devices.append(part)
    return devices


def parse_placement(text: str) -> dict[str, list[str]]:
    """The CLI form "cpu:0=encoder+decoder,cpu:1=dit" -> {"cpu:0": ["encoder", "decoder"], ...};
    "cpu:0=fused" -> {"cpu:0": [FUSED]} (the whole pipeline in one process)."""
    placement: dict[str, list[str]] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        device, sep, stages = part.rpartition("=")
        if not sep or not device:
            raise ValueError(f"placement: expected device=stage+stage pairs like cpu:0=encoder+decoder,cpu:1=dit "
                             f"(got {part!r})")
        roles = [FUSED] if stages.strip() == FUSED_ALIAS else [s.strip() for s in stages.split("+")]
        placement.setdefault(device.strip(), []).extend(roles)
    return placement


GPU_CORES = 64  # a GPU's speed in CPU cores, for cost estimates only (measured costs replace it)


def device_kind(device: str) -> str:
    """Devices of one kind are interchangeable to the planner: a GPU by its name, a CPU device
    by its number of cores."""
    if is_cpu(device):
        return f"cpu x{device_cores(device)}"
    if split_node(device)[0] is not None:  # another node's GPU: known by its index only here
        return "cuda (remote)"
    import torch

    return torch.cuda.get_device_properties(device).name


def device_cores(device: str) -> int:
    """A device's speed in CPU cores, for estimates: its cores, or GPU_CORES for a GPU."""
    if not is_cpu(device):
        return GPU_CORES
    return len(device_cpus(device) or os.sched_getaffinity(0))  # a remote "cpu": as many as here, for want of better
