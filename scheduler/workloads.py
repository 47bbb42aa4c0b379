"""Request traces: Poisson, bursty (on/off modulated Poisson) and shifting mixes, rate changing over time.

A trace is a list of phases; each phase has a request mix, a duration and a relative arrival rate
(optionally ramping linearly, optionally bursty). `generate` turns phases plus an absolute rate per
phase into arrivals with a fixed seed, so every policy sees the very same requests (and the same
per-stage latency noise draws: common random numbers).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from .core import Shape


@dataclass(frozen=True)
class Burst:
    """On/off modulation: during `on` periods the rate is `peak` x the phase rate; off periods
    are slower so the phase's mean rate is kept."""

    peak: float = 3.0
    mean_on_s: float = 60.0
    mean_off_s: float = 240.0

    def __post_init__(self):
        on_share = self.mean_on_s / (self.mean_on_s + self.mean_off_s)
        if not (self.peak >= 1 and self.peak * on_share <= 1):
            raise ValueError(f"Burst: need 1 <= peak <= 1 / on-share ({1 / on_share:.2f}), got {self.peak}")

    @property
    def off_level(self) -> float:
        on_share = self.mean_on_s / (self.mean_on_s + self.mean_off_s)
        return (1 - self.peak * on_share) / (1 - on_share)


@dataclass(frozen=True)
class Phase:
    name: str
    duration_s: float
    mix: tuple[tuple[Shape, float], ...]
    rate: float = 1.0
    """Relative arrival rate at the start of the phase (the caller scales it to requests/s)."""
    rate_end: float | None = None
    """Relative rate at the end of the phase: a linear ramp (None: constant)."""
    burst: Burst | None = None

    def __post_init__(self):
        if self.duration_s <= 0 or not self.mix:
            raise ValueError(f"Phase {self.name!r}: needs a duration > 0 and a mix")

    @property
    def mean_rate(self) -> float:
        return self.rate if self.rate_end is None else (self.rate + self.rate_end) / 2


@dataclass(frozen=True)
class Arrival:
    id: int
    t: float
    shape: Shape
    phase: int
    noise: tuple[float, float, float]
    """Standard normal draws, one per stage: the simulator's latency noise for this request."""


def generate(phases: Sequence[Phase], rps: Sequence[float], seed: int) -> list[Arrival]:
    """Arrivals for `phases`; phase i arrives at `rps[i]` x its relative rate (requests/s)."""
    if len(rps) != len(phases):
        raise ValueError("generate: one rate per phase")
    rng = np.random.default_rng(seed)
    arrivals: list[Arrival] = []
    start = 0.0
    for index, (phase, scale) in enumerate(zip(phases, rps)):
        times = _phase_times(phase, scale, rng)
        shapes = [s for s, _ in phase.mix]
        weights = np.array([w for _, w in phase.mix], dtype=float)
        picks = rng.choice(len(shapes), size=len(times), p=weights / weights.sum())
        noise = rng.standard_normal((len(times), 3))
        for t, pick, z in zip(times, picks, noise):
            arrivals.append(Arrival(len(arrivals), start + float(t), shapes[pick], index, tuple(map(float, z))))
        start += phase.duration_s
    return arrivals


def _phase_times(phase: Phase, scale: float, rng: np.random.Generator) -> np.ndarray:
    """Non-homogeneous Poisson arrival times in [0, duration) by thinning."""
    if scale <= 0:
        return np.zeros(0)
    level = _burst_levels(phase, rng)
    top = max(phase.rate, phase.rate_end if phase.rate_end is not None else phase.rate)
    peak = scale * top * (phase.burst.peak if phase.burst else 1.0)
    n = rng.poisson(peak * phase.duration_s * 1.2) + 16
    times = np.cumsum(rng.exponential(1.0 / peak, size=n))
    while times[-1] < phase.duration_s:  # rare: draw more
        times = np.concatenate([times, times[-1] + np.cumsum(rng.exponential(1.0 / peak, size=n))])
    times = times[times < phase.duration_s]
    rate = scale * _relative_rate(phase, times) * level(times)
    keep = rng.random(len(times)) < rate / peak
    return times[keep]


def _relative_rate(phase: Phase, t: np.ndarray) -> np.ndarray:
    if phase.rate_end is None:
        return np.full_like(t, phase.rate)
    return phase.rate + (phase.rate_end - phase.rate) * t / phase.duration_s


def _burst_levels(phase: Phase, rng: np.random.Generator):
    """A function t -> rate multiplier for the phase's on/off bursts (1 without bursts)."""
    if phase.burst is None:
        return lambda t: np.ones_like(t)
    b = phase.burst
    edges, levels, t, on = [0.0], [], 0.0, False
    while t < phase.duration_s:
        levels.append(b.peak if on else b.off_level)
        t += rng.exponential(b.mean_on_s if on else b.mean_off_s)
        edges.append(t)
        on = not on
    edges_arr, levels_arr = np.array(edges[1:]), np.array(levels)
    return lambda times: levels_arr[np.searchsorted(edges_arr, times, side="right")]


def duration(phases: Sequence[Phase]) -> float:
    return math.fsum(p.duration_s for p in phases)


def phase_starts(phases: Sequence[Phase]) -> list[float]:
    starts, t = [], 0.0
    for p in phases:
        starts.append(t)
        t += p.duration_s
    return starts


class ClosedLoop:
    """`clients` users, each sending its next request the moment its last one returns.

    Keeps the cluster saturated without an unbounded backlog (at most `clients` requests are in
    the system), so throughput measures capacity, and a shift of the mix reaches the devices at
    once instead of behind a queue of old requests. Client c's k-th request draws its shape (from
    the mix of the phase it is sent in) and its noise from stream (seed, c): every policy sees
    the same sequence per client.
    """

    def __init__(self, phases: Sequence[Phase], clients: int, seed: int):
        if clients < 1:
            raise ValueError("ClosedLoop: clients must be >= 1")
        self.phases, self.clients = list(phases), clients
        self._starts = phase_starts(self.phases)
        self._end = duration(self.phases)
        self._rng = [np.random.default_rng([seed, c]) for c in range(clients)]
        self._client: dict[int, int] = {}
        self._next_id = 0

    def initial(self) -> list[Arrival]:
        return [self._new(c, 0.0) for c in range(self.clients)]

    def next(self, finished: Arrival, t: float) -> Arrival | None:
        """The request its client sends when `finished` returns at `t` (None after the last phase)."""
        client = self._client.pop(finished.id)
        return self._new(client, t) if t < self._end else None

    def _new(self, client: int, t: float) -> Arrival:
        phase = max(0, int(np.searchsorted(self._starts, t, side="right")) - 1)
        rng = self._rng[client]
        u, z = rng.random(), rng.standard_normal(3)
        weights = np.cumsum([w for _, w in self.phases[phase].mix])
        pick = min(int(np.searchsorted(weights / weights[-1], u, side="right")), len(weights) - 1)
        arrival = Arrival(self._next_id, t, self.phases[phase].mix[pick][0], phase, tuple(map(float, z)))
        self._client[arrival.id] = client
        self._next_id += 1
        return arrival
