"""Planner: exact on small clusters (checked against brute force), memory, pinning, ties, heuristic gap, fused."""

import random

import pytest
from conftest import cluster, make_predictor, random_predictor

from dfuse.scheduler.core import FUSED_COMBO, STAGES, Demand, Device, Placement, Shape, combo
from dfuse.scheduler.planner import Planner, PlannerConfig, brute_force
from dfuse.scheduler.predictor import StageSpec

IMAGE = Shape(1024, 1024, steps=28)
DRAFT = Shape(1024, 1024, steps=4)
HIRES = Shape(2048, 2048, steps=28, cfg=True)


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("share", ["light", "any", "none"])
def test_exact_plan_equals_brute_force_on_small_heterogeneous_clusters(share, fused):
    rng = random.Random(1234)  # seed printed by the parametrisation id on failure
    planner = Planner(PlannerConfig(share=share, fused=fused))
    for case in range(12):
        predictor = random_predictor(rng)
        kinds = rng.sample(["big", "small", "tiny"], rng.randint(1, 3))
        devices = [Device(f"d{i}", rng.choice(kinds)) for i in range(rng.randint(3, 6))]
        weights = {IMAGE: rng.random(), DRAFT: rng.random(), HIRES: rng.random() * 0.3}
        demand = Demand.of(weights)
        best = brute_force(planner, devices, demand, predictor)
        plan = planner.plan(devices, demand, predictor)
        assert plan.exact
        assert plan.capacity_rps == pytest.approx(best, rel=1e-9), f"case {case}: {plan.placement.summary(devices)}"
        # The reported capacity is the placement's own.
        assert planner.capacity(plan.placement, devices, demand, predictor)[0] == pytest.approx(plan.capacity_rps)


def test_light_stages_share_a_device_and_the_dit_gets_the_rest(predictor):
    devices = cluster(big=8)
    plan = Planner().plan(devices, Demand.of(IMAGE), predictor)
    counts = plan.placement.counts()
    assert counts["dit"] == 7 and counts["encoder"] == counts["decoder"] == 1
    assert plan.placement.summary() == "E+D x1 T x7"


def test_heterogeneous_plan_puts_the_dit_on_the_fast_devices(predictor):
    devices = cluster(big=2, small=4)
    plan = Planner().plan(devices, Demand.of(IMAGE), predictor)
    for device in devices:
        if device.kind == "big":
            assert plan.placement.assignment[device.id] == combo("dit")


def test_a_stage_too_big_for_a_device_streams_there_or_is_not_placed():
    big_dit = {**make_predictor().stages, "dit": StageSpec(weights_gb=30.0, act_fixed_gb=0.5)}
    predictor = make_predictor(stage_specs=big_dit)
    demand = Demand.of(IMAGE)
    assert predictor.fits(combo("dit"), "small", [IMAGE]) == "streamed"
    assert predictor.fits(combo("dit"), "small", [IMAGE], streaming=False) is None
    # Streaming costs max(compute, non-resident GB / link) per step: slower than resident.
    compute = predictor.compute_s("dit", "small", IMAGE)
    _, streamed_gb = predictor.transfer_gb("dit", "small", IMAGE)
    assert streamed_gb > 0
    expected = compute[0] + IMAGE.steps * max(compute[1], streamed_gb / 25)
    assert predictor.latency("dit", "small", IMAGE) == pytest.approx(expected)

    devices = cluster(small=4)
    no_stream = Planner(PlannerConfig(streaming=False))
    with pytest.raises(ValueError, match="no placement"):
        no_stream.plan(devices, demand, predictor)
    plan = Planner().plan(devices, demand, predictor)
    assert plan.placement.counts()["dit"] >= 1


def test_combos_that_do_not_fit_memory_are_never_chosen(predictor):
    # tiny (12 GB): encoder 10 GB + decoder activations do not fit together; the planner splits them.
    devices = cluster(big=1, tiny=4)
    plan = Planner().plan(devices, Demand.of(IMAGE), predictor)
    for device in devices:
        stages = plan.placement.assignment[device.id]
        assert predictor.fits(stages, device.kind, [IMAGE], streaming=True)
    assert combo("encoder", "decoder") not in Planner().combos("tiny", Demand.of(IMAGE), predictor)


def test_ties_keep_the_current_placement_and_pinned_devices_stay(predictor):
    devices = cluster(big=8)
    demand = Demand.of(IMAGE)
    planner = Planner()
    best = planner.plan(devices, demand, predictor)
    # Renaming nothing: planning again from the best placement moves nothing.
    again = planner.plan(devices, demand, predictor, current=best.placement)
    assert again.moves == 0 and again.placement == best.placement
    # A draft-heavy current placement, two of its devices pinned.
    current = Placement({d.id: (combo("encoder", "decoder") if i < 4 else combo("dit")) for i, d in enumerate(devices)})
    pinned = {"big-0", "big-1"}
    plan = planner.plan(devices, demand, predictor, current=current, pinned=pinned)
    assert all(plan.placement.assignment[d] == current.assignment[d] for d in pinned)
    assert plan.moves == len(current.diff(plan.placement))
    assert plan.capacity_rps <= best.capacity_rps + 1e-12


