"""Discrete-event simulator of a dfuse cluster on a virtual clock.

It plays the engine's part around the real scheduler objects: requests walk encoder -> DiT ->
decoder through per-stage queues; a router dispatches by predicted finish time (the scheduler's
predictor times the feedback's per-instance correction), holding a task back for a busy instance
only while it holds fewer than `max_inflight` (the engine's max_inflight_per_worker), so a
saturated cluster keeps its slow devices working, as the planner's capacity assumes; every
finished task is reported to the real `Feedback`; every `policy.interval_s` the policy (the real
`Controller` for dfuse) gets `step(now, placement, stats)` and its moves are carried out as the
launcher would: drain the device (finish the task in hand, take no new one), then start the new
stages, which costs the predicted load time of the weights it does not hold yet, then serve.
Nothing here decides placement.

Fused instances (combo FUSED_COMBO, see core and planner) run whole requests: after one stage
the same instance starts the next, with no handoff; it is free for a new request once the whole
one in hand is done. The monolithic baselines are every device fused. A fused instance takes new
requests from the encoder queue; it takes a request handed off mid-way (waiting for the DiT or
the decoder) only when no split instance is there or coming for that stage, which happens when a
cluster turns from split to fused with requests in flight (the engine instead starts such a
request over on a fused worker: its inputs stay in the leaving producer's slot, which must drain). Where fused and split encoders both
serve, a new request goes to the one predicted to *end* it first: a fused instance's end is its
free time + the whole request; a split encoder's is its free time + the encode + for each later
stage the work queued and in hand per split instance + the request on the fastest one (simple:
it ignores the work done during the encode, so it leans towards fused by at most one encode).

Truth vs belief: task durations come from `world`, a predictor standing for the real cluster
(biased against the scheduler's estimates, plus a slowdown per device and lognormal noise per
task); the scheduler only ever sees `predictor` and what `Feedback` learns.
"""

from __future__ import annotations

import collections
import heapq
import math
from dataclasses import dataclass, field
from typing import Mapping, Protocol, Sequence

from .core import STAGES, Device, Move, Placement, Stats, combo_label, is_fused, stages_of
from .feedback import Feedback
from .predictor import Predictor
from .workloads import Arrival, ClosedLoop

_ARRIVAL, _DONE, _LOADED, _TICK, _GAUGE = range(5)


class Policy(Protocol):
    """What the simulator (and later the engine) asks of a placement policy."""

    name: str
    interval_s: float | None  # how often `step` runs (None: never)

    def step(self, now: float, placement: Placement, stats: Stats) -> list[Move]: ...


@dataclass(frozen=True)
class SimConfig:
    noise_sigma: float = 0.05
    """Lognormal sigma of each task's duration around the world's latency (mean kept)."""
    handoff_s: float = 0.002
    """Control messages + tensor handoff per hop (refs only: size-independent, see FACTS)."""
    gauge_interval_s: float = 1.0
    drain_s: float = 0.0
    """After the last arrival, keep simulating this long for queued requests (they may still finish)."""
    timeline_interval_s: float = 10.0
    """Sampling period of the stage-allocation timeline."""
    max_inflight: int = 2
    """Tasks the router lets one instance hold, the one computing included (the engine's
    max_inflight_per_worker): a task is held back for a busy instance only while that instance
    has room, else it goes to an idle one, however slow."""

    def __post_init__(self):
        if isinstance(self.max_inflight, bool) or not isinstance(self.max_inflight, int) or self.max_inflight < 1:
            raise ValueError(f"SimConfig.max_inflight: must be an integer >= 1 (got {self.max_inflight!r})")


@dataclass
class SimResult:
    policy: str
    horizon_s: float
    end_s: float
    arrival_t: list[float]
    done_t: list[float]  # nan: not finished when the simulation stopped
    phase: list[int]
    shapes: list
    moves: list[tuple[float, str, str, str]]  # (t, device, from label, to label)
    timeline: list[tuple[float, dict[str, int]]]  # (t, {combo label or 'moving': devices})
    busy_s: dict[str, float] = field(default_factory=dict)  # device -> seconds computing


