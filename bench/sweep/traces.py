"""Open-loop arrival traces for `dfuse bench sweep`, built on the simulator's own generator.

scheduler/workloads.py already turns phases (a request mix, a duration, a relative rate, optional
on/off bursts) into seeded arrivals; the sweep only names three traces and their request kinds:

    poisson  one kind (the base request), exponential inter-arrival times at the given rate
    bursty   one kind, on/off modulated Poisson (BURST): "on" periods (exponential, mean 1 s) at
             3x the rate, "off" periods (mean 2 s) silent, so the long-run mean is the given rate.
             The inter-arrival times' coefficient of variation grows with the rate (about 2.2 at
             2 req/s, 4.8 at 10 req/s; Poisson: 1). The trace starts in an off period, so over
             30 s it offers a few % fewer requests than rate x duration (the sweep reports the
             offered rate it really sent)
    shift    Poisson at the given rate; the mix changes at each third of the run:
               few-step   steps/4 at the base size   the flat encoder and the pixel-bound decoder dominate
               many-step  2 x steps at the base size  the DiT dominates (its cost grows with steps)
               large      steps/2 at 2 x the size     4x the pixels: the decoder, and the DiT again

A request kind is a scheduler `Shape` (height, width, steps). One seed fixes the trace, so every
mode at a rate sees the very same arrivals.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from ...scheduler.core import Shape
from ...scheduler.workloads import Arrival, Burst, Phase, generate

TRACES = ("poisson", "bursty", "shift")
MODES = ("mono", "static", "elastic", "auto")
# On/off bursts on the scale of a request's latency, so a 30 s run holds ~10 of them. With
# peak x on-share = 1 the off level is 0: all arrivals fall in the "on" periods.
BURST = Burst(peak=3.0, mean_on_s=1.0, mean_off_s=2.0)
SHIFT_PHASES = ("few-step", "many-step", "large")


def trace_kinds(trace: str, steps: int, size: int) -> dict[str, Shape]:
    """The request kinds of `trace`, by name, in the order they first appear."""
    _check_trace(trace)
    if trace != "shift":
        return {"base": Shape(height=size, width=size, steps=steps)}
    return {
        "few-step": Shape(height=size, width=size, steps=max(1, steps // 4)),
        "many-step": Shape(height=size, width=size, steps=2 * steps),
        "large": Shape(height=2 * size, width=2 * size, steps=max(1, steps // 2)),
    }


def trace_phases(trace: str, duration_s: float, steps: int, size: int) -> list[Phase]:
    """The phases of `trace` over `duration_s` seconds (relative rate 1: `make_trace` scales them)."""
    kinds = trace_kinds(trace, steps, size)
    if trace == "poisson":
        return [Phase("poisson", duration_s, ((kinds["base"], 1.0),))]
    if trace == "bursty":
        return [Phase("bursty", duration_s, ((kinds["base"], 1.0),), burst=BURST)]
    return [Phase(name, duration_s / len(kinds), ((shape, 1.0),)) for name, shape in kinds.items()]


def make_trace(trace: str, rate: float, duration_s: float, steps: int, size: int, seed: int) -> list[Arrival]:
    """Arrivals of `trace` at a mean of `rate` requests/s over `duration_s` seconds, fixed by `seed`."""
    if not rate > 0:
        raise ValueError(f"rate: must be > 0 requests/s (got {rate!r})")
    if not duration_s > 0:
        raise ValueError(f"duration: must be > 0 s (got {duration_s!r})")
    phases = trace_phases(trace, duration_s, steps, size)
    return generate(phases, [rate] * len(phases), seed)


def kind_of(arrival: Arrival, kinds: dict[str, Shape]) -> str:
    return next(name for name, shape in kinds.items() if shape == arrival.shape)


def interarrival_cv(arrivals: Sequence[Arrival]) -> float:
    """Coefficient of variation of the gaps between arrivals (Poisson: 1; burstier: more)."""
    gaps = np.diff([a.t for a in arrivals])
    return float(gaps.std() / gaps.mean()) if len(gaps) > 1 and gaps.mean() > 0 else float("nan")


def parse_rates(text: str) -> list[float]:
    """"1,2,4" -> [1.0, 2.0, 4.0]; ValueError naming --rates."""
    rates = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        try:
            rate = float(part)
        except ValueError:
            rate = float("nan")
        if not 0 < rate < 1e4:
            raise ValueError(f"expected arrival rates in requests/s, each > 0 and < 10000, comma-separated "
                             f"like 1,2,4 (got {part!r})")
        rates.append(rate)
    if not rates:
        raise ValueError("expected at least one arrival rate, like 1,2,4")
    if len(set(rates)) != len(rates):
        raise ValueError(f"a rate is given twice ({text!r})")
    return sorted(rates)


def parse_modes(text: str) -> list[str]:
    """"mono,static" -> ["mono", "static"] in the given order; ValueError naming the allowed modes."""
    modes = [p.strip() for p in text.split(",") if p.strip()]
    unknown = [m for m in modes if m not in MODES]
    if unknown or not modes:
        raise ValueError(f"unknown mode(s) {unknown or [text]}; allowed: {', '.join(MODES)} (comma-separated)")
    if len(set(modes)) != len(modes):
        raise ValueError(f"a mode is given twice ({text!r})")
    return modes


def _check_trace(trace: str) -> None:
    if trace not in TRACES:
        raise ValueError(f"trace: must be one of {', '.join(TRACES)} (got {trace!r})")