def test_heuristic_stays_close_to_exact_where_both_run():
    rng = random.Random(7)
    exact, heuristic = Planner(), Planner(PlannerConfig(exact_limit=0))
    gaps = []
    for _ in range(40):
        predictor = random_predictor(rng)
        kinds = rng.sample(["big", "small", "tiny"], rng.randint(2, 3))
        devices = [Device(f"d{i}", rng.choice(kinds)) for i in range(rng.randint(6, 16))]
        demand = Demand.of({IMAGE: rng.random(), DRAFT: rng.random()})
        best = exact.plan(devices, demand, predictor)
        found = heuristic.plan(devices, demand, predictor)
        assert best.exact and not found.exact
        assert found.capacity_rps <= best.capacity_rps * (1 + 1e-9)
        gaps.append(1 - found.capacity_rps / best.capacity_rps)
    print(f"heuristic gap over {len(gaps)} cases: mean {sum(gaps) / len(gaps):.4f}, max {max(gaps):.4f}")
    # A stated heuristic, not an exact one: small on average, a few cases need 5+ devices re-placed.
    assert sum(gaps) / len(gaps) < 0.01
    assert max(gaps) < 0.25


def test_large_clusters_use_the_heuristic(predictor):
    devices = cluster(big=12, small=12)
    plan = Planner().plan(devices, Demand.of(IMAGE), predictor)
    assert not plan.exact
    assert len(plan.placement.assignment) == 24
    assert plan.capacity_rps > 0


# Fused: a device running whole requests (PlannerConfig.fused)


def test_fused_is_off_by_default_and_replaces_the_three_process_combo(predictor):
    demand = Demand.of(IMAGE)
    assert FUSED_COMBO not in Planner().combos("big", demand, predictor)
    assert combo(*STAGES) in Planner(PlannerConfig(share="any")).combos("big", demand, predictor)
    fused_any = Planner(PlannerConfig(share="any", fused=True)).combos("big", demand, predictor)
    assert FUSED_COMBO in fused_any and combo(*STAGES) not in fused_any
    with pytest.raises(ValueError, match="fused"):
        PlannerConfig(fused="yes")


def test_all_fused_capacity_is_devices_over_the_summed_latencies(predictor):
    devices = cluster(big=3)
    placement = Placement({d.id: FUSED_COMBO for d in devices})
    demand = Demand.of({IMAGE: 0.5, DRAFT: 0.5})
    whole = sum(w * predictor.latency(s, "big", shape, combo(*STAGES) - {s}) for shape, w in demand.mix for s in STAGES)
    capacity, per_stage = Planner(PlannerConfig(fused=True)).capacity(placement, devices, demand, predictor)
    assert capacity == pytest.approx(3 / whole)
    assert per_stage == pytest.approx({s: 3 / whole for s in STAGES})


def test_fused_wins_on_alike_devices_where_everything_fits(predictor):
    devices = cluster(big=8)
    demand = Demand.of({IMAGE: 0.7, DRAFT: 0.3})
    split = Planner().plan(devices, demand, predictor)
    fused = Planner(PlannerConfig(fused=True)).plan(devices, demand, predictor)
    # No integer split of 8 devices over stages of unequal cost matches 8 devices each doing everything.
    assert fused.placement.summary() == "fused x8"
    assert fused.capacity_rps > split.capacity_rps


def test_a_split_where_the_cluster_or_memory_makes_splitting_pay():
    # Heterogeneous: the small devices' DiT is 3x slower still than their light stages; they serve
    # the light stages for the big device's DiT better than they run whole requests.
    predictor = make_predictor({("dit", "small"): 3.0})
    devices = cluster(big=1, small=4)
    demand = Demand.of(DRAFT)
    planner = Planner(PlannerConfig(fused=True))
    plan = planner.plan(devices, demand, predictor)
    all_fused = Placement({d.id: FUSED_COMBO for d in devices})
    assert plan.placement.summary(devices) == "big: T x1 | small: E+D x4"
    assert plan.capacity_rps > 1.2 * planner.capacity(all_fused, devices, demand, predictor)[0]
    # Memory: all the weights (32 GB) fit a "small" device (24 GB) only streamed, as the monolithic
    # baseline runs there; without streaming the small devices get the light stages instead.
    predictor, devices = make_predictor(), cluster(big=1, small=3)
    assert predictor.fits(FUSED_COMBO, "small", [DRAFT]) == "streamed"
    assert predictor.fits(FUSED_COMBO, "small", [DRAFT], streaming=False) is None
    assert planner.plan(devices, demand, predictor).placement.summary(devices) == "big: fused x1 | small: fused x3"
    no_stream = Planner(PlannerConfig(fused=True, streaming=False)).plan(devices, demand, predictor)
    assert no_stream.placement.summary(devices) == "big: T x1 | small: E+D x3"


def test_fused_and_split_devices_together_can_beat_both():
    predictor = make_predictor({("dit", "small"): 2.0})
    devices = cluster(big=4, small=4)
    demand = Demand.of(DRAFT)
    planner = Planner(PlannerConfig(fused=True))
    plan = planner.plan(devices, demand, predictor)
    all_fused = planner.capacity(Placement({d.id: FUSED_COMBO for d in devices}), devices, demand, predictor)[0]
    split = Planner().plan(devices, demand, predictor).capacity_rps
    # Three big devices run whole requests; the fourth's DiT is fed by the small devices' light stages.
    assert plan.placement.summary(devices) == "big: T x1 fused x3 | small: E+D x4"
    assert plan.capacity_rps > 1.04 * max(all_fused, split)
