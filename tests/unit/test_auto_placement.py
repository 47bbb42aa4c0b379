"""placement="auto": the planner's placement over a device pool, before any worker starts
(engine/auto_placement.py). The fused role on every device where memory allows (the throughput
optimum on alike devices: each serves whole requests, with no handoff); a split where it does
not; a clear error where no placement fits."""

import pytest
from click.testing import CliRunner

from dfuse.cli import main
from dfuse.engine.auto_placement import plan_placement
from dfuse.engine.config import EngineConfig
from dfuse.engine.models import describe_model, detect_family
from dfuse.engine.models.catalog import inspect_model
from dfuse.engine.models.tiny import tiny_model_path
from dfuse.scheduler.predictor import DeviceSpec

FLOAT32 = {"encoder": 4, "dit": 4, "decoder": 4}
POOL = ["cpu:0", "cpu:1"]
USABLE_FRACTION = DeviceSpec("x", 1.0).usable_fraction  # the planner leaves the rest free


@pytest.fixture(scope="module")
def tiny():
    path = tiny_model_path("tiny-sd3")
    return path, describe_model(path), detect_family(path)


def _plan(tiny, memory_gb):
    path, info, family = tiny
    return plan_placement(POOL, path, info, family, FLOAT32, dict(zip(POOL, memory_gb)))


def test_alike_devices_with_room_each_run_the_whole_pipeline_fused(tiny):
    assert _plan(tiny, (8.0, 8.0)) == {d: ["encoder+dit+decoder"] for d in POOL}
    path, info, family = tiny  # without the fused role: every stage as its own worker on each device
    assert plan_placement(POOL, path, info, family, FLOAT32, {d: 8.0 for d in POOL}, fused=False) == {
        d: ["encoder", "dit", "decoder"] for d in POOL}


def test_devices_too_small_for_the_whole_model_split_it(tiny):
    # Room for every weight but the encoder's, plus the largest activation (the decoder's, at
    # 128 px): no device holds all three stages, and dit + decoder still fits.
    stages = inspect_model("tiny-sd3")["stages"]
    whole = sum(s["weights_gb"] for s in stages.values()) + max(s["activations_gb"]["float32"] for s in stages.values())
    usable = whole - stages["encoder"]["weights_gb"] / 2
    placement = _plan(tiny, (usable / USABLE_FRACTION,) * 2)
    assert all(len(stages) < 3 for stages in placement.values()), placement
    assert {s for stages in placement.values() for s in stages} == {"encoder", "dit", "decoder"}


def test_alike_devices_holding_less_than_the_others_are_never_planned_more(tiny):
    # Two devices of one kind (one core each; on a cluster, two nodes' GPUs of one name) where
    # cpu:0 has room for the split only: it must not be given the whole pipeline.
    stages = inspect_model("tiny-sd3")["stages"]
    whole = sum(s["weights_gb"] for s in stages.values()) + max(s["activations_gb"]["float32"] for s in stages.values())
    small = (whole - stages["encoder"]["weights_gb"] / 2) / USABLE_FRACTION
    for memory in ((small, 8.0), (8.0, small)):
        placement = _plan(tiny, memory)
        on_small = placement.get(POOL[memory.index(small)], [])
        assert len(on_small) < 3 and "encoder+dit+decoder" not in on_small, (memory, placement)


def test_no_placement_that_fits_is_a_clear_error(tiny):
    with pytest.raises(ValueError, match=r"placement: no placement of the stages .* fits their memory"):
        _plan(tiny, (0.01, 0.01))


def test_a_pool_without_a_placement_is_auto_until_the_engine_knows_the_model():
    config = EngineConfig(devices=POOL)
    assert (config.placement, config.workers, config.pool) == ("auto", (), tuple(POOL))
    with pytest.raises(ValueError, match="'auto' needs the pool of devices"):
        EngineConfig(devices="cpu", placement="auto")
    with pytest.raises(ValueError, match="names a device twice"):
        EngineConfig(devices=["cpu:0", "cpu:0"])


def test_the_cli_asks_for_devices_with_placement_auto():
    run = CliRunner().invoke(main, ["run", "a fox", "--placement", "auto"])
    assert run.exit_code == 2 and "--placement: 'auto' places the stages over --devices" in run.output, run.output
