"""`dfuse bench sweep --devices/--placement` without running a sweep: bad values and a pool given
with --device/--instances are usage errors naming the flags before any process starts; a good pool
becomes the sweep's layout; the monolithic baseline gets one pinned process per pool device; a
moving engine worker is sampled in the stage it moves to."""

import os
from types import SimpleNamespace

import pytest
from click.testing import CliRunner

from dfuse.bench.sweep import command as sweep
from dfuse.bench.sweep.monolithic import describe, monolithic_configs
from dfuse.bench.sweep.report import layout_line
from dfuse.bench.sweep.runners import device_stages
from dfuse.cli import main

SYNTHETIC = "synthetic:encoder=5ms,dit=20ms,decoder=10ms,mode=sleep"
CORES = sorted(os.sched_getaffinity(0))
A = f"cpu:{CORES[0]}"  # a one-core device of this machine
NOT_OURS = max(CORES) + 1  # a CPU this process may not use
POOL = ["--devices", "cpu:0,cpu:1", "--placement", "cpu:0=encoder+decoder,cpu:1=dit"]  # refused before it is checked


@pytest.fixture
def no_sweep(monkeypatch):
    """Any start of the sweep (or of an engine or a monolithic process) fails the test."""
    for name in ("run_sweep", "planned_requests", "EngineRunner", "MonoRunner"):
        monkeypatch.setattr(sweep, name, lambda *a, **k: pytest.fail("a usage error started the sweep"))


@pytest.mark.parametrize("args,flags,says", [
    (["--devices", "tpu:0", "--placement", "tpu:0=encoder+dit+decoder"], ["--devices"], "'cpu', 'cuda' or 'cuda:N'"),
    (["--devices", f"cpu:{NOT_OURS}", "--placement", f"cpu:{NOT_OURS}=encoder+dit+decoder"], ["--devices"],
     "may not use"),
    (["--placement", f"cpu:{NOT_OURS}=encoder+dit+decoder"], ["--placement"], "may not use"),
    (["--devices", A, "--placement", f"{A}=encoder+dit"], ["--placement"], "decoder stage"),
    (["--devices", A, "--placement", f"{A}=encoder+vae"], ["--placement"], "unknown stage 'vae'"),
    (["--devices", A, "--placement", "encoder+dit+decoder"], ["--placement"], "device=stage+stage"),
    (["--placement", "auto"], ["--placement auto", "--devices"], "places the stages over --devices"),
    (["--modes", "mono,auto"], ["--modes", "--devices"], "auto places the stages over a device pool"),
    ([*POOL, "--instances", "dit=2"], ["--devices/--placement", "--device/--instances", "--instances dit=2"],
     "not both"),
    ([*POOL, "--device", "cuda:0"], ["--devices/--placement", "--device cuda:0"], "not both"),
    (["--placement", "cpu=encoder+dit+decoder", "--instances", "encoder=1,dit=2,decoder=1"],
     ["--instances encoder=1,dit=2,decoder=1"], "not both"),
])
def test_bad_pool_options_are_usage_errors_naming_the_flag(no_sweep, args, flags, says):
    result = CliRunner().invoke(main, ["bench", "sweep", "--model", SYNTHETIC, "--rates", "2", *args])
    assert result.exit_code == 2, result.output
    for flag in flags:
        assert flag in result.output, result.output
    assert says in result.output, result.output


def _config(modes="mono,static,elastic", instances=sweep.DEFAULT_INSTANCES, device=sweep.DEFAULT_DEVICE, pool=None,
            placement=None):
    """config_from_options as the command calls it (no process starts)."""
    return sweep.config_from_options(SYNTHETIC, "2", "poisson", modes, 3.0, instances, device, None, None, None, None,
                                     0, 10.0, 0.0, pool, placement)


@pytest.mark.skipif(len(CORES) < 2, reason="needs two usable CPUs")
def test_a_pool_becomes_the_sweeps_canonical_layout():
    a, b = (f"cpu:{c}" for c in CORES[:2])
    config = _config(pool=f"{b},{a}", placement=f"{a}=decoder+encoder,{b}=dit")
    assert config.devices == (b, a)  # the pool in the given order
    assert config.placement == {b: ("dit",), a: ("encoder", "decoder")}  # pool order, stages in pipeline order
    assert config.instances == {"encoder": 1, "dit": 1, "decoder": 1}
    line = layout_line({"devices": list(config.devices), "instances": config.instances,
                        "placement": {d: list(s) for d, s in config.placement.items()}})
    assert line.startswith(f"device pool {b},{a}, placement {b}=dit,{a}=encoder+decoder")
    per_stage = _config(modes="static", instances="encoder=1,dit=2,decoder=1")
    assert per_stage.placement is None and per_stage.devices == "cpu"


def test_the_monolithic_baseline_runs_one_pinned_process_per_pool_device():
    configs = monolithic_configs("/models/sd3", {}, {}, None, pool=("cpu:0", "cpu:2-3", "cpu", "cuda:0"))
    cores = os.cpu_count() or 1
    assert [(c.device, c.cpus, c.threads) for c in configs] == [
        ("cpu:0", (0,), 1), ("cpu:2-3", (2, 3), 2), ("cpu", None, cores), ("cuda:0", None, 1)]
    assert "on cpu:2-3 pinned to CPU 2-3 with 2 torch thread(s)" in describe(configs, pool=True)
    threads = monolithic_configs("/models/sd3", {}, {}, 4, pool=("cpu:0-1",))
    assert [(c.cpus, c.threads) for c in threads] == [((0, 1), 4)]  # --mono-threads wins
    # a synthetic model: one process per pool device too, not one per engine worker
    synthetic = monolithic_configs(SYNTHETIC, {}, {"encoder": 1, "dit": 3, "decoder": 1}, None, pool=("cpu:0", "cpu:1"))
    assert [(c.device, c.cpus) for c in synthetic] == [("cpu:0", (0,)), ("cpu:1", (1,))]
    # without a pool, today's baseline: one unpinned process per engine worker
    per_worker = monolithic_configs(SYNTHETIC, {"encoder": "cpu", "dit": "cpu", "decoder": "cpu"},
                                    {"encoder": 1, "dit": 3, "decoder": 1}, None)
    assert [(c.device, c.cpus, c.threads) for c in per_worker] == [("cpu", None, 1)] * 5


def test_a_moving_worker_is_sampled_in_the_stage_it_moves_to():
    def worker(device, stage, moving_to=None):
        return SimpleNamespace(device=device, stage=stage, moving_to=moving_to)

    stats = SimpleNamespace(
        placement={"cpu:0": ["encoder", "decoder", "decoder"], "cpu:1": ["dit"], "cpu:2": []},
        workers=[worker("cpu:0", "decoder"), worker("cpu:0", "decoder", moving_to="encoder"),
                 worker("cpu:0", "encoder"), worker("cpu:1", "dit")])
    assert device_stages(stats) == {"cpu:0": ["encoder", "encoder", "decoder"], "cpu:1": ["dit"], "cpu:2": []}
