"""placement="auto": the scheduler's planner places the model's stages over a device pool before
any worker starts, under each device's memory.

The planner (scheduler/planner.py) maximises the bottleneck throughput of the time-shared
devices for the model's default request. Before anything has run there are no measurements, so
its cost model is an estimate, kept deliberately plain:
- a stage's work per request is proportional to the weight bytes it streams per pass, times its
  passes (the DiT runs once per step, twice under classifier-free guidance);
- a CPU device's speed is proportional to its cores; a GPU counts as GPU_CORES cores (devices.py).
On alike devices the estimate does not decide anything: where the whole model fits on every
device, the fused role on every device is the planner's optimum (each device serves whole
requests at 1 / the sum of its stage costs, which no split beats, and fused pays no handoff), and
it is what a monolithic deployment gets. The estimate matters where memory forces a split or the
devices differ; the elastic policy then corrects it from live measurements.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
from pathlib import Path
from typing import Sequence

from ..scheduler.core import STAGES, Demand, Device, Shape
from ..scheduler.planner import Planner, PlannerConfig
from ..scheduler.predictor import FEATURES, DeviceSpec, Geometry, Predictor, StageSpec
from .config import EngineConfig, memory_of
from .devices import ROLES, describe_device, device_cores, device_kind, is_cpu
from .elastic import roles_of
from .protocol import RequestParams

log = logging.getLogger("dfuse.engine")

_GB = 1e9


def auto_placed(config: EngineConfig, model_path: Path | str, info, family, cluster=None) -> EngineConfig:
    """`config` (placement "auto") with the planner's placement over its pool, under each
    device's memory: its memory_limit_gib where set, else what the device has (CPU devices
    share their host's, in equal parts; another node's are measured there, `cluster`)."""
    placement = plan_placement(config.pool, model_path, info, family, config.itemsizes(),
                               device_memory_gb(config, cluster), fused=config.elastic.fused)
    log.info("placement auto: %s", placement)
    return dataclasses.replace(config, placement=placement, instances={s: 1 for s in STAGES})


def device_memory_gb(config: EngineConfig, cluster=None) -> dict[str, float]:
    """GB each device of the pool offers the planner: its memory_limit_gib where set, else what
    it has; CPU devices share their host's, in equal parts. `cluster` (engine/cluster.py): the
    devices of other nodes as measured there (inf, unbounded, where that cannot be told)."""
    host_of = cluster.node_of if cluster is not None else (lambda d: None)  # noqa: E731
    cpu_devices = collections.Counter(host_of(d) for d in config.pool if is_cpu(d))
    memory_gb = {}
    for device in config.pool:
        limit = config.memory_limit_gib.get(memory_of(device))
        if limit is not None:
            gib = limit
        elif cluster is not None:
            gib = cluster.device_memory_gib(device)
        else:
            gib = describe_device(device)[1]
        memory_gb[device] = gib * 2**30 / _GB / (cpu_devices[host_of(device)] if is_cpu(device) else 1)
    return memory_gb


def stage_memory(model_path: Path | str, info, family, itemsizes: dict[str, int]) -> dict[str, StageSpec]:
    """Each stage's weights (its files) and activations at the model's default request, in GB."""
    from .models.catalog import stage_weight_bytes

    height, width = info.default_height_width
    params = RequestParams("", None, info.num_inference_steps, info.guidance_scale, height, width, 0,
                           num_frames=info.default_frames)
    return {s: StageSpec(stage_weight_bytes(Path(model_path), s) / _GB if isinstance(model_path, Path) else 0.0,
                         family.peak_bytes(info, s, params, itemsizes[s]) / _GB, 0.0) for s in STAGES}


def plan_placement(pool: Sequence[str], model_path: Path | str, info, family, itemsizes: dict[str, int],
                   memory_gb: dict[str, float], fused: bool = True) -> dict[str, list[str]]:
    """{device: [stages in pipeline order]} for the pool (with `fused`, the fused role where it
    serves more); ValueError naming `placement` when no placement serves every stage (a stage
    fits on no device)."""
    height, width = info.default_height_width
    shape = Shape(height=height, width=width, steps=info.num_inference_steps, frames=info.default_frames or 1,
                  cfg=info.guidance_scale > 1)
    stages = stage_memory(model_path, info, family, itemsizes)
    weights_gb = {s: spec.weights_gb for s, spec in stages.items()}
    activations_gb = {s: spec.act_fixed_gb for s, spec in stages.items()}
    kinds = {device: device_kind(device) for device in pool}
    # Relative costs: weight bytes per pass (at least a little: a synthetic stage has none).
    work = {s: max(weights_gb[s], 1e-3) for s in STAGES}
    coefficients = {}
    for kind, cores in {k: device_cores(d) for d, k in kinds.items()}.items():
        for stage in STAGES:
            per_pass = work[stage] / cores
            if stage == "dit":  # seconds per request = fixed + steps x per step (features: fixed, steps, ...)
                coefficients[stage, kind] = (0.0, per_pass * shape.rows) + (0.0,) * (len(FEATURES[stage]) - 2)
            else:
                coefficients[stage, kind] = (per_pass,) + (0.0,) * (len(FEATURES[stage]) - 1)
    predictor = Predictor(
        Geometry(), stages,
        # Devices of one kind (remote GPUs, CPU core sets) may hold different amounts: the least bounds them all.
        {kind: DeviceSpec(kind, memory_gb=min(memory_gb[d] for d, k in kinds.items() if k == kind))
         for kind in set(kinds.values())}, coefficients,
    )
    planner = Planner(PlannerConfig(share="any", streaming=False, fused=fused))
    try:
        plan = planner.plan([Device(d, kinds[d]) for d in pool], Demand.of(shape), predictor)
    except ValueError:
        need = ", ".join(f"{s} {weights_gb[s] + activations_gb[s]:.1f} GB" for s in STAGES)
        raise ValueError(f"placement: no placement of the stages ({need}) over {list(pool)} fits their memory "
                         f"({', '.join(f'{d} {memory_gb[d]:.1f} GB' for d in pool)}); add devices, or lower dtype")
    return {d: sorted(roles_of(plan.placement.assignment[d]), key=ROLES.index) for d in pool
            if plan.placement.assignment.get(d)}
