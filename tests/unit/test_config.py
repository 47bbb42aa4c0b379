"""EngineConfig: what its settings derive, and a ValueError naming the field for every bad value."""
import dataclasses
import os

import pytest
import torch

from dfuse.engine.config import (
    MAX_INSTANCES,
    EngineConfig,
    TransportConfig,
    parse_instances,
    parse_memory_limits,
)
from dfuse.engine.models import resolve_model_path
from dfuse.scheduler.core import STAGES

no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message given without CUDA")


def _raises_for(field: str, **kwargs) -> ValueError:
    with pytest.raises(ValueError) as info:
        EngineConfig(**kwargs)
    assert str(info.value).startswith(field), str(info.value)
    return info.value


def test_what_the_defaults_derive():
    """Values derived from the settings (the settings' own default values are not tested)."""
    config = EngineConfig()
    assert list(config.instances) == list(STAGES)  # in stage order
    assert TransportConfig(cpu_wake_latency_us=None).cpu_wake_latency_us is None  # leave it to the OS
    assert config.transport.slot_bytes == config.transport.slot_mib * 2**20
    assert config.torch_dtype("cpu") == torch.float32
    assert config.torch_dtype("cuda:0") == torch.bfloat16
    assert config.threads_per_worker() == max(1, (os.cpu_count() or 1) // 3)


def test_config_is_frozen_and_its_mappings_read_only():
    config = EngineConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.dtype = "float16"
    with pytest.raises(TypeError):
        config.instances["dit"] = 4
    with pytest.raises(TypeError):
        config.devices["dit"] = "cuda"


def test_one_value_or_a_partial_mapping_per_stage():
    config = EngineConfig(instances={"dit": 3}, cpu_threads=2, dtype="bfloat16")
    assert dict(config.instances) == {"encoder": 1, "dit": 3, "decoder": 1}
    assert config.threads_per_worker() == 2 and config.torch_dtype("cpu") == torch.bfloat16
    assert dict(EngineConfig(instances=MAX_INSTANCES).instances) == {s: MAX_INSTANCES for s in STAGES}
    assert EngineConfig(model=os.curdir).model == os.curdir  # path-like accepted, stored as str


def test_caller_mapping_is_copied():
    instances = {"dit": 2}
    config = EngineConfig(instances=instances)
    instances["dit"] = 0
    assert config.instances["dit"] == 2


@pytest.mark.parametrize("value", [0, 65, -1, "2", True, 2.0, None, {"dit": 0}, {"dit": 65}, {"dit": "2"}, {"dit": False}])
def test_bad_instances(value):
    _raises_for("instances", instances=value)


@pytest.mark.parametrize("field", ["instances", "devices"])
def test_unknown_stage_names(field):
    value = {"vae": 1} if field == "instances" else {"vae": "cpu"}
    error = _raises_for(field.removesuffix("s"), **{field: value})
    assert "vae" in str(error) and "encoder, dit, decoder" in str(error)


# ids spell the value as a repr: tests/conftest.py skips items whose keywords include "gpu".
@pytest.mark.parametrize("device", ["gpu", "cuda:x", "cuda:-1", "CPU", "cuda0", "", "mps"], ids=repr)
def test_bad_device_names(device):
    # The message says "device": the user-facing name (Engine(device=...), `dfuse run --device`).
    error = _raises_for("device", devices=device)
    assert repr(device) in str(error)
    _raises_for("device (dit)", devices={"dit": device})


@no_cuda
@pytest.mark.parametrize("device", ["cuda", "cuda:0", "cuda:3"])
def test_cuda_without_cuda_lists_the_available_devices(device):
    error = _raises_for("device", devices={"decoder": device})
    assert str(error).startswith("device (decoder)")
    assert "available devices: cpu" in str(error)


def test_bare_cuda_means_the_first_gpu_everywhere(monkeypatch):
    # A worker's torch.cuda.set_device("cuda") raises (no index), and "cuda" != "cuda:0" would
    # make two stages on one GPU look like two devices: the config spells it out once.
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    config = EngineConfig(devices={"encoder": "cpu", "dit": "cuda", "decoder": "cuda:0"},
                          memory_limit_gib={"cuda": 8})
    assert dict(config.devices) == {"encoder": "cpu", "dit": "cuda:0", "decoder": "cuda:0"}
    assert dict(config.memory_limit_gib) == {"cuda:0": 8}


def test_one_memory_limit_number_holds_for_every_memory(monkeypatch):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    config = EngineConfig(devices={"encoder": "cpu", "dit": "cuda:0", "decoder": "cuda:0"}, memory_limit_gib=8)
    assert dict(config.memory_limit_gib) == {"cpu": 8, "cuda:0": 8}


@pytest.mark.parametrize("value", [0, -1.0, float("nan"), True, "8", [8]])
def test_bad_memory_limits(value):
    _raises_for("memory_limit_gib", memory_limit_gib=value)


def test_parse_memory_limits():
    assert parse_memory_limits("8") == 8.0
    assert parse_memory_limits(" 0.5 ") == 0.5
    assert parse_memory_limits("cpu=8, cuda:0=40.5,") == {"cpu": 8.0, "cuda:0": 40.5}


@pytest.mark.parametrize("text", ["", "eight", "cpu=", "=8", "cpu:8", "cpu=8,cuda:0"])
def test_parse_memory_limits_rejects(text):
    with pytest.raises(ValueError, match="^memory_limit_gib: expected GiB as one number .* device=GiB pairs"):
        parse_memory_limits(text)


@pytest.mark.parametrize("value", [0, None, {"cpu"}])
def test_devices_of_the_wrong_type(value):
    _raises_for("device", devices=value)


def test_non_string_device_in_a_mapping():
    _raises_for("device", devices={"dit": 0})


@pytest.mark.parametrize("dtype", ["fp16", "float64", "Float32", None, torch.float32])
def test_bad_dtype(dtype):
    _raises_for("dtype", dtype=dtype)


@pytest.mark.parametrize("value", [0, -1, 1025, 1.5, "4", True])
def test_bad_cpu_threads(value):
    _raises_for("cpu_threads", cpu_threads=value)


@pytest.mark.parametrize("model", ["", 3, None])
def test_bad_model(model):
    _raises_for("model", model=model)


@pytest.mark.parametrize(
    "field, value",
    [
        ("max_inflight_per_worker", 0), ("max_inflight_per_worker", 65), ("max_attempts", 0),
        ("max_attempts", 1.0), ("startup_timeout_s", 0), ("startup_timeout_s", -1.0),
        ("startup_timeout_s", float("nan")), ("startup_timeout_s", "600"),
    ],
)
def test_bad_limits(field, value):
    _raises_for(field, **{field: value})


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(slot_mib=0), "transport.slot_mib"), (dict(slot_mib=4097), "transport.slot_mib"),
        (dict(slot_mib=1.5), "transport.slot_mib"), (dict(slot_mib=True), "transport.slot_mib"),
        (dict(slots_per_worker=0), "transport.slots_per_worker"),
        (dict(slots_per_worker=65), "transport.slots_per_worker"),
        (dict(cpu_wake_latency_us=-1), "transport.cpu_wake_latency_us"),
        (dict(cpu_wake_latency_us=1_000_001), "transport.cpu_wake_latency_us"),
        (dict(cpu_wake_latency_us=2.5), "transport.cpu_wake_latency_us"),
        (dict(cpu_wake_latency_us=False), "transport.cpu_wake_latency_us"),
    ],
)
def test_bad_transport(kwargs, field):
    with pytest.raises(ValueError) as info:
        TransportConfig(**kwargs)
    assert str(info.value).startswith(field), str(info.value)


