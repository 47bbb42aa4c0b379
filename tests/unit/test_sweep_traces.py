"""The sweep's arrival traces: mean rates, same seed -> same trace, the shift trace's three phases
moving the synthetic model's bottleneck, burstiness; the rate/mode lists' errors."""

import math

import pytest

from dfuse.bench.sweep.traces import (MODES, TRACES, interarrival_cv, kind_of, make_trace, parse_modes, parse_rates,
                                      trace_kinds, trace_phases)
from dfuse.engine.protocol import RequestParams
from dfuse.stages.families.synthetic import SyntheticFamily

STEPS, SIZE = 4, 64


def within(count, expected, sigmas=5):
    return abs(count - expected) <= sigmas * math.sqrt(expected)


@pytest.mark.parametrize("trace", ["poisson", "shift"])
@pytest.mark.parametrize("rate", [0.5, 4.0])
def test_poisson_traces_arrive_at_the_given_rate(trace, rate):
    arrivals = make_trace(trace, rate, 3000.0, STEPS, SIZE, seed=1)
    assert within(len(arrivals), rate * 3000)
    assert all(0 <= a.t < 3000 for a in arrivals)
    assert all(x.t <= y.t for x, y in zip(arrivals, arrivals[1:]))
    assert interarrival_cv(arrivals) == pytest.approx(1.0, abs=0.1)  # exponential gaps


def test_bursty_keeps_the_mean_rate_but_clumps_arrivals():
    bursty = make_trace("bursty", 2.0, 20000.0, STEPS, SIZE, seed=2)
    poisson = make_trace("poisson", 2.0, 20000.0, STEPS, SIZE, seed=2)
    assert len(bursty) == pytest.approx(40000, rel=0.05)
    assert interarrival_cv(bursty) > 1.5 > interarrival_cv(poisson)


@pytest.mark.parametrize("trace", TRACES)
def test_the_seed_fixes_the_trace(trace):
    first = make_trace(trace, 3.0, 60.0, STEPS, SIZE, seed=7)
    again = make_trace(trace, 3.0, 60.0, STEPS, SIZE, seed=7)
    other = make_trace(trace, 3.0, 60.0, STEPS, SIZE, seed=8)
    assert [(a.t, a.shape) for a in first] == [(a.t, a.shape) for a in again]
    assert [a.t for a in first] != [a.t for a in other]


def test_shift_runs_three_phases_of_one_kind_each():
    kinds = trace_kinds("shift", STEPS, SIZE)
    phases = trace_phases("shift", 90.0, STEPS, SIZE)
    assert [p.name for p in phases] == list(kinds) == ["few-step", "many-step", "large"]
    assert [p.duration_s for p in phases] == [30.0, 30.0, 30.0]
    arrivals = make_trace("shift", 5.0, 90.0, STEPS, SIZE, seed=3)
    for index, name in enumerate(kinds):
        mine = [a for a in arrivals if a.phase == index]
        assert mine and {kind_of(a, kinds) for a in mine} == {name}
        assert all(30 * index <= a.t < 30 * (index + 1) for a in mine)
    few, many, large = kinds.values()
    assert few.steps < STEPS < many.steps and (large.height, large.width) == (2 * SIZE, 2 * SIZE)


def test_shift_moves_the_synthetic_models_bottleneck():
    """With the costs of the committed sweep: decoder-bound, then DiT-bound, then decoder-bound again."""
    family = SyntheticFamily("synthetic:encoder=20ms,dit=60ms,decoder=40ms,mode=sleep")
    bottlenecks = []
    for shape in trace_kinds("shift", STEPS, SIZE).values():
        params = RequestParams("x", None, shape.steps, 1.0, shape.height, shape.width, 0)
        costs = {stage: family.cost(stage, params) for stage in ("encoder", "dit", "decoder")}
        bottlenecks.append(max(costs, key=costs.get))
    assert bottlenecks == ["decoder", "dit", "decoder"]


def test_one_kind_for_poisson_and_bursty():
    for trace in ("poisson", "bursty"):
        kinds = trace_kinds(trace, STEPS, SIZE)
        assert list(kinds) == ["base"] and kinds["base"].steps == STEPS and kinds["base"].height == SIZE


def test_rates_and_modes_parse_or_name_what_is_allowed():
    assert parse_rates("4, 1,2") == [1.0, 2.0, 4.0]
    assert parse_modes("static,mono") == ["static", "mono"]
    for bad in ("", "1,x", "0", "-2", "1,1", "nan"):
        with pytest.raises(ValueError):
            parse_rates(bad)
    with pytest.raises(ValueError, match="allowed: " + ", ".join(MODES)):
        parse_modes("mono,fast")
    with pytest.raises(ValueError, match="trace: must be one of poisson, bursty, shift"):
        trace_kinds("diurnal", STEPS, SIZE)
    with pytest.raises(ValueError, match="rate"):
        make_trace("poisson", 0.0, 10.0, STEPS, SIZE, seed=0)
