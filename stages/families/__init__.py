"""Model families, detected from a diffusers folder's model_index.json."""

from __future__ import annotations

import json
from pathlib import Path

from .base import Family, ModelInfo
from .flux import FluxFamily
from .pixart import PixArtSigmaFamily
from .sd3 import SD3Family
from .synthetic import PREFIX as SYNTHETIC_PREFIX
from .synthetic import SyntheticFamily
from .wan import WanFamily

FAMILIES: dict[str, Family] = {
    family.pipeline_class: family for family in (SD3Family(), FluxFamily(), PixArtSigmaFamily(), WanFamily())
}


def detect_family(path: str | Path) -> Family:
    """The family serving the diffusers folder at `path` (or a `synthetic:` spec); ValueError
    naming `model` otherwise."""
    if str(path).startswith(SYNTHETIC_PREFIX):
        return SyntheticFamily(str(path))
    path = Path(path)
    supported = ", ".join(sorted(FAMILIES))
    index = path / "model_index.json"
    if not path.is_dir():
        raise ValueError(f"model: {str(path)!r} is not a directory (expected a diffusers model folder)")
    try:
        class_name = json.loads(index.read_text())["_class_name"]
    except (OSError, ValueError, KeyError, TypeError):
        raise ValueError(
            f"model: {str(path)!r} is not a diffusers pipeline folder (no readable model_index.json "
            f"with a _class_name); supported pipelines: {supported}"
        ) from None
    if not isinstance(class_name, str) or class_name not in FAMILIES:
        raise ValueError(f"model: pipeline {class_name!r} is not supported; supported pipelines: {supported}")
    return FAMILIES[class_name]


def describe_model(path: str | Path) -> ModelInfo:
    """Detect the family and read the model's static facts; ValueError naming `model` if unusable."""
    family = detect_family(path)
    if isinstance(family, SyntheticFamily):
        return family.describe(path)
    path = Path(path).resolve()
    try:
        return family.describe(path)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"model: {str(path)!r} is not a complete {family.pipeline_class} folder ({e})") from None
