"""Baseline placement policies compared with dfuse's Controller (same `step` interface).

- StaticPolicy: never moves (the best fixed split for the first phase, or monolithic devices).
- OraclePolicy: knows the phase schedule and the true costs; switches to each phase's best
  placement at the phase's start (the simulator makes its moves free: the upper bound).
- ThresholdPolicy: LightX2V's disaggregated autoscaler rule, as published: a stage whose
  instances are > 80 % busy or that has > 2 requests pending scales out; one < 20 % busy with
  an empty queue scales in; 30 s cooldown per stage. On a fixed set of devices, scaling in
  returns the device to a free pool and scaling out takes one from it.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field
from typing import Sequence

from .core import STAGES, Demand, Device, Move, Placement, Stats
from .predictor import Predictor


@dataclass
class StaticPolicy:
    name: str = "static"
    interval_s: float | None = None

    def step(self, now: float, placement: Placement, stats: Stats) -> list[Move]:
        return []


@dataclass
class OraclePolicy:
    """Switch to `placements[i]` at `starts[i]` (phase starts, seconds)."""

    starts: Sequence[float]
    placements: Sequence[Placement]
    name: str = "oracle"
    interval_s: float = 1.0

    def step(self, now: float, placement: Placement, stats: Stats) -> list[Move]:
        phase = max(0, bisect.bisect_right(list(self.starts), now) - 1)
        return placement.diff(self.placements[phase])


@dataclass(frozen=True)
class ThresholdConfig:
    high_utilization: float = 0.8
    high_pending: int = 2
    low_utilization: float = 0.2
    cooldown_s: float = 30.0
    interval_s: float = 5.0


@dataclass
class ThresholdPolicy:
    devices: Sequence[Device]
    predictor: Predictor
    """Only for memory: a stage is started only on a device it fits."""
    demand: Demand
    """Shapes whose memory must fit (the scenario's shapes)."""
    config: ThresholdConfig = field(default_factory=ThresholdConfig)
    name: str = "threshold"

    def __post_init__(self):
        self._last_action: dict[str, float] = {}
        self._kind = {d.id: d.kind for d in self.devices}
        self._shapes = [s for s, _ in self.demand.mix]

    @property
    def interval_s(self) -> float:
        return self.config.interval_s

    def step(self, now: float, placement: Placement, stats: Stats) -> list[Move]:
        c = self.config
        assignment = dict(placement.assignment)
        moves: list[Move] = []

        def cooled(stage: str) -> bool:
            return now - self._last_action.get(stage, -1e18) >= c.cooldown_s

        def apply(device: str, stages: frozenset, stage: str) -> None:
            moves.append(Move(device, assignment[device], stages))
            assignment[device] = stages
            self._last_action[stage] = now

        for stage in STAGES:  # scale in: release the least useful instance to the free pool
            hosts = [d for d, s in sorted(assignment.items()) if stage in s]
            util = stats.utilization.get(stage, 0.0)
            if len(hosts) > 1 and util < c.low_utilization and stats.queue_depths.get(stage, 0) == 0 and cooled(stage):
                device = hosts[-1]
                apply(device, assignment[device] - {stage}, stage)
        for stage in STAGES:  # scale out: take a free device that can host the stage
            util = stats.utilization.get(stage, 0.0)
            hot = util > c.high_utilization or stats.queue_depths.get(stage, 0) > c.high_pending
            if not hot or not cooled(stage):
                continue
            free = [d for d, s in sorted(assignment.items()) if not s]
            fitting = [d for d in free if self.predictor.fits(frozenset((stage,)), self._kind[d], self._shapes)]
            if fitting:
                apply(fitting[0], frozenset((stage,)), stage)
        return moves
