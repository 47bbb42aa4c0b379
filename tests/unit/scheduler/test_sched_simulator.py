"""Simulator: no request lost across moves, drain before switch, fused devices, closed-loop mode."""

import dataclasses
import math

from conftest import cluster, make_predictor

from dfuse.scheduler.controller import Controller
from dfuse.scheduler.core import FUSED_COMBO, STAGES, Demand, Move, Placement, Shape, combo
from dfuse.scheduler.feedback import Feedback
from dfuse.scheduler.planner import Planner, PlannerConfig
from dfuse.scheduler.policies import StaticPolicy
from dfuse.scheduler.simulator import SimConfig, Simulator
from dfuse.scheduler.workloads import ClosedLoop, Phase, generate

DRAFT = Shape(1024, 1024, steps=4)
RENDER = Shape(1024, 1024, steps=50, cfg=True)
DEVICES = cluster(big=4)
SPLIT = Placement({"big-0": combo("encoder", "decoder"), "big-1": combo("dit"), "big-2": combo("dit"),
                   "big-3": combo("dit")})


class MoveOnce:
    """Moves `devices` (default big-1, from the DiT) to `dst` (default the decoder) at `at`; a busy
    device must drain first."""

    name = "move-once"
    interval_s = 5.0

    def __init__(self, at, devices=("big-1",), dst=combo("decoder")):
        self.at, self.devices, self.dst, self.done = at, devices, dst, False

    def step(self, now, placement, stats):
        if now >= self.at and not self.done:
            self.done = True
            return [Move(d, placement.assignment[d], self.dst) for d in self.devices]
        return []


def run(policy, arrivals, placement=SPLIT, devices=DEVICES, predictor=None, **kw):
    predictor = predictor or make_predictor()
    sim = Simulator(devices, predictor, predictor, policy, placement, Feedback(), SimConfig(drain_s=7200.0), **kw)
    return sim.run(arrivals, 3600.0)


def all_finished_once(result, arrivals) -> bool:
    return (len(result.done_t) == len(arrivals) and not any(math.isnan(d) for d in result.done_t)
            and all(d > a for a, d in zip(result.arrival_t, result.done_t)))


def test_every_request_finishes_once_across_a_move():
    arrivals = generate([Phase("p", 3600.0, ((DRAFT, 0.5), (RENDER, 0.5)))], [0.05], seed=1)
    result = run(MoveOnce(at=600.0), arrivals)
    assert len(result.done_t) == len(arrivals) and not any(math.isnan(d) for d in result.done_t)
    assert all(d > a for a, d in zip(result.arrival_t, result.done_t))
    assert [m[1:] for m in result.moves] == [("big-1", "T", "D")]
    after = [alloc for t, alloc in result.timeline if t >= 700.0]
    assert after and all(alloc == {"E+D": 1, "T": 2, "D": 1} for alloc in after)


def test_a_busy_device_finishes_its_task_before_it_switches():
    predictor = make_predictor()
    one = generate([Phase("p", 1.0, ((RENDER, 1.0),))], [50.0], seed=0)[:1]
    later = generate([Phase("q", 1.0, ((DRAFT, 1.0),))], [50.0], seed=0)[:1]  # keeps the clock running
    later = [dataclasses.replace(later[0], id=1, t=60.0)]
    sim = Simulator(DEVICES, predictor, predictor, MoveOnce(at=5.0), SPLIT, Feedback(),
                    SimConfig(drain_s=600.0, timeline_interval_s=1.0, noise_sigma=0.0))
    result = sim.run(one + later, 61.0)
    dit_s = predictor.latency("dit", "big", RENDER)
    load_s = predictor.load_s(combo("decoder"), "big")
    moving = [t for t, alloc in result.timeline if alloc.get("moving")]
    assert not any(math.isnan(d) for d in result.done_t)
    # big-1 took the DiT task at once; asked to move at 5 s, it drains until the task ends, then loads.
    assert moving[0] == 5.0 or moving[0] == 6.0
    assert moving[-1] == math.floor(one[0].t + predictor.latency("encoder", "big", RENDER, combo("decoder"))
                                    + dit_s + load_s)


def test_same_seed_same_result():
    arrivals = generate([Phase("p", 1800.0, ((DRAFT, 0.7), (RENDER, 0.3)))], [0.1], seed=2)
    first, second = run(StaticPolicy(), arrivals), run(StaticPolicy(), arrivals)
    assert first.done_t == second.done_t


def test_fused_devices_run_whole_requests():
    every = frozenset(STAGES)
    arrivals = generate([Phase("p", 600.0, ((DRAFT, 1.0),))], [0.01], seed=3)
    result = run(StaticPolicy(name="monolithic"), arrivals, placement=Placement({d.id: FUSED_COMBO for d in DEVICES}))
    predictor = make_predictor()
    alone = sum(predictor.latency(s, "big", DRAFT, every - {s}) for s in STAGES)
    latencies = [d - a for a, d in zip(result.arrival_t, result.done_t)]
    # Light load: each request runs alone on one device, all three stages back to back (+/- noise).
    assert latencies and all(abs(x / alone - 1) < 0.25 for x in latencies)


def test_closed_loop_keeps_at_most_one_request_per_client_in_flight():
    loop = ClosedLoop([Phase("p", 1200.0, ((DRAFT, 1.0),))], clients=6, seed=4)
    result = run(StaticPolicy(), loop)
    events = sorted([(a, 1) for a in result.arrival_t] + [(d, -1) for d in result.done_t if not math.isnan(d)])
    inflight, peak = 0, 0
    for _, step in events:
        inflight += step
        peak = max(peak, inflight)
    assert peak <= 6 and len(result.arrival_t) > 6


