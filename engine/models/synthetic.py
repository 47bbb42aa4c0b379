"""The synthetic family's spec: `synthetic:encoder=20ms,dit=100ms,decoder=60ms[,mode=sleep|burn]`
`[,device.cpu:1=3x ...]` (stages/families/synthetic.py runs it: stages that only spend time; a
`device.NAME=Fx` part makes every stage on that device take F times as long, as a slower GPU
would, so heterogeneous pools can be benchmarked on alike cores)."""

from __future__ import annotations

import re

from .base import FamilySpec, ModelInfo

PREFIX = "synthetic:"
NOMINAL_STEPS = 4
NOMINAL_PIXELS = 64 * 64
_COST = re.compile(r"^(\d+(?:\.\d+)?)(ms|s)$")
_FACTOR = re.compile(r"^(\d+(?:\.\d+)?)x$")
DEVICE_PART = "device."


def parse_spec(spec: str) -> tuple[dict[str, float], str]:
    """`synthetic:encoder=20ms,...` -> ({stage: seconds}, mode); ValueError naming `model`."""
    costs, mode = {"encoder": 0.0, "dit": 0.0, "decoder": 0.0}, "sleep"
    for part in filter(None, (p.strip() for p in spec.removeprefix(PREFIX).split(","))):
        key, _, value = part.partition("=")
        if key == "mode" and value in ("sleep", "burn"):
            mode = value
            continue
        if key.startswith(DEVICE_PART):
            continue  # device_factors reads those
        match = _COST.match(value.strip())
        if key not in costs or not match:
            raise ValueError(
                f"model: bad synthetic spec part {part!r}; expected encoder=20ms,dit=100ms,decoder=60ms"
                ",mode=sleep|burn"
            )
        costs[key] = float(match.group(1)) / (1000 if match.group(2) == "ms" else 1)
    return costs, mode


def device_factors(spec: str) -> dict[str, float]:
    """`synthetic:...,device.cpu:1=3x` -> {"cpu:1": 3.0}; ValueError naming `model`."""
    factors = {}
    for part in filter(None, (p.strip() for p in spec.removeprefix(PREFIX).split(","))):
        key, _, value = part.partition("=")
        if not key.startswith(DEVICE_PART):
            continue
        match = _FACTOR.match(value.strip())
        if not key.removeprefix(DEVICE_PART) or not match or float(match.group(1)) <= 0:
            raise ValueError(f"model: bad synthetic spec part {part!r}; expected device.NAME=Fx with F > 0, "
                             "e.g. device.cpu:1=3x")
        factors[key.removeprefix(DEVICE_PART)] = float(match.group(1))
    return factors


class SyntheticSpec(FamilySpec):
    name = "synthetic"
    pipeline_class = "synthetic"

    def __init__(self, spec: str):
        self.spec = spec
        self.costs, self.mode = parse_spec(spec)
        self.device_factors = device_factors(spec)

    def describe(self, path) -> ModelInfo:
        return ModelInfo(path=self.spec, family=self.name, pixel_multiple=16, default_size=64, max_size=1024,
                         num_inference_steps=NOMINAL_STEPS, guidance_scale=1.0)
