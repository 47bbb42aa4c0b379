"""The elastic policy inside the engine: live statistics in, worker moves out.

The core thread owns one `Elastic` and tells it what happens (arrivals, finished requests,
every stage task's compute time, queue gauges); every `interval_s` it asks for moves. The
decision itself is scheduler/controller.py, unchanged from the simulator:

    core events -> Feedback (rate, mix, queues, busy workers)          -> Stats
    StageDone     -> per (stage, device) samples -> fit_stage            -> Predictor
    Controller.step(now, placement, stats) -> moves -> EngineCore._start_moves

What the scheduler calls a device depends on how the engine was laid out:
- a device pool with a placement (pooled): the engine's devices themselves, each hosting a set
  of stages (one worker each). A move changes the set: a worker switches stage in its own
  process where one stage is traded for another, a worker starts where the set grows, one
  stops where it shrinks; a stage may come to a device that never ran it. A fused device is
  one worker running whole requests (stages/fused.py), so a move to or from fused is one
  switch plus the starts or stops left over (rebalance). Time-sharing is
  modelled as the planner does (a device serves its set at 1 / the sum of its stages' costs),
  and memory as auto placement estimates it (engine/auto_placement.py), so a device is never
  given more than it holds.
- the per-stage form: each worker is one scheduler device hosting one stage, and may only take
  a stage configured on its own device.
The cost model is refitted on the engine's own measurements (the same linear features `dfuse
profile` fits), so it needs no profile and follows the machine as it is: the runtime feedback
*is* the correction. A stage never measured on a device borrows the fit of a device of the same
kind (the same GPU model, the same number of cores), else of any device.
"""

from __future__ import annotations

import collections
import math
import time
from dataclasses import dataclass, field

from ..scheduler.controller import Controller, ControllerConfig
from ..scheduler.core import FUSED, FUSED_COMBO, STAGES, Device, Move, Placement, Shape, is_fused, stages_of
from ..scheduler.feedback import Feedback, FeedbackConfig
from ..scheduler.planner import Planner, PlannerConfig
from ..scheduler.predictor import DeviceSpec, Geometry, Predictor, StageSpec, fit_stage
from . import protocol as wire
from .devices import ROLES, device_cores, role_stages
from .checks import check_fields, checked, flag, integer, number, positive

_SECONDS = checked(positive(1e6, "a number of seconds"))


@dataclass(frozen=True)
class ElasticConfig:
    """How the elastic policy watches and decides (EngineConfig.elastic)."""

    interval_s: float = field(default=2.0, metadata=_SECONDS)
    """How often the controller looks at the statistics."""
    window_s: float = field(default=20.0, metadata=_SECONDS)
    """Arrival rate and request mix are measured over this sliding window."""
    min_arrivals: int = field(default=20, metadata=checked(integer(1, 100_000)))
    """No decision from fewer arrivals in the window (a mix from a handful of requests is noise)."""
    min_gain: float = field(default=0.1, metadata=checked(number(0, 10, high_open=True)))
    """A new placement must raise the bottleneck capacity by this fraction at least."""
    dwell_s: float = field(default=20.0, metadata=_SECONDS)
    """A moved worker stays in its new stage at least this long; no stage gets back, within
    this time, capacity a move took from it (no ping-pong)."""
    payback_s: float = field(default=60.0, metadata=_SECONDS)
    """The extra requests a move serves over this horizon must exceed those lost while it switches."""
    confirm_s: float = field(default=8.0, metadata=_SECONDS)
    """A gain must hold for the demand averaged over up to this long before it is acted on."""
    samples: int = field(default=200, metadata=checked(integer(2, 100_000)))
    """Recent compute times kept per (stage, device) for the cost model."""
    fused: bool = field(default=True, metadata=checked(flag()))
    """On a device pool, the controller (and placement="auto") may give a device the whole
    pipeline in one process (the fused role: no handoff) where that serves more than splitting it."""

    def __post_init__(self):
        check_fields(self, "elastic.")


def request_shape(params: wire.RequestParams, true_cfg: bool) -> Shape:
    """What a request costs depends on (scheduler/core.py Shape)."""
    if true_cfg:  # Flux: guidance is an embedding; only true CFG runs a second pass
        cfg = params.true_cfg_scale > 1 and params.negative_prompt is not None
    else:
        cfg = params.guidance_scale > 1
    frames = getattr(params, "num_frames", None) or 1
    return Shape(height=params.height, width=params.width, steps=params.num_inference_steps, frames=frames, cfg=cfg)


