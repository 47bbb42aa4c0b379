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
    # the message names the decoder's outputs and suggests their size, so both numbers it gives
    # are about the same thing (it used to name the DiT's 38.5 MiB and suggest 459 MiB slots).
    dit_over = video(401, 480, 832)
    need = family.output_bytes(info, "decoder", dit_over, ITEMSIZES["decoder"])
    assert 16 * 2**20 < family.output_bytes(info, "dit", dit_over, ITEMSIZES["dit"]) < need
    with pytest.raises(ValueError, match=rf"makes {need / 2**20:.1f} MiB of decoder outputs.*--slot-mib {-(-need // 2**20)}\b"):
        check_transport(family, info, dit_over, 16 * 2**20, ITEMSIZES)
    family, info = SD3Spec(), SD3Spec().describe(tiny_model_path())
    with pytest.raises(ValueError, match=r"^height/width: a 1024x1024 request makes 3\.0 MiB of decoder outputs"):
        check_transport(family, info, params(1024), 2**20, ITEMSIZES)


# --- the CPU budget inside a container: fake /proc and /sys trees, no real cgroup needed -----
def _tree(root, meminfo_gib=64, cgroup=None, files=None):
    """`root` holding proc/meminfo, proc/self/cgroup (`cgroup`) and `files` {path: text}."""
    (root / "proc/self").mkdir(parents=True)
    (root / "proc/meminfo").write_text(f"MemTotal: {128 * 2**20} kB\nMemAvailable: {int(meminfo_gib * 2**20)} kB\n")
    if cgroup is not None:
        (root / "proc/self/cgroup").write_text(cgroup)
    for path, text in (files or {}).items():
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        (root / path).write_text(text)
    return root


def _cpu_budget(root) -> int:
    from dfuse.engine.admission import detect_budgets
    from dfuse.engine.config import EngineConfig

    return detect_budgets(EngineConfig(), None, root=root)["decoder"]


def test_a_cgroup_v2_limit_bounds_the_cpu_budget_and_a_big_decode_is_tiled(tmp_path, sd3):
    # The issue: a 1.5 GiB container (1 GiB used by weights) saw the host's 64 GiB free and
    # admitted a 1024 px decode whole, which was OOM-killed.
    root = _tree(tmp_path, cgroup="0::/job\n", files={
        "sys/fs/cgroup/job/memory.max": str(int(1.5 * GIB)),
        "sys/fs/cgroup/job/memory.current": str(GIB),
        "sys/fs/cgroup/job/memory.stat": "anon 900\ninactive_file 0\n",
    })
    budget = _cpu_budget(root)
    assert budget == int(0.5 * GIB * 0.8)
    admitted = admit(*sd3, params(1024), {s: budget for s in ITEMSIZES}, ITEMSIZES)
    assert admitted.vae_tiling


def test_cgroup_v2_without_a_limit_leaves_memavailable(tmp_path):
    root = _tree(tmp_path, meminfo_gib=4, cgroup="0::/job\n", files={
        "sys/fs/cgroup/job/memory.max": "max\n", "sys/fs/cgroup/job/memory.current": str(GIB)})
    assert _cpu_budget(root) == int(4 * GIB * 0.8)


def test_a_limit_on_a_parent_cgroup_or_the_namespace_root_counts(tmp_path):
    # Reclaimable page cache (the weights just read) is not counted as used.
    root = _tree(tmp_path, cgroup="0::/kubepods/pod1/c1\n", files={
        "sys/fs/cgroup/kubepods/pod1/memory.max": str(2 * GIB),
        "sys/fs/cgroup/kubepods/pod1/memory.current": str(GIB + GIB // 2),
        "sys/fs/cgroup/kubepods/pod1/memory.stat": f"anon {GIB}\ninactive_file {GIB // 2}\n",
        "sys/fs/cgroup/kubepods/pod1/c1/memory.max": "max",
    })
    assert _cpu_budget(root) == int(GIB * 0.8)


def test_a_cgroup_v1_limit_bounds_the_cpu_budget_and_its_huge_no_limit_does_not(tmp_path):
    cgroup = "12:pids:/docker/abc\n4:cpuacct,memory:/docker/abc\n0::/\n"
    limited = _tree(tmp_path / "a", cgroup=cgroup, files={
        "sys/fs/cgroup/memory/docker/abc/memory.limit_in_bytes": str(3 * GIB),
        "sys/fs/cgroup/memory/docker/abc/memory.usage_in_bytes": str(GIB)})
    assert _cpu_budget(limited) == int(2 * GIB * 0.8)
    unlimited = _tree(tmp_path / "b", meminfo_gib=8, cgroup=cgroup, files={
        "sys/fs/cgroup/memory/docker/abc/memory.limit_in_bytes": "9223372036854771712",
        "sys/fs/cgroup/memory/docker/abc/memory.usage_in_bytes": str(GIB)})
    assert _cpu_budget(unlimited) == int(8 * GIB * 0.8)


def test_no_cgroup_files_leaves_memavailable_and_nothing_readable_refuses_nothing(tmp_path):
    assert _cpu_budget(_tree(tmp_path / "a", meminfo_gib=6)) == int(6 * GIB * 0.8)
    assert _cpu_budget(_tree(tmp_path / "b", meminfo_gib=6, cgroup="0::/gone\n")) == int(6 * GIB * 0.8)
    assert _cpu_budget(tmp_path / "empty") >= 2**61


def test_budgets_follow_the_stages_when_moves_change_which_device_holds_them():
    """Each stage's budget is its devices' memory: after a move (the engine passes the workers'
    layout then), the DiT that moved to the small device gets the small budget."""
    from dfuse.engine.admission import detect_budgets, memory_budgets, stage_budgets
    from dfuse.engine.config import EngineConfig

    config = EngineConfig(devices=["a/cpu:0", "b/cpu:0"], placement={"a/cpu:0": ["encoder", "decoder"], "b/cpu:0": ["dit"]},
                          cluster="ray", ray_address="127.0.0.1:6379", memory_limit_gib={"a/cpu": 2, "b/cpu": 8})
    assert detect_budgets(config, None) == {"encoder": 2 * GIB, "dit": 8 * GIB, "decoder": 2 * GIB}
    by_memory = memory_budgets(config, None)
    swapped = [("a/cpu:0", "dit"), ("b/cpu:0", "encoder"), ("b/cpu:0", "decoder")]
    assert stage_budgets(config, by_memory, swapped) == {"encoder": 8 * GIB, "dit": 2 * GIB, "decoder": 8 * GIB}
    fused = [("a/cpu:0", "encoder+dit+decoder"), ("b/cpu:0", "encoder+dit+decoder")]  # each runs every stage
    assert stage_budgets(config, by_memory, fused) == {"encoder": 2 * GIB, "dit": 2 * GIB, "decoder": 2 * GIB}
    assert memory_budgets(config, None, workers=swapped, gpus_only=True) == {}  # no GPU: nothing to measure again
