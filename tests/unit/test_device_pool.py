"""Device pools and placements (engine/devices.py, EngineConfig): parsing, errors that name the
field, the workers a placement makes, and dispatch by earliest predicted finish."""

import os
from types import SimpleNamespace

import pytest

from dfuse.engine.config import EngineConfig
from dfuse.engine.devices import canonical_device, parse_device_list, parse_placement
from dfuse.engine.dispatch import earliest_finish, fewest_in_flight, observe

two_cores = pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two usable CPUs")
SPLIT = {"cpu:0": ["encoder", "decoder"], "cpu:1": ["dit"]}


def _error(**config) -> str:
    with pytest.raises(ValueError) as info:
        EngineConfig(**config)
    return str(info.value)


@two_cores
def test_core_sets_have_one_spelling():
    assert canonical_device("d", "cpu:1,0") == "cpu:0-1"
    assert canonical_device("d", " cpu:1 ") == "cpu:1"
    assert canonical_device("d", "cpu") == "cpu"


@pytest.mark.parametrize("device, says", [
    ("cpu:x", "is not a core set"), ("cpu:", "is not a core set"), ("cpu:4096", "may not use; usable CPUs"),
    ("tpu:0", "'cpu', 'cuda' or 'cuda:N', or a core set"), ("cuda:0", "is not available here"),
])
def test_bad_devices_are_refused_naming_the_field(device, says):
    if device == "cuda:0":
        pytest.importorskip("torch").cuda.is_available() and pytest.skip("this machine has a GPU")
    with pytest.raises(ValueError, match=f"^devices\\[1\\]: .*{says}"):
        canonical_device("devices[1]", device)


@two_cores
def test_a_placement_makes_one_worker_per_device_and_stage():
    config = EngineConfig(devices=["cpu:0", "cpu:1"], placement=SPLIT)
    assert config.workers == (("cpu:0", "encoder"), ("cpu:1", "dit"), ("cpu:0", "decoder"))
    assert dict(config.instances) == {"encoder": 1, "dit": 1, "decoder": 1}
    assert config.layout() == {"cpu:0": ["encoder", "decoder"], "cpu:1": ["dit"]}
    assert config.threads_per_worker("cpu:1") == 1  # one thread per core of its device
    both = EngineConfig(placement={"cpu:0": ["encoder", "dit", "decoder"], "cpu:1": ["dit"]})
    assert both.devices == ("cpu:0", "cpu:1") and both.devices_of("dit") == ["cpu:0", "cpu:1"]
    assert both.instances["dit"] == 2


@two_cores
@pytest.mark.parametrize("config, field, says", [
    (dict(devices=["cpu:0", "cpu:1"], placement={"cpu:0": ["encoder", "decoder"]}), "placement", "no device hosts the dit"),
    (dict(devices=["cpu:0"], placement=SPLIT), "placement", "'cpu:1' is not in devices"),
    (dict(devices=["cpu:0", "cpu:0-1"], placement=SPLIT), "devices", "share CPU 0"),
    (dict(devices=["cpu:0", "cpu:1"], placement={"cpu:0": ["encoder", "decoder"], "cpu:1": ["dit", "dit"]}),
     "placement (cpu:1)", "names a stage twice"),
    (dict(placement={"cpu:0": ["encoder+dit+decoder", "dit"]}), "placement (cpu:0)", "holds the whole pipeline"),
    (dict(placement={"cpu:0": ["encoder", "decoder"], "cpu:1": ["dit"], "cpu:9": ["dit"]}), "placement (cpu:9)",
     "may not use"),
    (dict(placement=SPLIT, instances={"dit": 2}), "instances", "not with a placement"),
    (dict(devices=["cpu:0", "cpu:1"], placement="balanced"), "placement", "expected 'auto' or a mapping"),
    (dict(placement=SPLIT, memory_limit_gib={"cuda:0": 1}), "memory_limit_gib", "not a device"),
    (dict(placement=SPLIT, dispatch="random"), "dispatch", "earliest-finish, fewest-in-flight"),
    (dict(devices={"encoder": "cpu", "dit": "cpu:0", "decoder": "cpu:1"}), "device", "share CPU"),
    (dict(devices=["cpu:0", "cpu:1"], placement={"cpu:0": ["encoder", "decoder"], "cpu:0-0": ["dit"]}), "placement",
     "names cpu:0 again"),
    (dict(placement=SPLIT, memory_limit_gib={"cpu": 8, "cpu:0": 2}), "memory_limit_gib", "name one memory twice"),
])
def test_bad_placements_are_refused_naming_the_field(config, field, says):
    message = _error(**config)
    assert message.startswith(field + ": ") and says in message, message


@two_cores
def test_a_pool_config_rebuilt_with_replace_keeps_its_workers():
    import dataclasses

    config = EngineConfig(placement={"cpu:0": ["encoder", "dit", "decoder"], "cpu:1": ["dit"]})
    assert dataclasses.replace(config, dispatch="fewest-in-flight").workers == config.workers


@two_cores
def test_cpu_devices_share_the_hosts_memory_limit():
    config = EngineConfig(placement=SPLIT, memory_limit_gib={"cpu": 4})
    assert dict(config.memory_limit_gib) == {"cpu": 4}


def test_the_cli_forms_parse():
    assert parse_device_list("cpu:0,cpu:1,cuda:0") == ["cpu:0", "cpu:1", "cuda:0"]
    assert parse_device_list("cpu:0,1,cuda:0") == ["cpu:0,1", "cuda:0"]
    assert parse_placement("cpu:0=encoder+decoder,cpu:1=dit") == SPLIT
    with pytest.raises(ValueError, match="^placement: expected device=stage"):
        parse_placement("cpu:0")


def _worker(id, task_s, tasks):
    return SimpleNamespace(id=id, task_s=task_s, batches=[{i} for i in range(tasks)], inflight={i: 0 for i in range(tasks)})


def anyone(_worker) -> bool:
    return True


def test_dispatch_picks_the_earliest_predicted_finish():
    fast, slow = _worker(0, 0.1, 1), _worker(1, 0.4, 0)
    assert earliest_finish([fast, slow], anyone) is fast  # 2 x 0.1 s beats 1 x 0.4 s: busy but fast wins
    assert fewest_in_flight([fast, slow], anyone) is slow  # the baseline is blind to speed
    assert earliest_finish([_worker(0, 0.1, 4), slow], anyone) is slow  # 5 x 0.1 s loses to 0.4 s
    assert earliest_finish([], anyone) is None


def test_only_workers_that_can_take_a_task_are_chosen():
    fast, slow = _worker(0, 0.1, 2), _worker(1, 0.5, 0)
    below_the_limit = lambda w: len(w.batches) < 2  # noqa: E731
    assert earliest_finish([fast, slow], below_the_limit) is slow
    assert earliest_finish([fast], below_the_limit) is None


def test_on_equal_or_unmeasured_devices_dispatch_is_fewest_in_flight():
    assert earliest_finish([_worker(0, None, 2), _worker(1, None, 1), _worker(2, None, 1)], anyone).id == 1
    assert earliest_finish([_worker(0, 0.2, 1), _worker(1, None, 0)], anyone).id == 1  # assumed as fast as the others


def test_a_workers_time_per_task_follows_its_measurements():
    seconds = None
    for measured in (1.0, 1.0, 3.0):
        seconds = observe(seconds, measured)
    assert seconds == pytest.approx(0.3 * 3.0 + 0.7 * 1.0)  # the newest task weighs 0.3
