"""A weight manifest (stages/weights.py) names the classes a worker imports to rebuild a cached
component: it may name only diffusers' and transformers' own, never arbitrary code."""

import pytest

from dfuse.stages import weights


def test_a_manifest_cannot_name_other_modules():
    with pytest.raises(ValueError, match="refusing to import"):
        weights._import("os:system")
