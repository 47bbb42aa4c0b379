"""Workloads: Poisson counts, bursts keep the mean, ramps, closed loops follow the phases."""

import math

import pytest

from dfuse.scheduler.core import Shape
from dfuse.scheduler.workloads import Burst, ClosedLoop, Phase, generate

A, B = Shape(512, 512, steps=4), Shape(1024, 1024, steps=28)


def within(count, expected, sigmas=5):
    return abs(count - expected) <= sigmas * math.sqrt(expected)


def test_poisson_count_and_mix():
    arrivals = generate([Phase("p", 10000.0, ((A, 0.25), (B, 0.75)))], [1.0], seed=0)
    assert within(len(arrivals), 10000)
    assert within(sum(a.shape == A for a in arrivals), 2500)
    assert all(x.t < y.t for x, y in zip(arrivals, arrivals[1:]))
    assert generate([Phase("p", 100.0, ((A, 1.0),))], [1.0], seed=9) == generate([Phase("p", 100.0, ((A, 1.0),))], [1.0], seed=9)


def test_bursts_keep_the_mean_rate_and_ramps_tilt_it():
    bursty = generate([Phase("b", 20000.0, ((A, 1.0),), burst=Burst(3.0, 60.0, 240.0))], [0.5], seed=1)
    assert len(bursty) == pytest.approx(10000, rel=0.1)
    ramp = generate([Phase("r", 10000.0, ((A, 1.0),), rate=0.5, rate_end=1.5)], [1.0], seed=2)
    first = sum(a.t < 5000 for a in ramp)
    assert within(first, 3750) and within(len(ramp) - first, 6250)


def test_phases_follow_each_other():
    arrivals = generate([Phase("a", 100.0, ((A, 1.0),)), Phase("b", 100.0, ((B, 1.0),))], [1.0, 1.0], seed=3)
    assert all((a.shape == A) == (a.t < 100.0) for a in arrivals)
    assert {a.phase for a in arrivals} == {0, 1}


def test_closed_loop_draws_from_the_current_phase_and_stops_at_the_end():
    loop = ClosedLoop([Phase("a", 100.0, ((A, 1.0),)), Phase("b", 100.0, ((B, 1.0),))], clients=3, seed=4)
    first = loop.initial()
    assert len(first) == 3 and all(a.shape == A for a in first)
    follow = loop.next(first[0], 150.0)
    assert follow.shape == B and follow.t == 150.0
    assert loop.next(first[1], 200.0) is None
