"""Memory admission with made-up budgets: what fits runs, what fits tiled is tiled, the rest is
refused naming the field; estimates grow the way the stages do."""

import re

import msgspec
import pytest

from dfuse.engine.admission import admit, check_transport
from dfuse.engine.protocol import RequestParams
from dfuse.engine.models.sd3 import SD3Spec
from dfuse.engine.models.tiny import tiny_model_path

GIB = 2**30
ITEMSIZES = {"encoder": 4, "dit": 4, "decoder": 4}


@pytest.fixture(scope="module")
def sd3():
    family = SD3Spec()
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


def test_the_refusal_tells_the_need_from_the_budget_even_when_both_are_small(sd3):
    family, info = sd3
    need = family.peak_bytes(info, "dit", params(64), 4)  # ~0.01 GiB: "0.01 > 0.01" at 2 decimals
    with pytest.raises(ValueError) as refused:
        admit(family, info, params(64), budgets(need * 0.95 / GIB), ITEMSIZES)
    need_gib, budget_gib = re.search(r"needs about ([\d.]+) GiB .* than the ([\d.]+) GiB", str(refused.value)).groups()
    assert float(need_gib) > float(budget_gib)


def test_flux_and_pixart_estimates_follow_how_they_run():
    """Flux's true CFG encodes two prompts but runs its two transformer passes one after the
    other; PixArt's CFG is one batch of two in the transformer."""
    from dfuse.engine.protocol import RequestParams as P
    from dfuse.engine.models import describe_model, detect_family

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


@pytest.fixture(scope="module")
def wan():
    from dfuse.engine.models.wan import WanSpec

    family = WanSpec()
    return family, family.describe(tiny_model_path("tiny-wan"))


def video(frames, height=64, width=64, guidance=5.0, tiling=False):
    return RequestParams("a fox", None, 4, guidance, height, width, 0, vae_tiling=tiling, num_frames=frames)


def test_wan_estimates_grow_with_frames(wan):
    family, info = wan
    for stage in ("dit", "decoder"):
        assert family.peak_bytes(info, stage, video(81), 4) > family.peak_bytes(info, stage, video(9), 4)
        assert family.output_bytes(info, stage, video(81), 4) > family.output_bytes(info, stage, video(9), 4)
    # CFG: two prompts encoded, but the transformer's two passes run one after the other.
    assert family.peak_bytes(info, "encoder", video(9), 4) == 2 * family.peak_bytes(info, "encoder", video(9, guidance=1), 4)
    assert family.peak_bytes(info, "dit", video(9), 4) == family.peak_bytes(info, "dit", video(9, guidance=1), 4)
    big = video(81, 1024, 1024)
    assert family.peak_bytes(info, "decoder", msgspec.structs.replace(big, vae_tiling=True), 4) < family.peak_bytes(info, "decoder", big, 4)
    # The decoder writes uint8 frames; the DiT float32 latents of 1 + (81 - 1) / 4 frames.
    assert family.output_bytes(info, "decoder", video(81), 4) == 81 * 64 * 64 * 3
    assert family.output_bytes(info, "dit", video(81), 2) == 16 * 21 * 8 * 8 * 4


def test_a_video_too_big_for_the_devices_is_refused_naming_frames(wan):
    family, info = wan
    need = family.peak_bytes(info, "dit", video(81), 4)
    with pytest.raises(ValueError, match=r"^num_frames/height/width: a 81-frame 64x64 request needs about"):
        admit(family, info, video(81), budgets(need / 2 / GIB), ITEMSIZES)


def test_outputs_that_cannot_fit_a_transport_slot_are_refused_up_front(wan):
    family, info = wan
    check_transport(family, info, video(9), 2**20, ITEMSIZES)  # 9 x 64 x 64 x 3 bytes: fits 1 MiB
    with pytest.raises(ValueError, match=r"^num_frames/height/width: a 81-frame 832x480 request makes 92\.5 MiB "
                                         r"of decoder outputs, more than one transport slot holds \(16 MiB\).*slot_mib=93"):
        check_transport(family, info, video(81, 480, 832), 16 * 2**20, ITEMSIZES)
    # The DiT is the first stage over 16 MiB here (a 401-frame clip), the decoder needs far more:
    # the size suggested is the one that fits every stage, not the first stage's.
    dit_over = video(401, 480, 832)
    need = max(family.output_bytes(info, stage, dit_over, ITEMSIZES[stage]) for stage in ("dit", "decoder"))
    assert family.output_bytes(info, "dit", dit_over, ITEMSIZES["dit"]) > 16 * 2**20
    with pytest.raises(ValueError, match=rf"of dit outputs.*--slot-mib {-(-need // 2**20)}\b"):
        check_transport(family, info, dit_over, 16 * 2**20, ITEMSIZES)
    family, info = SD3Spec(), SD3Spec().describe(tiny_model_path())
    with pytest.raises(ValueError, match=r"^height/width: a 1024x1024 request makes 3\.0 MiB of decoder outputs"):
        check_transport(family, info, params(1024), 2**20, ITEMSIZES)
