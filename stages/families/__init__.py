"""The runnable model families: the engine's spec of a folder (engine/models/) -> the class that
loads and runs its components in a stage worker."""

from __future__ import annotations

from pathlib import Path

from ...engine.models import detect_family
from ...engine.models.synthetic import SyntheticSpec
from .base import Family
from .flux import FluxFamily
from .pixart import PixArtSigmaFamily
from .sd3 import SD3Family
from .synthetic import SyntheticFamily
from .wan import WanFamily

FAMILIES: dict[str, type[Family]] = {
    family.pipeline_class: family for family in (SD3Family, FluxFamily, PixArtSigmaFamily, WanFamily)
}


def load_family(path: str | Path, device: str = "cpu") -> Family:
    """The family that runs the model at `path` (or a `synthetic:` spec) for a worker on `device`
    (the engine's name of it: a synthetic spec may make some devices slower); ValueError naming
    `model` as the engine's detection gives it."""
    spec = detect_family(path)
    if isinstance(spec, SyntheticSpec):
        return SyntheticFamily(spec.spec, device)
    return FAMILIES[spec.pipeline_class]()
