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


def test_flux_and_pixart_estimates_follow_how_they_run():
    """Flux's true CFG encodes two prompts but runs its two transformer passes one after the
    other; PixArt's CFG is one batch of two in the transformer."""
    from dfuse.engine.protocol import RequestParams as P
    from dfuse.stages.families import describe_model, detect_family

    flux_path, pixart_path = tiny_model_path("tiny-flux"), tiny_model_path("tiny-pixart")
    flux, flux_info = detect_family(flux_path), describe_model(flux_path)
    plain, cfg = P("a fox", "blurry", 4, 3.5, 256, 256, 0), P("a fox", "blurry", 4, 3.5, 256, 256, 0, true_cfg_scale=4.0)
    assert flux.peak_bytes(flux_info, "encoder", cfg, 4) == 2 * flux.peak_bytes(flux_info, "encoder", plain, 4)
    assert flux.peak_bytes(flux_info, "dit", cfg, 4) == flux.peak_bytes(flux_info, "dit", plain, 4)
    pixart, pixart_info = detect_family(pixart_path), describe_model(pixart_path)
    for family, info in ((flux, flux_info), (pixart, pixart_info)):
        for stage in ("dit", "decoder"):
            assert family.peak_bytes(info, stage, params(512), 4) > family.peak_bytes(info, stage, params(256), 4)
        assert family.supports_vae_tiling()
        assert family.peak_bytes(info, "decoder", params(1024, tiling=True), 4) < family.peak_bytes(info, "decoder", params(1024), 4)
    assert pixart.peak_bytes(pixart_info, "dit", params(256, 4.5), 4) == 2 * pixart.peak_bytes(pixart_info, "dit", params(256, 1.0), 4)
