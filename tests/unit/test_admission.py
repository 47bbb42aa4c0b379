"""Memory admission with made-up budgets: what fits runs, what fits tiled is tiled, the rest is
refused naming the field; estimates grow the way the stages do."""

import pytest

from dfuse.engine.admission import admit
from dfuse.engine.protocol import RequestParams
from dfuse.stages.families.sd3 import SD3Family
from dfuse.stages.tiny import tiny_model_path

GIB = 2**30
ITEMSIZES = {"encoder": 4, "dit": 4, "decoder": 4}


@pytest.fixture(scope="module")
def sd3():
    family = SD3Family()
    return family, family.describe(tiny_model_path())


def params(size, guidance=4.5, tiling=False):
    return RequestParams("a fox", None, 4, guidance, size, size, 0, vae_tiling=tiling)


def budgets(gib):
    return {s: int(gib * GIB) for s in ITEMSIZES}


def test_estimates_grow_with_pixels_and_guidance(sd3):
    family, info = sd3
    for stage in ("dit", "decoder"):
        assert family.peak_bytes(info, stage, params(512), 4) > family.peak_bytes(info, stage, params(256), 4)
    assert family.peak_bytes(info, "dit", params(256, 4.5), 4) > family.peak_bytes(info, "dit", params(256, 1.0), 4)
    assert family.peak_bytes(info, "decoder", params(1024, tiling=True), 4) < family.peak_bytes(info, "decoder", params(1024), 4)


def test_a_request_that_fits_runs_unchanged(sd3):
    assert admit(*sd3, params(512), budgets(8), ITEMSIZES) == params(512)


def test_a_decode_too_big_whole_but_fine_in_tiles_is_tiled(sd3):
    family, info = sd3
    whole = family.peak_bytes(info, "decoder", params(512), 4)
    tiled = family.peak_bytes(info, "decoder", params(512, tiling=True), 4)
    admitted = admit(family, info, params(512), budgets((whole + tiled) / 2 / GIB), ITEMSIZES)
    assert admitted.vae_tiling and admitted.height == 512


def test_a_request_too_big_even_in_tiles_is_refused_naming_height_width(sd3):
    family, info = sd3
    tiled = family.peak_bytes(info, "decoder", params(512, tiling=True), 4)
    with pytest.raises(ValueError, match=r"^height/width: a 512x512 request needs about .* GiB .* decoder .* tiles"):
        admit(family, info, params(512), budgets(tiled / 2 / GIB), ITEMSIZES)
