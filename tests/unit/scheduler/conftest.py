"""Made-up devices and models for the scheduler tests: plain numbers, no profiles, no processes."""

import random

import pytest

from dfuse.scheduler.core import STAGES, Device
from dfuse.scheduler.predictor import DeviceSpec, Geometry, Predictor, StageSpec

# Reference coefficients (see predictor.FEATURES): a 1024 px / 28-step image costs about
# encoder 0.2 s, DiT 6 s, decoder 0.35 s on "big".
BASE = {
    "encoder": (0.05, 0.2),
    "dit": (0.1, 0.0, 0.03, 0.002),
    "decoder": (0.02, 0.3, 0.01),
}
DEVICES = {
    "big": DeviceSpec("big", memory_gb=80, host_link_gbs=50, pageable_gbs=12, price_usd_h=3.0),
    "small": DeviceSpec("small", memory_gb=24, host_link_gbs=25, pageable_gbs=10, price_usd_h=0.6),
    "tiny": DeviceSpec("tiny", memory_gb=12, host_link_gbs=16, pageable_gbs=8, price_usd_h=0.3),
}
SLOWER = {"big": 1.0, "small": 6.0, "tiny": 9.0}
STAGE_SPECS = {
    "encoder": StageSpec(weights_gb=10.0, act_fixed_gb=0.3, act_per_unit_gb=0.02),
    "dit": StageSpec(weights_gb=22.0, act_fixed_gb=0.2, act_per_unit_gb=0.1),
    "decoder": StageSpec(weights_gb=0.2, act_fixed_gb=0.5, act_per_unit_gb=2.0),
}


def make_predictor(factors=None, stage_specs=None, devices=None) -> Predictor:
    """`factors`: (stage, kind) -> multiplier on that pair's coefficients."""
    factors = factors or {}
    devices = devices or DEVICES
    coefficients = {
        (s, k): tuple(c * SLOWER.get(k, 1.0) * factors.get((s, k), 1.0) for c in BASE[s])
        for s in STAGES for k in devices
    }
    return Predictor(Geometry(joint_text_tokens=256), stage_specs or STAGE_SPECS, devices, coefficients,
                     process_start_s=5.0)


def random_predictor(rng: random.Random) -> Predictor:
    return make_predictor({(s, k): rng.uniform(0.3, 3.0) for s in STAGES for k in DEVICES})


def cluster(**counts) -> list[Device]:
    return [Device(f"{kind}-{i}", kind) for kind, n in counts.items() for i in range(n)]


@pytest.fixture
def predictor() -> Predictor:
    return make_predictor()