def test_the_simulator_drives_the_real_controller():
    predictor = make_predictor()
    controller = Controller(DEVICES, predictor)
    draft_split = Planner().plan(DEVICES, Demand.of(DRAFT), predictor).placement
    arrivals = generate([Phase("drafts", 600.0, ((DRAFT, 1.0),)), Phase("renders", 3000.0, ((RENDER, 1.0),))],
                        [1.0, 0.2], seed=5)
    result = run(controller, arrivals, placement=draft_split)
    made = sum(d.moves for d in controller.decisions if d.reason == "move")
    assert made == len(result.moves) >= 1
    assert all(t >= 600.0 for t, *_ in result.moves)  # it moved for the renders, not before


FUSED_ALL = Placement({d.id: FUSED_COMBO for d in DEVICES})


def test_a_cluster_turns_fused_and_back_with_requests_in_flight():
    # Split -> fused at 600 s: requests already waiting for the DiT or the decoder have no split
    # instance left, so the fused instances finish them.
    arrivals = generate([Phase("p", 3600.0, ((DRAFT, 0.5), (RENDER, 0.5)))], [0.3], seed=6)
    devices = [d.id for d in DEVICES]
    result = run(MoveOnce(600.0, devices, FUSED_COMBO), arrivals)
    assert all_finished_once(result, arrivals)
    assert sorted(m[1:] for m in result.moves) == [("big-0", "E+D", "fused")] + [(d, "T", "fused") for d in devices[1:]]
    assert all(alloc == {"fused": 4} for t, alloc in result.timeline if t >= 900.0)
    # Fused -> split: each device finishes the whole request in hand before it switches.
    result = run(MoveOnce(600.0, devices[1:], combo("dit")), arrivals, placement=FUSED_ALL)
    assert all_finished_once(result, arrivals)
    assert all(alloc == {"fused": 1, "T": 3} for t, alloc in result.timeline if t >= 900.0)


def test_turning_fused_loads_only_the_weights_not_there_yet():
    predictor = make_predictor()
    one = generate([Phase("p", 1.0, ((DRAFT, 1.0),))], [50.0], seed=0)[:1]
    later = [dataclasses.replace(one[0], id=1, t=120.0)]  # keeps the clock running
    loading = {}
    for start, dst in ((SPLIT, FUSED_COMBO), (FUSED_ALL, combo("dit"))):
        sim = Simulator(DEVICES, predictor, predictor, MoveOnce(at=50.0, dst=dst), start, Feedback(),
                        SimConfig(drain_s=600.0, timeline_interval_s=0.5, noise_sigma=0.0))
        result = sim.run(one + later, 121.0)
        assert all_finished_once(result, one + later)
        loading[dst] = 0.5 * sum(1 for _, alloc in result.timeline if alloc.get("moving"))
    # T -> fused loads the encoder's and the decoder's weights (a process start + 10.2 GB); fused -> T
    # keeps the DiT's: nothing to load.
    assert abs(loading[FUSED_COMBO] - predictor.load_s(combo("encoder", "decoder"), "big")) <= 0.5
    assert loading[combo("dit")] == 0.0


def test_mixed_cluster_sends_each_request_where_it_ends_first():
    # One fast fused device beside a slow split path (small devices: 6x slower).
    devices = cluster(big=1, small=2)
    placement = Placement({"big-0": FUSED_COMBO, "small-0": combo("encoder", "decoder"), "small-1": combo("dit")})
    light = generate([Phase("p", 3600.0, ((DRAFT, 1.0),))], [0.02], seed=7)
    result = run(StaticPolicy(), light, placement=placement, devices=devices)
    assert all_finished_once(result, light)
    # Light load: the fused device is free and ends every request first; the slow path idles.
    assert result.busy_s["small-0"] == result.busy_s["small-1"] == 0.0
    # A burst: the fused device holds at most SimConfig.max_inflight; the split path takes the rest.
    burst = [dataclasses.replace(a, t=0.0) for a in light[:30]]
    result = run(StaticPolicy(), burst, placement=placement, devices=devices)
    assert all_finished_once(result, burst)
    assert result.busy_s["small-1"] > 0 and result.busy_s["big-0"] > result.busy_s["small-1"] / 6


def test_a_controller_allowed_fused_turns_alike_devices_fused():
    predictor = make_predictor()
    controller = Controller(DEVICES, predictor, Planner(PlannerConfig(fused=True)))
    arrivals = generate([Phase("drafts", 3600.0, ((DRAFT, 1.0),))], [1.5], seed=8)
    result = run(controller, arrivals)  # from a render split: E+D x1 T x3
    assert all_finished_once(result, arrivals)
    assert result.moves and all(m[3] == "fused" for m in result.moves)
    assert result.timeline[-1][1] == {"fused": 4}


def test_a_saturated_cluster_keeps_its_slow_devices_busy():
    # The planner's capacity counts every device; the router holds at most max_inflight tasks for a
    # busy fast device (as the engine does), so slow ones work too instead of idling beside a queue.
    devices = cluster(big=2, small=2)
    loop = ClosedLoop([Phase("p", 1800.0, ((DRAFT, 1.0),))], clients=12, seed=9)
    predictor = make_predictor()
    sim = Simulator(devices, predictor, predictor, StaticPolicy(), Placement({d.id: FUSED_COMBO for d in devices}),
                    Feedback(), SimConfig())
    result = sim.run(loop, 1800.0)
    assert all(busy / result.end_s > 0.9 for busy in result.busy_s.values()), result.busy_s
