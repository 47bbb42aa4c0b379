"""Moves on a device pool, decided without processes: which batches of worker moves, starts and
stops the engine accepts (engine/worker_layout.py check_moves), how the elastic policy turns a
device's new stage set into them, and what the pooled planner wants on alike devices."""

import pytest

from dfuse.engine import protocol as wire
from dfuse.engine.config import EngineConfig
from dfuse.engine.state import Worker
from dfuse.engine.transport.slots import SlotPool
from dfuse.engine.worker_layout import check_moves
from dfuse.engine.elastic import Elastic, ElasticConfig, rebalance
from dfuse.scheduler.core import FUSED, FUSED_COMBO, Demand, Move, Shape
from dfuse.scheduler.predictor import FEATURES

SPLIT = {"cpu:0": ["encoder", "decoder"], "cpu:1": ["dit"]}


def _workers(config: EngineConfig) -> dict[int, Worker]:
    # Host pools need no segment to check moves; a GPU pool (segment None) is what is refused.
    return {i: Worker(i, stage, device, SlotPool(f"p{i}", 1, 3, segment=object()))
            for i, (device, stage) in enumerate(config.workers)}


def _pooled():
    config = EngineConfig(model="synthetic:encoder=1ms", devices=["cpu:0", "cpu:1"], placement=SPLIT)
    workers = _workers(config)
    ids = {(w.device, w.stage): w.id for w in workers.values()}
    return config, workers, ids


def test_two_devices_may_swap_dit_and_decoder_though_each_is_the_last_of_its_stage():
    config, workers, ids = _pooled()
    check_moves(workers, config, [(ids["cpu:0", "decoder"], "dit"), (ids["cpu:1", "dit"], "decoder")])
    with pytest.raises(ValueError, match="last decoder worker"):
        check_moves(workers, config, [(ids["cpu:0", "decoder"], "dit")])  # alone it empties the decoder


def test_a_move_whose_outputs_would_have_no_reader_is_refused():
    config, workers, ids = _pooled()
    # The encoder becoming the DiT while the DiT becomes the encoder: the encoder's last outputs
    # would wait for a DiT that no longer exists.
    with pytest.raises(ValueError, match="encoder outputs would have no dit worker to read them"):
        check_moves(workers, config, [(ids["cpu:0", "encoder"], "dit"), (ids["cpu:1", "dit"], "encoder")])


def test_a_device_never_hosts_a_stage_twice_and_a_worker_moves_once():
    config, workers, ids = _pooled()
    with pytest.raises(ValueError, match="cpu:0 would host two encoder workers"):
        check_moves(workers, config, [(ids["cpu:0", "decoder"], "encoder")])
    with pytest.raises(ValueError, match="one move at a time"):
        check_moves(workers, config, [(ids["cpu:1", "dit"], "decoder"), (ids["cpu:1", "dit"], "encoder")])


def test_the_per_stage_form_keeps_moves_on_a_workers_own_device():
    config = EngineConfig(model="synthetic:encoder=1ms", devices={"encoder": "cpu:0", "dit": "cpu:1", "decoder": "cpu:0"},
                          instances={"encoder": 2, "dit": 1, "decoder": 1})
    workers = _workers(config)
    with pytest.raises(ValueError, match="only an engine on a device pool"):
        check_moves(workers, config, [(0, "dit")])
    check_moves(workers, config, [(0, "decoder")])  # the second encoder stays


def test_a_stop_or_a_start_is_checked_like_a_move():
    config, workers, ids = _pooled()
    check_moves(workers, config, [], starts=[("cpu:1", "decoder")], stops=[ids["cpu:0", "decoder"]])
    with pytest.raises(ValueError, match="last dit worker"):
        check_moves(workers, config, [], stops=[ids["cpu:1", "dit"]])
    with pytest.raises(ValueError, match="cpu:1 would host two dit workers"):
        check_moves(workers, config, [], starts=[("cpu:1", "dit")])


