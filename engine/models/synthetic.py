"""The synthetic family's spec: `synthetic:encoder=20ms,dit=100ms,decoder=60ms[,mode=sleep|burn]`
(stages/families/synthetic.py runs it: stages that only spend time)."""

from __future__ import annotations

import re

from .base import FamilySpec, ModelInfo

PREFIX = "synthetic:"
NOMINAL_STEPS = 4
NOMINAL_PIXELS = 64 * 64
_COST = re.compile(r"^(\d+(?:\.\d+)?)(ms|s)$")


def parse_spec(spec: str) -> tuple[dict[str, float], str]:
    """`synthetic:encoder=20ms,...` -> ({stage: seconds}, mode); ValueError naming `model`."""
    costs, mode = {"encoder": 0.0, "dit": 0.0, "decoder": 0.0}, "sleep"
    for part in filter(None, (p.strip() for p in spec.removeprefix(PREFIX).split(","))):
        key, _, value = part.partition("=")
        if key == "mode" and value in ("sleep", "burn"):
            mode = value
            continue
        match = _COST.match(value.strip())
        if key not in costs or not match:
            raise ValueError(
                f"model: bad synthetic spec part {part!r}; expected encoder=20ms,dit=100ms,decoder=60ms"
                ",mode=sleep|burn"
            )
        costs[key] = float(match.group(1)) / (1000 if match.group(2) == "ms" else 1)
    return costs, mode


class SyntheticSpec(FamilySpec):
    name = "synthetic"
    pipeline_class = "synthetic"

    def __init__(self, spec: str):
        self.spec = spec
        self.costs, self.mode = parse_spec(spec)

    def describe(self, path) -> ModelInfo:
        return ModelInfo(path=self.spec, family=self.name, pixel_multiple=16, default_size=64, max_size=1024,
                         num_inference_steps=NOMINAL_STEPS, guidance_scale=1.0)
