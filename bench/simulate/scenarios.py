"""Cluster scenarios for `dfuse bench simulate`: a model, a cluster, a one-hour trace shape, and how
the real cluster differs from the scheduler's published-number estimates.

`bias` is the truth the scheduler must learn online: the simulator's task durations are the
profile-based estimate x bias (per stage and device kind) x a per-device slowdown x lognormal
noise. The scheduler starts from the unbiased estimate; the biases are invented (est.), sized
like the error of scaling one published H100 latency to another GPU by its TFLOP/s.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from ...scheduler.core import Device, Shape
from ...scheduler.predictor import Predictor, predictor_from_profiles
from ...scheduler.workloads import Burst, Phase

PROFILES = Path(__file__).resolve().parents[1] / "profiles"  # bench/profiles, installed as package data


@dataclass(frozen=True)
class Scenario:
    name: str
    description: str
    model: str
    """File name (without .json) in bench/profiles/models."""
    cluster: tuple[tuple[str, int], ...]
    """(device kind, count) in bench/profiles/devices.json."""
    phases: tuple[Phase, ...]
    bias: dict = field(default_factory=dict)
    """(stage, kind) -> true latency / estimated latency."""
    slowdown: dict = field(default_factory=dict)
    """device id -> extra factor (a straggler)."""
    nominal_load: float = 0.7
    """Arrival rate of the latency / SLO run, as a fraction of the oracle's capacity per phase."""
    clients_per_device: int = 3
    """Closed-loop clients per device in the throughput run (enough to keep every stage busy)."""

    def devices(self) -> list[Device]:
        return [Device(f"{kind}-{i}", kind) for kind, n in self.cluster for i in range(n)]

    def predictor(self) -> Predictor:
        """The scheduler's belief: published numbers scaled across devices."""
        devices = json.loads((PROFILES / "devices.json").read_text())
        model = json.loads((PROFILES / "models" / f"{self.model}.json").read_text())
        return predictor_from_profiles(model, devices)

    def world(self) -> Predictor:
        """The simulated cluster's truth (without per-device slowdowns and noise)."""
        return self.predictor().corrected(self.bias)


# Wan2.1-14B, LightX2V's 4-step distilled model without CFG at 480p; 81-frame and 33-frame clips.
_WAN_81 = Shape(height=480, width=832, frames=81, steps=4, prompt_tokens=512)
_WAN_33 = Shape(height=480, width=832, frames=33, steps=4, prompt_tokens=512)

# FLUX.1-dev (guidance-distilled, no CFG batch).
_FLUX_1024 = Shape(height=1024, width=1024, steps=28, prompt_tokens=512)
_FLUX_512 = Shape(height=512, width=512, steps=28, prompt_tokens=512)
_FLUX_1024_50 = Shape(height=1024, width=1024, steps=50, prompt_tokens=512)

# SD3.5-large: turbo (4 steps, no CFG), quality (50 steps, CFG), high resolution (2048^2, 28 steps, CFG).
_SD_TURBO = Shape(height=1024, width=1024, steps=4, prompt_tokens=256)
_SD_QUALITY = Shape(height=1024, width=1024, steps=50, cfg=True, prompt_tokens=256)
_SD_HIRES = Shape(height=2048, width=2048, steps=28, cfg=True, prompt_tokens=256)

_SHIFT = (
    Phase("turbo", 1200.0, ((_SD_TURBO, 1.0),)),
    Phase("quality", 1200.0, ((_SD_QUALITY, 1.0),)),
    Phase("hires", 1200.0, ((_SD_HIRES, 1.0),)),
)
_SD_BIAS = {("encoder", "l40s"): 1.1, ("dit", "l40s"): 0.9, ("decoder", "l40s"): 1.3}

SCENARIOS = {
    s.name: s
    for s in (
        Scenario(
            name="wan-480p-8xa10g",
            description="Wan2.1-14B 480p video (4-step distilled, 81 or 33 frames) on 8 x A10G 24 GB, "
                        "the DisagFusion authors' setting; bursty arrivals, steady mix.",
            model="wan2.1-14b",
            cluster=(("a10g", 8),),
            # Four hours: a request keeps an A10G busy ~2.5 min, so one hour holds too few
            # completions (~170) to compare throughputs within 5 %.
            phases=(Phase("bursty", 4 * 3600.0, ((_WAN_81, 0.8), (_WAN_33, 0.2)), burst=Burst(2.0, 300.0, 900.0)),),
            bias={("encoder", "a10g"): 1.3, ("dit", "a10g"): 1.1, ("decoder", "a10g"): 0.8},
            slowdown={"a10g-3": 1.1},
        ),
        Scenario(
            name="flux-1024-4xh100-4xl4",
            description="FLUX.1-dev on 4 x H100 + 4 x L4 (heterogeneous); the rate ramps up then down, "
                        "the mix moves towards 50-step requests in the second half.",
            model="flux.1-dev",
            cluster=(("h100", 4), ("l4", 4)),
            phases=(
                Phase("ramp-up", 1800.0, ((_FLUX_1024, 0.8), (_FLUX_512, 0.2)), rate=0.6, rate_end=1.0),
                Phase("ramp-down", 1800.0, ((_FLUX_1024, 0.6), (_FLUX_1024_50, 0.4)), rate=1.0, rate_end=0.7),
            ),
            bias={("encoder", "l4"): 1.2, ("dit", "l4"): 1.25, ("decoder", "l4"): 0.9, ("dit", "h100"): 1.05},
            slowdown={"h100-2": 1.1},
        ),
        Scenario(
            name="sd35-shift-8xl40s",
            description="SD3.5-large on 8 x L40S 48 GB; the workload shifts every 20 minutes: "
                        "turbo 4-step drafts, then 50-step CFG renders, then 2048^2 renders.",
            model="sd3.5-large",
            cluster=(("l40s", 8),),
            phases=_SHIFT,
            bias=_SD_BIAS,
            slowdown={"l40s-5": 1.1},
        ),
        Scenario(
            name="sd35-shift-4xl40s-4xrtx4090",
            # A 4090 holds every weight only by streaming (28 GB of weights): the turbo drafts favour a
            # split (light stages on the 4090s), the renders monolithic.
            description="sd35-shift-8xl40s's phases on 4 x L40S 48 GB + 4 x RTX 4090 24 GB: turbo drafts favour "
                        "a split, renders monolithic.",
            model="sd3.5-large",
            cluster=(("l40s", 4), ("rtx4090", 4)),
            phases=_SHIFT,
            bias={**_SD_BIAS, ("encoder", "rtx4090"): 1.2, ("dit", "rtx4090"): 1.1, ("decoder", "rtx4090"): 0.9},
            slowdown={"l40s-2": 1.1},
        ),
        Scenario(
            name="sd35-shift-reverse-8xl40s",
            description="sd35-shift-8xl40s with the phases in the opposite order (static is then tuned "
                        "for 2048^2 renders and meets the turbo drafts last).",
            model="sd3.5-large",
            cluster=(("l40s", 8),),
            phases=tuple(reversed(_SHIFT)),
            bias=_SD_BIAS,
            slowdown={"l40s-5": 1.1},
        ),
    )
}