@dataclass(frozen=True)
class Rebalance:
    """What one elastic step asks of the engine, to be started together."""

    switches: list[tuple[int, str]] = field(default_factory=list)  # (worker id, its new stage)
    starts: list[tuple[str, str]] = field(default_factory=list)  # (device, stage): a new worker
    stops: list[int] = field(default_factory=list)  # workers that leave

    def __bool__(self) -> bool:
        return bool(self.switches or self.starts or self.stops)


@dataclass
class Elastic:
    """Owned by the core thread; no locks."""

    config: ElasticConfig
    devices: dict[int, str]  # worker id -> its device (at the start; pooled steps are told the current ones)
    stage_devices: dict[str, list[str]]  # stage -> the devices it may run on (its configured ones unless pooled)
    pooled: bool = False  # the scheduler's devices are the engine's devices (else its workers)
    device_kinds: dict[str, str] = field(default_factory=dict)  # device -> its kind (devices.device_kind)
    memory: tuple[dict[str, StageSpec], dict[str, float]] | None = None  # stage memory, device GB (pooled)
    true_cfg: bool = False
    decisions: list[dict] = field(default_factory=list)

    def __post_init__(self):
        c = self.config
        self.feedback = Feedback(FeedbackConfig(window_s=c.window_s, min_window_arrivals=c.min_arrivals,
                                                max_window_s=max(c.window_s, 10 * c.window_s),
                                                utilization_window_s=max(c.interval_s, c.window_s / 4)))
        self._samples: dict[tuple[str, str], collections.deque] = collections.defaultdict(
            lambda: collections.deque(maxlen=c.samples))
        self._switch_s = 1.0  # until one is measured: switches are in-process loads
        self._next_step = 0.0
        self._t0 = time.monotonic()  # decisions are reported in seconds since the engine started
        if self.pooled:
            units = list(dict.fromkeys(d for devices in self.stage_devices.values() for d in devices))
            planner = Planner(PlannerConfig(share="any", streaming=False, fused=c.fused))
        else:
            units = [str(w) for w in sorted(self.devices)]
            planner = Planner(PlannerConfig(share="none"))
        self._units = [Device(u, u if self.pooled else self.devices[int(u)]) for u in units]  # a unit's kind is its device
        self.controller = Controller(
            devices=self._units,
            predictor=self._predictor({}),
            planner=planner,
            config=ControllerConfig(
                interval_s=c.interval_s, min_gain=c.min_gain, dwell_s=c.dwell_s, payback_s=c.payback_s,
                drain_horizon_s=c.payback_s, confirm_s=c.confirm_s, min_arrivals=c.min_arrivals,
                use_corrections=False,  # the cost model is refitted on live samples instead
            ),
        )

    # --- what the engine core reports ---------------------------------------------------------------
    def arrival(self, now: float, params: wire.RequestParams) -> None:
        self.feedback.arrival(now, request_shape(params, self.true_cfg))

    def finished(self, now: float, params: wire.RequestParams) -> None:
        self.feedback.finished(now, request_shape(params, self.true_cfg))

    def computed(self, stage: str, device: str, params: wire.RequestParams, compute_s: float) -> None:
        if compute_s > 0:
            self._samples[stage, device].append((request_shape(params, self.true_cfg), compute_s))

    def switched(self, seconds: float) -> None:
        self._switch_s = 0.5 * self._switch_s + 0.5 * seconds

    # --- the decision ---------------------------------------------------------------------------
    def step(self, now: float, workers: dict[int, tuple[str, str]], queues: dict[str, int],
             busy: dict[str, int], lost: frozenset[str] = frozenset()) -> Rebalance:
        """What to start now, together; `workers` is every worker's (device, stage) (a moving one
        counted in its destination, a stopping one not at all), `busy` the workers computing per
        stage. `lost`: devices gone with their Ray nodes (engine/cluster.py), planned without
        until they are back: no stage counts on a worker there, and none is sent there."""
        workers = {w: (device, stage) for w, (device, stage) in workers.items() if device not in lost}
        self.controller.devices = [unit for unit in self._units if unit.kind not in lost]
        stages = {w: stage for w, (_, stage) in workers.items()}
        instances = collections.Counter(s for role in stages.values() for s in role_stages(role))
        self.feedback.gauge(now, queues, busy, instances)
        if now < self._next_step:
            return Rebalance()
        self._next_step = now + self.config.interval_s
        coefficients = self._fit()
        if coefficients is None:
            return Rebalance()  # some stage has no measurements yet: nothing to plan with
        self.controller.predictor = self._predictor(coefficients)
        if self.pooled:
            hosted: dict[str, set] = {unit.id: set() for unit in self.controller.devices}
            for device, stage in workers.values():
                hosted[device] |= FUSED_COMBO if stage == FUSED else {stage}
            placement = Placement(hosted)
        else:
            placement = Placement({str(w): frozenset((s,)) for w, s in stages.items()})
        stats = self.feedback.snapshot(now)
        before = len(self.controller.decisions)
        try:
            moves = self.controller.step(now, placement, stats)
        except ValueError as e:  # no placement of the devices left serves every stage (memory, lost nodes)
            self.decisions.append({"t_s": round(now - self._t0, 3), "current_rps": 0.0, "target_rps": 0.0,
                                   "reason": f"no plan: {e}"})
            return Rebalance()
        for d in self.controller.decisions[before:]:
            self.decisions.append({"t_s": round(d.t - self._t0, 3), "current_rps": round(d.current_rps, 3),
                                   "target_rps": round(d.target_rps, 3), "reason": d.reason})
        return self._as_rebalance(moves, workers)

    def _fit(self) -> dict[tuple[str, str], tuple] | None:
        """(stage, device) -> fitted cost, for every pair a worker may serve; None until every
        stage has been measured somewhere."""
        fits: dict[tuple[str, str], tuple] = {}
        for (stage, device), samples in self._samples.items():
            if len(samples) >= 3:
                fits[stage, device] = fit_stage(stage, list(samples), self._geometry)
        coefficients = {}
        for stage, devices in self.stage_devices.items():
            measured = [d for (s, d) in fits if s == stage]
            if not measured:
                return None
            for device in devices:
                if (stage, device) in fits:
                    coefficients[stage, device] = fits[stage, device]
                    continue
                alike = [d for d in measured if self.device_kinds.get(d) == self.device_kinds.get(device)]
                source = (alike or measured)[0]
                # Another kind of device: scaled by the estimate auto placement uses (cores; a GPU
                # as GPU_CORES, engine/devices.py), until this stage is measured here.
                scale = 1.0 if alike else device_cores(source) / device_cores(device)
                coefficients[stage, device] = tuple(c * scale for c in fits[stage, source])
        return coefficients

    _geometry = Geometry()  # only shapes the fitted features; the fit absorbs the model's own factors

    def _predictor(self, coefficients) -> Predictor:
        """Costs from the fit. Memory: the estimate a pooled engine is given (a device is never
        planned more stages than it holds); otherwise the admission check's business, so never
        binding here. In the per-stage form a worker may only host a stage configured on its
        device: only those have coefficients."""
        kinds = set(self.devices.values()) | {d for ds in self.stage_devices.values() for d in ds}  # a kind per device
        stages, memory = self.memory or ({s: StageSpec(weights_gb=0.0) for s in STAGES}, {})
        return Predictor(
            self._geometry, stages, {k: DeviceSpec(k, memory_gb=memory.get(k, math.inf)) for k in kinds},
            coefficients, process_start_s=self._switch_s,
        )

    def _as_rebalance(self, moves: list[Move], workers: dict[int, tuple[str, str]]) -> Rebalance:
        if not self.pooled:
            return Rebalance(switches=[(int(m.device), stage) for m in moves for stage in m.dst])
        return rebalance(moves, workers)


def rebalance(moves: list[Move], workers: dict[int, tuple[str, str]]) -> Rebalance:
    """Devices' new stage sets as worker operations: a worker of a role its device drops
    switches to a role it gains; gains left over start workers, drops left over stop them.
    A fused combo is one role (one worker). `workers`: each worker's (device, role)."""
    plan = Rebalance()
    for move in moves:
        src, dst = roles_of(move.src), roles_of(move.dst)
        leaving = sorted(w for w, (d, s) in workers.items() if d == move.device and s in src - dst)
        arriving = sorted(dst - src, key=ROLES.index)
        plan.switches.extend(zip(leaving, arriving))
        plan.starts.extend((move.device, stage) for stage in arriving[len(leaving):])
        plan.stops.extend(leaving[len(arriving):])
    return plan


def roles_of(combo) -> set[str]:
    """The workers a device hosting scheduler combo `combo` runs: one per stage, or one fused."""
    return {FUSED} if is_fused(combo) else set(stages_of(combo))


def combo_of(roles: set[str]) -> frozenset:
    """The scheduler combo of a device whose workers have these roles."""
    return FUSED_COMBO if FUSED in roles else frozenset(roles)
