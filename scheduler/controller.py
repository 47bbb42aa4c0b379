"""Controller: every interval, decide whether moving devices between stages pays for itself.

    step(now, placement, stats) -> moves

1. Demand = the requests already in the system plus those expected over `payback_s` at the
   window's rate and mix (nothing before `min_arrivals`: a mix from a handful of requests is
   noise). After a shift under overload the backlog still holds the old mix: it is planned for.
2. Belief = the predictor corrected by the feedback's observed / predicted ratios.
3. Target = the planner's best placement, with devices moved less than `dwell_s` ago pinned, ties
   going to the fewest moves.
4. Move only if all hold:
   - hysteresis: the target's bottleneck capacity beats the current one by >= `min_gain` for the
     latest demand, and the gain is confirmed by the demand averaged over the steps of a recent
     horizon h: by >= min_gain * sqrt(confirm_s / h) for some h in confirm_s / (1, 4, 16)
     that the controller has watched. A big shift is confirmed within a few steps; a gain no
     larger than the noise of the mix estimate (which shrinks as 1 / sqrt(h)) never is;
   - no reversal: a move may not undo, for any stage, a capacity change made less than `dwell_s`
     ago (the per-device dwell alone is not enough: other devices could take turns flipping);
   - need: the current placement does not already cover the wanted capacity, i.e. the arrival rate
     at `target_utilization` plus the backlog drained over `drain_horizon_s`. Capacity nobody
     asks for is not worth a move: this is what keeps a lightly loaded cluster still, whatever
     its utilisation gauges do (the LightX2V flip-flop). A saturated cluster (a stage busier
     than `target_utilization` with more requests waiting than instances) admits only what it
     serves, so its arrival rate understates the need: then it wants current / target_utilization;
   - payback: the extra requests served over `payback_s` (from the moment the moved devices are
     ready) exceed the requests lost while they drain and load their new weights.

Moves are returned, not executed: the engine (or simulator) drains each device before switching.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from .core import STAGES, Demand, Device, Move, Placement, Stats, stages_of
from .planner import Planner
from .predictor import Predictor


@dataclass(frozen=True)
class ControllerConfig:
    interval_s: float = 15.0
    """How often step() is called."""
    min_gain: float = 0.05
    """Hysteresis: relative bottleneck-capacity gain a target must bring."""
    dwell_s: float = 600.0
    """A device moved less than this long ago stays where it is."""
    payback_s: float = 600.0
    """Horizon over which a move's extra throughput must repay what the move costs."""
    target_utilization: float = 0.8
    """Capacity wanted = arrival rate / this (+ backlog / drain_horizon_s)."""
    drain_horizon_s: float = 600.0
    confirm_s: float = 600.0
    """Longest confirmation horizon: a gain of min_gain must hold for the demand averaged over it."""
    min_arrivals: int = 20
    """No decision from fewer arrivals in the feedback window."""
    use_corrections: bool = True
    """Plan with the feedback's observed / predicted corrections (False: the predictor alone)."""

    def __post_init__(self):
        for name in ("interval_s", "dwell_s", "payback_s", "drain_horizon_s", "confirm_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"ControllerConfig.{name}: must be > 0")
        if not 0 <= self.min_gain < 10 or not 0 < self.target_utilization <= 1:
            raise ValueError("ControllerConfig: min_gain in [0, 10), target_utilization in (0, 1]")


@dataclass(frozen=True)
class Decision:
    """Why the controller did or did not move (kept for logs and plots)."""

    t: float
    current_rps: float
    target_rps: float
    wanted_rps: float
    moves: int
    reason: str


@dataclass
class Controller:
    devices: Sequence[Device]
    predictor: Predictor
    planner: Planner = field(default_factory=Planner)
    config: ControllerConfig = field(default_factory=ControllerConfig)
    name: str = "elastic"

    def __post_init__(self):
        self._last_move: dict[str, float] = {}
        self._recent_demand: collections.deque[tuple[float, Demand]] = collections.deque()
        self._changes: list[tuple[float, np.ndarray]] = []  # (t, capacity change per stage) of moves made
        self._kind = {d.id: d.kind for d in self.devices}
        self.decisions: list[Decision] = []

    @property
    def interval_s(self) -> float:
        return self.config.interval_s

    def initial(self, demand) -> Placement:
        """The placement to start with for an expected demand (before any feedback)."""
        return self.planner.plan(self.devices, demand, self.predictor).placement

    def step(self, now: float, placement: Placement, stats: Stats) -> list[Move]:
        c = self.config
        if not stats.mix or stats.arrivals < c.min_arrivals:
            return []
        demand = self.demand(stats)
        belief = self.predictor.corrected(stats.corrections) if c.use_corrections else self.predictor
        present = {d.id for d in self.devices}  # a device moved recently may have gone since (its node left)
        pinned = {d for d, t in self._last_move.items() if now - t < c.dwell_s and d in present}
        self._remember(now, demand)
        current, current_stages = self.planner.capacity(placement, self.devices, demand, belief)
        plan = self.planner.plan(self.devices, demand, belief, current=placement, pinned=pinned)
        backlog = sum(stats.queue_depths.values())
        wanted = stats.rate_rps / c.target_utilization + backlog / c.drain_horizon_s
        if self._saturated(placement, stats):
            wanted = max(wanted, current / c.target_utilization)

        def decide(reason: str, moves: list[Move]) -> list[Move]:
            self.decisions.append(Decision(now, current, plan.capacity_rps, wanted, len(moves), reason))
            return moves

        if plan.moves == 0:
            return []
        if plan.capacity_rps < current * (1 + c.min_gain):
            return decide("gain below hysteresis", [])
        if not self._confirmed(now, placement, plan.placement, belief):
            return decide("gain not confirmed by the averaged demand", [])
        change = np.array([plan.stage_capacity[s] - current_stages[s] for s in STAGES])
        if self._reverses(now, change):
            return decide("would reverse a recent move", [])
        gain = min(plan.capacity_rps, wanted) - min(current, wanted)
        if gain <= 0:
            return decide("current placement covers the demand", [])
        moves = placement.diff(plan.placement)
        lost, seconds = self._move_cost(placement, moves, demand, belief, current, wanted)
        if gain * (c.payback_s - seconds) <= lost:  # the gain starts once the moved devices are ready
            return decide("move does not pay back", [])
        for move in moves:
            self._last_move[move.device] = now
        self._changes.append((now, change / np.maximum(np.abs(change).max(), 1e-300)))
        return decide("move", moves)

    def _remember(self, now: float, demand: Demand) -> None:
        self._recent_demand.append((now, demand))
        while len(self._recent_demand) > 1 and self._recent_demand[1][0] <= now - self.config.confirm_s:
            self._recent_demand.popleft()  # keep one snapshot at or before the longest horizon

    def _confirmed(self, now: float, placement: Placement, target: Placement, belief: Predictor) -> bool:
        """Is the target better by min_gain * sqrt(confirm_s / h) for the demand averaged over some h?"""
        c = self.config
        watched = now - self._recent_demand[0][0]
        for h in (c.confirm_s / 16, c.confirm_s / 4, c.confirm_s):
            if h > watched + 1e-9:
                break
            work: dict = {}
            for t, d in self._recent_demand:
                if t >= now - h - 1e-9:
                    for shape, share in d.mix:
                        work[shape] = work.get(shape, 0.0) + share
            averaged = Demand.of(work)
            now_rps = self.planner.capacity(placement, self.devices, averaged, belief)[0]
            if now_rps <= 0:  # a stage has no device left (they went with their node): any plan serving it gains
                return self.planner.capacity(target, self.devices, averaged, belief)[0] > 0
            gain = self.planner.capacity(target, self.devices, averaged, belief)[0] / now_rps - 1
            if gain >= c.min_gain * (c.confirm_s / h) ** 0.5:
                return True
        return False

    def _reverses(self, now: float, change: np.ndarray) -> bool:
        """Does `change` take back capacity a recent move gave a stage, or give back what it took?"""
        self._changes = [(t, d) for t, d in self._changes if now - t < self.config.dwell_s]
        direction = change / max(np.abs(change).max(), 1e-300)
        significant = 0.05  # ignore stages a move barely touched
        return any(((d * direction < 0) & (np.abs(d) > significant) & (np.abs(direction) > significant)).any()
                   for _, d in self._changes)

    def _saturated(self, placement: Placement, stats: Stats) -> bool:
        counts = placement.counts()
        return any(
            stats.utilization.get(s, 0.0) >= self.config.target_utilization and stats.queue_depths.get(s, 0) > counts[s]
            for s in STAGES
        )

    def demand(self, stats: Stats) -> Demand:
        """In-system requests + arrivals expected over the payback horizon, as one mix."""
        work = {shape: share * stats.rate_rps * self.config.payback_s for shape, share in stats.mix}
        for shape, n in stats.in_system:
            work[shape] = work.get(shape, 0.0) + n
        return Demand.of(work, stats.rate_rps)

    def _move_cost(self, placement: Placement, moves: list[Move], demand, belief: Predictor,
                   current: float, wanted: float) -> tuple[float, float]:
        """(requests not served while the moved devices drain and load, seconds until they are ready)."""
        moved = {m.device for m in moves}
        remaining = Placement({d: s for d, s in placement.assignment.items() if d not in moved})
        if any(not remaining.instances(s) for s in STAGES):
            during = 0.0
        else:
            during, _ = self.planner.capacity(remaining, self.devices, demand, belief)
        seconds = 0.0
        for m in moves:
            kind = self._kind[m.device]
            # On average the task in hand is half done when the move is decided.
            # A fused device drains its request through every stage; load_s loads only the missing weights.
            src = frozenset(stages_of(m.src))
            drain = 0.5 * sum(w * belief.latency(s, kind, shape, src - {s}) for s in src for shape, w in demand.mix)
            seconds = max(seconds, drain + belief.load_s(frozenset(stages_of(m.dst)) - src, kind))
        return (min(current, wanted) - min(during, wanted)) * seconds, seconds