def _elastic(workers: dict[int, tuple[str, str]], **config) -> Elastic:
    return Elastic(ElasticConfig(**config), {w: d for w, (d, _) in workers.items()},
                   {s: ["cpu:0", "cpu:1"] for s in ("encoder", "dit", "decoder")}, pooled=True)


def test_a_devices_new_stage_set_becomes_switches_starts_and_stops():
    workers = {0: ("cpu:0", "encoder"), 1: ("cpu:1", "dit"), 2: ("cpu:0", "decoder")}
    grow = rebalance([Move("cpu:0", frozenset({"encoder", "decoder"}), frozenset({"encoder", "dit", "decoder"})),
                                  Move("cpu:1", frozenset({"dit"}), frozenset({"encoder", "dit", "decoder"}))], workers)
    assert (grow.switches, grow.starts, grow.stops) == ([], [("cpu:0", "dit"), ("cpu:1", "encoder"), ("cpu:1", "decoder")], [])
    shrink = rebalance([Move("cpu:0", frozenset({"encoder", "decoder"}), frozenset({"dit"}))], workers)
    assert (shrink.switches, shrink.starts, shrink.stops) == ([(0, "dit")], [], [2])


@pytest.mark.parametrize("fused, expected", [(True, FUSED_COMBO), (False, frozenset({"encoder", "dit", "decoder"}))])
def test_the_pooled_planner_serves_whole_requests_on_every_alike_device_with_room(fused, expected):
    # The time-sharing model: a device hosting every stage serves whole requests; two of them
    # beat any split of three stages over two devices (the split leaves a device idle). With the
    # fused role allowed (the default), one process runs them, with no handoff.
    workers = {0: ("cpu:0", "encoder"), 1: ("cpu:1", "dit"), 2: ("cpu:0", "decoder")}
    elastic = _elastic(workers, fused=fused)
    cost = {"encoder": 0.03, "dit": 0.45, "decoder": 0.05}
    coefficients = {(s, d): (c,) + (0.0,) * (len(FEATURES[s]) - 1) for s, c in cost.items() for d in ("cpu:0", "cpu:1")}
    predictor = elastic._predictor(coefficients)
    demand = Demand.of(Shape(height=128, width=128, steps=56))
    plan = elastic.controller.planner.plan(elastic.controller.devices, demand, predictor)
    assert dict(plan.placement.assignment) == {d: expected for d in ("cpu:0", "cpu:1")}


def _three_devices():
    """Devices on three Ray nodes (none is reached: only the moves are checked)."""
    config = EngineConfig(model="synthetic:encoder=1ms", cluster="ray", ray_address="127.0.0.1:6379",
                          devices=["a/cpu:0", "b/cpu:0", "c/cpu:0"],
                          placement={"a/cpu:0": ["encoder", "decoder"], "b/cpu:0": ["dit"], "c/cpu:0": ["dit"]})
    workers = _workers(config)
    return config, workers, {(w.device, w.stage): w.id for w in workers.values()}


def test_a_device_lost_with_its_node_takes_no_move_and_keeps_no_stage_served():
    config, workers, ids = _three_devices()
    with pytest.raises(ValueError, match="b/cpu:0 has left with its node"):
        check_moves(workers, config, [], starts=[("b/cpu:0", "encoder")], lost={"b/cpu:0"})
    with pytest.raises(ValueError, match="b/cpu:0 has left with its node"):
        check_moves(workers, config, [(ids["b/cpu:0", "dit"], "encoder")], lost={"b/cpu:0"})
    check_moves(workers, config, [(ids["c/cpu:0", "dit"], "encoder")])  # b's DiT stays ...
    with pytest.raises(ValueError, match="last dit worker"):  # ... unless it went with its node
        check_moves(workers, config, [(ids["c/cpu:0", "dit"], "encoder")], lost={"b/cpu:0"})
    # Every DiT lost: the live device may take the whole pipeline; the lost DiTs keep nothing split.
    check_moves(workers, config, [(ids["a/cpu:0", "encoder"], FUSED)], stops=[ids["a/cpu:0", "decoder"]],
                lost={"b/cpu:0", "c/cpu:0"})


