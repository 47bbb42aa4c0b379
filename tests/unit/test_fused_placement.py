"""The fused role decided without processes: how placements name it and what they may not mix,
which moves to and from it the engine accepts, how a device's combo change becomes worker
operations, and where the router sends a new request when a fused worker and a split pipeline
both could take it."""

from types import SimpleNamespace

import pytest

from dfuse.engine.config import EngineConfig
from dfuse.engine.devices import parse_placement
from dfuse.engine.dispatch import fused_or_split
from dfuse.engine.elastic import rebalance
from dfuse.engine.state import Worker
from dfuse.engine.transport.slots import SlotPool
from dfuse.engine.worker_layout import check_moves
from dfuse.scheduler.core import FUSED, FUSED_COMBO, Move

SYNTHETIC = "synthetic:encoder=1ms"
POOL = ["cpu:0", "cpu:1"]


def _config(placement):
    return EngineConfig(model=SYNTHETIC, devices=POOL, placement=placement)


def _workers(config):
    return {i: Worker(i, stage, device, SlotPool(f"p{i}", 1, 3, segment=object()))
            for i, (device, stage) in enumerate(config.workers)}


def test_a_placement_names_the_fused_role_by_its_stages_or_its_alias():
    config = _config({"cpu:0": [FUSED], "cpu:1": ["fused"]})
    assert config.workers == (("cpu:0", FUSED), ("cpu:1", FUSED))
    assert config.devices_of("dit") == POOL  # a fused device runs every stage (memory admission, dtypes)
    assert parse_placement("cpu:0=fused,cpu:1=encoder+dit+decoder") == {
        "cpu:0": [FUSED], "cpu:1": ["encoder", "dit", "decoder"]}  # on the CLI "+" separates workers


def test_a_fused_worker_is_alone_on_its_device_and_a_split_pipeline_beside_it_is_whole():
    with pytest.raises(ValueError, match=r"placement \(cpu:0\): encoder\+dit\+decoder holds the whole pipeline"):
        _config({"cpu:0": [FUSED, "decoder"], "cpu:1": ["encoder", "dit"]})
    with pytest.raises(ValueError, match="no device hosts the decoder stage.*beside the encoder"):
        _config({"cpu:0": [FUSED], "cpu:1": ["encoder", "dit"]})
    with pytest.raises(ValueError, match="unknown stage 'vae'"):
        _config({"cpu:0": ["vae"]})


def test_the_split_pipeline_may_give_way_to_fused_workers_but_not_in_part():
    config = _config({"cpu:0": ["encoder", "decoder"], "cpu:1": ["dit"]})
    workers = _workers(config)
    ids = {(w.device, w.stage): w.id for w in workers.values()}
    # Every split worker leaves and both devices turn fused: requests inside the split pipeline start over.
    check_moves(workers, config, [(ids["cpu:1", "dit"], FUSED)], starts=[("cpu:0", FUSED)],
                stops=[ids["cpu:0", "encoder"], ids["cpu:0", "decoder"]])
    with pytest.raises(ValueError, match="last dit worker"):  # the encoder and decoder would stay, without a DiT
        check_moves(workers, config, [(ids["cpu:1", "dit"], FUSED)])
    with pytest.raises(ValueError, match="cpu:1 would host a encoder\\+dit\\+decoder worker beside others"):
        check_moves(workers, config, [], starts=[("cpu:1", FUSED)])


def test_the_per_stage_form_has_no_fused_role():
    config = EngineConfig(model=SYNTHETIC)
    with pytest.raises(ValueError, match="runs only on an engine on a device pool"):
        check_moves(_workers(config), config, [(1, FUSED)])


def test_a_device_turning_fused_or_split_becomes_one_switch_and_the_starts_or_stops_left():
    workers = {0: ("cpu:0", "encoder"), 1: ("cpu:0", "decoder"), 2: ("cpu:1", "dit")}
    to_fused = rebalance([Move("cpu:0", frozenset({"encoder", "decoder"}), FUSED_COMBO),
                          Move("cpu:1", frozenset({"dit"}), FUSED_COMBO)], workers)
    assert (to_fused.switches, to_fused.starts, to_fused.stops) == ([(0, FUSED), (2, FUSED)], [], [1])
    back = rebalance([Move("cpu:0", FUSED_COMBO, frozenset({"encoder", "decoder"}))], {0: ("cpu:0", FUSED)})
    assert (back.switches, back.starts, back.stops) == ([(0, "encoder")], [("cpu:0", "decoder")], [])


def _worker(task_s, tasks=0):
    return SimpleNamespace(task_s=task_s, batches=[set()] * tasks)


def test_a_new_request_goes_where_it_is_predicted_to_finish_first():
    fused, encoder = _worker(0.9), _worker(0.1)
    downstream = {"dit": [_worker(0.5)], "decoder": [_worker(0.2)]}
    assert fused_or_split(fused, encoder, downstream, {"dit": 0, "decoder": 0}) is encoder  # 0.8 s vs 0.9 s
    # Two requests already wait for the DiT: the split path would finish at 0.1 + 3 x 0.5 + 0.2.
    assert fused_or_split(fused, encoder, downstream, {"dit": 2, "decoder": 0}) is fused
    # A busy fused worker loses to an idle split pipeline.
    assert fused_or_split(_worker(0.7, tasks=1), encoder, downstream, {}) is encoder
    # The split pipeline has no DiT serving now (a move): the fused worker takes it.
    assert fused_or_split(fused, encoder, {"dit": [], "decoder": [_worker(0.2)]}, {}) is fused


def test_unmeasured_workers_borrow_the_measured_ones_speed():
    # The split stages are unmeasured: each is assumed a third of a measured fused request.
    fused, unmeasured = _worker(0.3), {"dit": [_worker(None)], "decoder": [_worker(None)]}
    assert fused_or_split(fused, _worker(None), unmeasured, {"dit": 3}) is fused  # 0.1 + 4 x 0.1 + 0.1 > 0.3
    encoder = _worker(None)
    assert fused_or_split(fused, encoder, unmeasured, {}) is encoder  # a tie: the split pipeline, free now
    # The fused worker is unmeasured: assumed the sum of the split stages' times.
    measured = {"dit": [_worker(0.2)], "decoder": [_worker(0.1)]}
    encoder = _worker(0.1)
    assert fused_or_split(_worker(None), encoder, measured, {}) is encoder  # 0.4 vs 0.4
    fused = _worker(None)
    assert fused_or_split(fused, encoder, measured, {"dit": 1}) is fused  # 0.4 vs 0.6


def test_a_fused_worker_is_offered_its_next_request_only_once_idle():
    # One shared queue for fused workers, as a monolithic pool keeps: a request is never held
    # behind another's whole pipeline while a second fused worker may free up first.
    from dfuse.engine.task_dispatch import TaskDispatch

    core = TaskDispatch()
    core.config = SimpleNamespace(max_inflight_per_worker=2, move_reserve=1)
    pool = SimpleNamespace(free=3)
    fused = SimpleNamespace(stage=FUSED, pool=pool, outbox=[], batches=[{1}])
    dit = SimpleNamespace(stage="dit", pool=pool, outbox=[], batches=[{1}])
    assert not core._can_take(fused)
    assert core._can_take(dit)  # a split worker gets its next task queued beside the one it computes
    fused.batches = []
    assert core._can_take(fused)
