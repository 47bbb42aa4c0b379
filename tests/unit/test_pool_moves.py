"""Moves on a device pool, decided without processes: which batches of worker moves the engine
accepts (engine/worker_layout.py check_moves), and what the planner offers a device whose
number of workers is fixed (scheduler/planner.py combo_sizes)."""

import pytest

from dfuse.engine.config import EngineConfig
from dfuse.engine.state import Worker
from dfuse.engine.transport.slots import SlotPool
from dfuse.engine.worker_layout import check_moves
from dfuse.scheduler.core import Demand, Device, Placement, Shape
from dfuse.scheduler.planner import Planner, PlannerConfig
from dfuse.scheduler.predictor import FEATURES, DeviceSpec, Geometry, Predictor, StageSpec

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


def test_the_planner_keeps_a_devices_combo_size_and_swaps_roles_when_the_decoder_dominates():
    # Two alike one-core devices, 2 workers on cpu:0 and 1 on cpu:1; fixed costs per request.
    cost = {"encoder": 0.04, "dit": 0.04, "decoder": 0.12}
    predictor = Predictor(
        Geometry(), {s: StageSpec(weights_gb=0.0) for s in cost},
        {d: DeviceSpec(d, memory_gb=float("inf")) for d in ("cpu:0", "cpu:1")},
        {(s, d): (c,) + (0.0,) * (len(FEATURES[s]) - 1) for s, c in cost.items() for d in ("cpu:0", "cpu:1")},
    )
    planner = Planner(PlannerConfig(share="none", combo_sizes={"cpu:0": 2, "cpu:1": 1}))
    devices = [Device("cpu:0", "cpu:0"), Device("cpu:1", "cpu:1")]
    demand = Demand.of(Shape(height=128, width=128, steps=1))
    current = Placement({"cpu:0": {"encoder", "decoder"}, "cpu:1": {"dit"}})
    assert all(len(c) == 2 for c in planner.combos("cpu:0", demand, predictor))
    plan = planner.plan(devices, demand, predictor, current)
    assert dict(plan.placement.assignment) == {"cpu:0": frozenset({"encoder", "dit"}), "cpu:1": frozenset({"decoder"})}
    assert plan.moves == 2