def _fed_elastic(fused: bool, dwell_s: float = 1) -> Elastic:
    """An elastic policy over cpu:0 (encoder+decoder), cpu:1 and cpu:2 (a DiT each) that has
    measured every worker: requests arrive 10/s and the encoder is the bottleneck."""
    workers = {0: ("cpu:0", "encoder"), 1: ("cpu:1", "dit"), 2: ("cpu:2", "dit"), 3: ("cpu:0", "decoder")}
    devices = ["cpu:0", "cpu:1", "cpu:2"]
    elastic = Elastic(ElasticConfig(interval_s=1, min_arrivals=5, dwell_s=dwell_s, confirm_s=1, fused=fused),
                      {w: d for w, (d, _) in workers.items()}, {s: devices for s in ("encoder", "dit", "decoder")},
                      pooled=True)
    params = wire.RequestParams("a prompt", None, 4, 1.0, 64, 64, 1)
    cost = {"encoder": 0.5, "dit": 0.05, "decoder": 0.05}
    for i in range(30):
        elastic.arrival(i / 10, params)
        for device, stage in workers.values():
            elastic.computed(stage, device, params, cost[stage])
        elastic.finished(i / 10, params)
    return elastic, workers


def _plan(elastic, workers, lost):
    for tick in range(30):  # one step a second, until the controller moves (its confirmation takes a few)
        plan = elastic.step(3 + tick, workers, {"encoder": 10, "dit": 0, "decoder": 0}, {"encoder": 1}, lost)
        if plan:
            return plan
    raise AssertionError(f"no move: {elastic.decisions[-3:]}")


@pytest.mark.parametrize("fused", [True, False])
def test_the_elastic_policy_plans_without_devices_lost_with_their_node(fused):
    for lost in ({"cpu:1"}, {"cpu:1", "cpu:2"}):  # a DiT left; every DiT left
        elastic, workers = _fed_elastic(fused)
        plan = _plan(elastic, workers, frozenset(lost))
        touched = {workers[w][0] for w, _ in plan.switches} | {d for d, _ in plan.starts} | {workers[w][0] for w in plan.stops}
        assert not touched & lost, plan
        stages = {w: s for w, (d, s) in workers.items() if d not in lost and w not in plan.stops} | dict(plan.switches)
        hosted = set(stages.values()) | {s for _, s in plan.starts}
        assert hosted >= {"encoder", "dit", "decoder"} or FUSED in hosted, plan  # what is left serves every stage


def test_with_every_device_lost_the_elastic_policy_plans_nothing_and_says_why():
    elastic, workers = _fed_elastic(fused=True)
    everything = frozenset({"cpu:0", "cpu:1", "cpu:2"})
    for tick in range(5):
        assert not elastic.step(3 + tick, workers, {"encoder": 10, "dit": 0, "decoder": 0}, {}, everything)
    assert elastic.decisions[-1]["reason"].startswith("no plan: "), elastic.decisions[-1]


def test_a_device_lost_soon_after_the_policy_moved_it_is_planned_without():
    elastic, workers = _fed_elastic(fused=True, dwell_s=20)  # a moved device stays put 20 s
    queues, busy = {"encoder": 10, "dit": 0, "decoder": 0}, {"encoder": 1}
    now = 3
    while not (plan := elastic.step(now, workers, queues, busy)):
        now += 1
        assert now < 30, elastic.decisions[-3:]
    assert "cpu:1" in {workers[w][0] for w, _ in plan.switches}, plan
    for tick in range(1, 4):  # cpu:1's node leaves within those 20 s: planned without (no crash), not pinned
        plan = elastic.step(now + tick, workers, queues, busy, frozenset({"cpu:1"}))
        assert "cpu:1" not in {workers[w][0] for w, _ in plan.switches} | {d for d, _ in plan.starts}, plan