@pytest.mark.parametrize("value", [{"slot_mib": 0}, 16])
def test_transport_of_the_wrong_type(value):
    _raises_for("transport", transport=value)


def test_startup_timeout_rejects_bool():
    _raises_for("startup_timeout_s", startup_timeout_s=True)


def test_parse_instances():
    assert parse_instances("dit=2") == {"encoder": 1, "dit": 2, "decoder": 1}
    assert parse_instances(" encoder = 2 , decoder=3,") == {"encoder": 2, "dit": 1, "decoder": 3}
    assert parse_instances("") == {s: 1 for s in STAGES}
    assert list(parse_instances("decoder=2,encoder=1")) == list(STAGES)


@pytest.mark.parametrize("text", ["dit=two", "gpu=1", "dit", "dit=", "=2", "dit=-1", "dit=1.5", "dit:2"])
def test_parse_instances_rejects(text):
    with pytest.raises(ValueError) as info:
        parse_instances(text)
    assert str(info.value).startswith("instances"), str(info.value)


def test_parse_instances_rejects_superscript_digits():
    with pytest.raises(ValueError, match="^instances"):
        parse_instances("dit=²")


def test_resolve_missing_model_path(tmp_path):
    missing = tmp_path / "no-such-model"
    with pytest.raises(ValueError) as info:
        resolve_model_path(str(missing))
    assert str(info.value).startswith("model"), str(info.value)
    assert "tiny-sd3" in str(info.value)  # it lists the built-in names


def test_resolve_existing_folder(tmp_path):
    assert resolve_model_path(str(tmp_path)) == tmp_path.resolve()


def test_engine_refuses_a_config_that_is_not_an_engine_config():
    from dfuse import Engine

    with pytest.raises(ValueError, match=r"^config: must be an EngineConfig \(got str\)"):
        Engine(config="tiny-sd3")