@dataclass
class _Instance:
    device: Device
    stages: frozenset
    target: frozenset
    slowdown: float
    state: str = "ready"  # ready | draining | loading
    busy_until: float = 0.0
    task: tuple | None = None  # (request index, stage, start time)
    busy_s: float = 0.0

    @property
    def idle(self) -> bool:
        return self.task is None

    @property
    def fused(self) -> bool:
        return is_fused(self.stages)


class Simulator:
    def __init__(self, devices: Sequence[Device], world: Predictor, predictor: Predictor, policy: Policy,
                 placement: Placement, feedback: Feedback | None = None, config: SimConfig | None = None,
                 slowdown: Mapping[str, float] | None = None, offload: bool = False, instant_moves: bool = False):
        """`offload`: weights that do not fit move diffusers-style instead of streaming overlapped
        (monolithic-offload); `instant_moves`: moves cost no load time (oracle)."""
        self.devices = list(devices)
        self.world, self.predictor, self.policy = world, predictor, policy
        self.feedback = feedback or Feedback()
        self.config = config or SimConfig()
        self.offload, self.instant_moves = offload, instant_moves
        slowdown = slowdown or {}
        self._inst = {
            d.id: _Instance(d, placement.assignment.get(d.id, frozenset()), placement.assignment.get(d.id, frozenset()),
                            slowdown.get(d.id, 1.0))
            for d in self.devices
        }
        self._queues = {s: collections.deque() for s in STAGES}
        self._events: list = []
        self._seq = 0
        self._predicted: dict = {}
        self._corrections: Mapping[tuple[str, str], float] = {}

    # 1. Main loop
    def run(self, arrivals: Sequence[Arrival] | ClosedLoop, horizon_s: float) -> SimResult:
        """Play `arrivals` (a fixed trace, or a closed loop of clients) until `horizon_s` plus the
        drain time, or until every request has finished."""
        c = self.config
        self._source = arrivals if isinstance(arrivals, ClosedLoop) else None
        initial = arrivals.initial() if self._source else list(arrivals)
        self._arrivals: list[Arrival] = []
        self._done_t: list[float] = []
        self._moves: list = []
        timeline: list = []
        for a in initial:
            self._push(a.t, _ARRIVAL, a)
        end = horizon_s + c.drain_s
        if self.policy.interval_s:
            self._push(self.policy.interval_s, _TICK, None)
        self._push(0.0, _GAUGE, None)
        self._pending = len(initial)  # requests not finished yet, including future arrivals
        handlers = {_ARRIVAL: self._on_arrival, _DONE: self._on_done, _LOADED: self._on_loaded,
                    _TICK: self._on_tick, _GAUGE: self._gauge}
        next_sample, now = 0.0, 0.0
        while self._events and self._pending:
            now = self._events[0][0]
            if now > end:
                break
            while next_sample <= now:
                timeline.append((next_sample, self._allocation()))
                next_sample += c.timeline_interval_s
            _, _, kind, payload = heapq.heappop(self._events)
            handlers[kind](payload, now)
        return SimResult(
            policy=self.policy.name, horizon_s=horizon_s, end_s=min(now, end),
            arrival_t=[a.t for a in self._arrivals], done_t=self._done_t, phase=[a.phase for a in self._arrivals],
            shapes=[a.shape for a in self._arrivals], moves=self._moves, timeline=timeline,
            busy_s={d: i.busy_s for d, i in self._inst.items()},
        )

    def _on_arrival(self, a: Arrival, now: float) -> None:
        index = len(self._arrivals)
        self._arrivals.append(a)
        self._done_t.append(math.nan)
        self.feedback.arrival(now, a.shape)
        self._queues["encoder"].append(index)
        self._dispatch("encoder", now)

    def _push(self, t: float, kind: int, payload) -> None:
        self._seq += 1
        heapq.heappush(self._events, (t, self._seq, kind, payload))

    # 2. Dispatch: the queue's head tasks go to the instances predicted to finish them first
    def _dispatch(self, stage: str, now: float) -> None:
        queue = self._queues[stage]
        if not queue:
            return
        candidates = [i for i in self._inst.values() if i.state == "ready" and stage in i.stages]
        if stage != STAGES[0] and any(stage in i.target and not is_fused(i.target) for i in self._inst.values()):
            candidates = [i for i in candidates if not i.fused]  # fused instances take new requests
        idle = [i for i in candidates if i.idle]
        if not idle:
            return
        free_at = {i.device.id: self._free_at(i, now) for i in candidates}
        held = {i.device.id: 0 if i.idle else 1 for i in candidates}
        # Fused and split encoders side by side: compare where the request ends, not where its encode does.
        mixed = any(i.fused for i in candidates) and not all(i.fused for i in candidates)
        backlog = self._split_backlog(now) if mixed else {}
        taken: list[int] = []
        for position in range(min(len(queue), 2 * len(candidates))):
            request = queue[position]
            shape = self._arrivals[request].shape
            rest = self._split_rest(shape, backlog) if mixed else 0.0
            best, best_t, best_end = None, math.inf, math.inf
            for i in candidates:
                if held[i.device.id] >= self.config.max_inflight:
                    continue
                finish = free_at[i.device.id] + self._predict(i, stage, shape)
                end = finish if i.fused else finish + rest
                if end < best_end:
                    best, best_t, best_end = i, finish, end
            if best is None:
                break  # none may take more (or none can finish it): the rest of the queue waits
            free_at[best.device.id] = best_t
            held[best.device.id] += 1
            if best.idle and best in idle:
                idle.remove(best)
                taken.append(position)
                self._start(best, request, stage, now)
                if not idle:
                    break
        for position in reversed(taken):
            del queue[position]

    def _free_at(self, inst: _Instance, now: float) -> float:
        """When `inst` can start a new task: a fused instance first finishes its whole request."""
        if inst.idle:
            return now
        request, stage, _ = inst.task
        after = STAGES[STAGES.index(stage) + 1:] if inst.fused else ()
        shape = self._arrivals[request].shape
        return inst.busy_until + sum(self._predict_stage(inst, s, shape) for s in after)

    def _split_backlog(self, now: float) -> dict[str, tuple[float, list[_Instance]]]:
        """Per stage after the encoder: (seconds of work queued and in hand per split instance, those
        instances). The wait is what the split path adds before a request encoded now reaches the
        stage; it ignores the work done meanwhile (an overestimate by at most one encode)."""
        out = {}
        for stage in STAGES[1:]:
            hosts = [i for i in self._inst.values() if i.state == "ready" and stage in i.stages and not i.fused]
            if not hosts:
                out[stage] = (math.inf, hosts)
                continue
            queued = sum(self._predict(h, stage, self._arrivals[r].shape) for r in self._queues[stage] for h in hosts)
            in_hand = sum(max(0.0, h.busy_until - now) for h in hosts if not h.idle)
            out[stage] = ((queued / len(hosts) + in_hand) / len(hosts), hosts)
        return out

    def _split_rest(self, shape, backlog: Mapping[str, tuple[float, list[_Instance]]]) -> float:
        """Seconds from a split encode's end to the request's end: per later stage, its backlog plus
        this request on the fastest of its split instances (no split instance: never)."""
        return sum(wait + min(self._predict(h, stage, shape) for h in hosts) if hosts else math.inf
                   for stage, (wait, hosts) in backlog.items())

    def _predict(self, inst: _Instance, stage: str, shape) -> float:
        """What the router believes a task of `stage` takes on `inst` (a fused instance: the request
        from `stage` to its end)."""
        if not inst.fused:
            return self._predict_stage(inst, stage, shape)
        return sum(self._predict_stage(inst, s, shape) for s in STAGES[STAGES.index(stage):])

    def _predict_stage(self, inst: _Instance, stage: str, shape) -> float:
        """The scheduler's predictor x the instance's learned correction for `stage`."""
        # A new instance has no history yet: it starts from its (stage, kind)'s correction.
        default = self._corrections.get((stage, inst.device.kind), 1.0)
        return self._base(inst, stage, shape) * self.feedback.correction((inst.device.id, stage), default)

    def _base(self, inst: _Instance, stage: str, shape) -> float:
        key = (stage, inst.device.kind, shape, inst.stages)
        value = self._predicted.get(key)
        if value is None:
            value = self.predictor.latency(stage, inst.device.kind, shape, inst.stages - {stage}, self.offload)
            self._predicted[key] = value
        return value

    def _start(self, inst: _Instance, request: int, stage: str, now: float) -> None:
        a = self._arrivals[request]
        world = self.world.latency(stage, inst.device.kind, a.shape, inst.stages - {stage}, self.offload)
        sigma = self.config.noise_sigma
        noise = math.exp(sigma * a.noise[STAGES.index(stage)] - sigma * sigma / 2)
        duration = world * inst.slowdown * noise
        inst.task = (request, stage, now)
        inst.busy_until = now + duration
        self._push(now + duration, _DONE, inst)

    # 3. Events
    def _on_done(self, inst: _Instance, now: float) -> None:
        request, stage, started = inst.task
        inst.task = None
        observed = now - started
        inst.busy_s += observed
        kind = inst.device.kind
        self.feedback.observe((inst.device.id, stage), stage, self._base(inst, stage, self._arrivals[request].shape),
                              observed, now, kind)
        finished = False
        index = STAGES.index(stage)
        if index == len(STAGES) - 1:
            finished = True
            self._finish(request, now + self.config.handoff_s)
        elif inst.fused:
            self._start(inst, request, STAGES[index + 1], now)  # the same process runs the next stage
            return
        else:
            nxt = STAGES[index + 1]
            self._queues[nxt].append(request)  # handoff delay is folded into the request latency
        if inst.state == "draining":
            self._begin_load(inst, now)
        else:
            for s in reversed(STAGES):  # downstream first: finish requests already far along
                if s in inst.stages:
                    self._dispatch(s, now)
        if not finished:
            self._dispatch(STAGES[index + 1], now)

    def _finish(self, request: int, t: float) -> None:
        a = self._arrivals[request]
        self._done_t[request] = t
        self._pending -= 1
        self.feedback.finished(t, a.shape)
        if self._source is not None:
            nxt = self._source.next(a, t)
            if nxt is not None:
                self._pending += 1
                self._push(t, _ARRIVAL, nxt)

    def _on_tick(self, _, now: float) -> None:
        self._push(now + self.policy.interval_s, _TICK, None)
        stats = self.feedback.snapshot(now)
        self._corrections = stats.corrections
        placement = Placement({d: i.target for d, i in self._inst.items()})
        for move in self.policy.step(now, placement, stats):
            inst = self._inst[move.device]
            if move.dst == inst.target:
                continue
            self._moves.append((now, move.device, combo_label(inst.target), combo_label(move.dst)))
            inst.target = move.dst
            if inst.state == "loading":
                continue  # it serves the new target once loaded
            if inst.idle:
                self._begin_load(inst, now)
            else:
                inst.state = "draining"

    def _begin_load(self, inst: _Instance, now: float) -> None:
        for stage in stages_of(inst.stages - inst.target):
            self.feedback.forget((inst.device.id, stage))
        # Only the weights not loaded yet cost time (load_s ignores the fused marker): fused -> T
        # keeps the DiT's, T -> fused loads the encoder's and the decoder's.
        load = 0.0 if self.instant_moves else self.world.load_s(inst.target - inst.stages, inst.device.kind)
        inst.state = "loading"
        inst.stages = inst.stages & inst.target  # stages kept stay loaded, but wait for the others
        self._push(now + load, _LOADED, inst)

    def _on_loaded(self, inst: _Instance, now: float) -> None:
        inst.stages = inst.target
        inst.state = "ready"
        for s in reversed(STAGES):
            if s in inst.stages:
                self._dispatch(s, now)

    def _gauge(self, _, now: float) -> None:
        self._push(now + self.config.gauge_interval_s, _GAUGE, None)
        queues = {s: len(q) for s, q in self._queues.items()}
        busy = {s: 0 for s in STAGES}
        count = {s: 0 for s in STAGES}
        for inst in self._inst.values():
            if inst.state != "ready" and inst.state != "draining":
                continue
            for s in stages_of(inst.stages):
                count[s] += 1
            if inst.task is not None:
                # A fused instance with a request in hand can take no other stage's task either.
                for s in (stages_of(inst.stages) if inst.fused else (inst.task[1],)):
                    busy[s] += 1
        self.feedback.gauge(now, queues, busy, count)

    def _allocation(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for inst in self._inst.values():
            label = "moving" if inst.state != "ready" else combo_label(inst.stages)
            out[label] = out.get(label, 0) + 1
        return out
