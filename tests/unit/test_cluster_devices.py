"""Devices on other nodes of a Ray cluster (`NODE/DEVICE`): one spelling, clear refusals, the
links between nodes, their memory budgets, and the CLI's checks. No Ray, no processes: Ray is
only reached once an Engine starts (engine/cluster.py), which nothing here does."""

import pytest
from click.testing import CliRunner

from dfuse.cli import main
from dfuse.engine.admission import GPU_RESERVE_BYTES, detect_budgets, memory_budgets, stage_budgets
from dfuse.engine.config import EngineConfig, memory_of
from dfuse.engine.devices import canonical_device, check_disjoint, parse_device_list
from dfuse.engine.protocol import WorkerSpec
from dfuse.engine.worker_layout import choose_links
from dfuse.scheduler.core import FUSED

RAY = {"cluster": "ray", "ray_address": "10.0.0.1:6379"}
GIB = 2**30


# --- spelling -------------------------------------------------------------------------------
@pytest.mark.parametrize("given, spelled", [
    ("b/cpu:1,0", "b/cpu:0-1"),
    ("b/cpu:3,0-1", "b/cpu:0-1,3"),
    ("b/cuda", "b/cuda:0"),
    ("b/cuda:07", "b/cuda:7"),
    (" b/cpu ", "b/cpu"),
    ("10.0.0.2/cuda:1", "10.0.0.2/cuda:1"),  # a node named by its IP
    ("b/cpu:0-63", "b/cpu:0-63"),  # another node's cores: not checked against this host's
])
def test_a_device_on_another_node_has_one_spelling(given, spelled):
    assert canonical_device("devices[0]", given) == spelled


@pytest.mark.parametrize("given, detail", [
    ("/cpu:0", "'' is not a node name (letters, digits, '.', '_', '-'"),
    ("b c/cpu:0", "'b c' is not a node name (letters, digits, '.', '_', '-'"),
    ("a/b/cpu:0", "'a/b' is not a node name"),
    ("b/tpu:0", "must be NODE/ followed by 'cpu', 'cuda:N' or a core set 'cpu:A-B'"),
    ("b/cuda:x", "must be NODE/ followed by 'cpu', 'cuda:N'"),
    ("b/", "must be NODE/ followed by 'cpu', 'cuda:N'"),
    ("b/cpu:1-x", "'b/cpu:1-x' is not a core set; write cpu:A, cpu:A-B or cpu:A,B"),
    ("b/cpu:", "is not a core set; write cpu:A, cpu:A-B or cpu:A,B"),
])
def test_a_bad_node_device_is_refused_naming_the_field_and_what_is_allowed(given, detail):
    with pytest.raises(ValueError) as refused:
        canonical_device("devices[1]", given)
    message = str(refused.value)
    assert message.startswith("devices[1]: ") and detail in message


def test_a_remote_core_set_keeps_its_commas_in_a_device_list():
    assert parse_device_list("a/cpu:0,b/cpu:0,1") == ["a/cpu:0", "b/cpu:0,1"]
    assert parse_device_list("b/cpu:0,1,b/cuda:0,cpu:2") == ["b/cpu:0,1", "b/cuda:0", "cpu:2"]


def test_a_node_named_by_its_ip_after_a_core_set_is_a_device_of_its_own():
    assert parse_device_list("cpu:0,10.0.0.2/cpu:1") == ["cpu:0", "10.0.0.2/cpu:1"]


# --- disjoint core sets ---------------------------------------------------------------------
def test_the_same_core_on_two_nodes_is_two_devices():
    check_disjoint(["a/cpu:0", "b/cpu:0", "cpu:0"], "devices")
    check_disjoint(["b/cpu", "c/cpu", "c/cuda:0"], "devices")


@pytest.mark.parametrize("devices, detail", [
    (["b/cpu:0-1", "b/cpu:1-2"], "b/cpu:0-1 and b/cpu:1-2 share CPU 1"),
    (["b/cpu", "b/cpu:0"], "b/cpu and b/cpu:0 share CPUs"),
    (["b/cpu:0", "b/cpu"], "b/cpu:0 and b/cpu share CPUs"),
])
def test_overlapping_cpu_devices_of_one_node_are_refused(devices, detail):
    with pytest.raises(ValueError, match="CPU devices must not overlap") as refused:
        check_disjoint(devices, "devices")
    assert str(refused.value).startswith(f"devices: {detail}")


def test_an_engine_refuses_overlapping_devices_of_one_node():
    with pytest.raises(ValueError, match=r"^devices: b/cpu and b/cpu:1 share CPUs"):
        EngineConfig(devices=["b/cpu", "b/cpu:1"], placement={"b/cpu": [FUSED], "b/cpu:1": [FUSED]}, **RAY)


# --- EngineConfig -----------------------------------------------------------------------------
@pytest.mark.parametrize("fields", [
    {"devices": ["b/cpu:0"], "placement": {"b/cpu:0": [FUSED]}},
    {"devices": ["a/cpu:0", "b/cuda:0"], "placement": "auto"},
    {"devices": "b/cpu:0"},  # the per-stage form: every stage there
])
def test_node_devices_need_cluster_ray(fields):
    with pytest.raises(ValueError) as refused:
        EngineConfig(**fields)
    message = str(refused.value)
    assert message.startswith("devices: ") and "needs cluster='ray'" in message and "ray_address" in message


@pytest.mark.parametrize("address", [
    None, "nohost", "host:abc", ":6379", "host:", 6379,
])
def test_cluster_ray_needs_a_host_and_port(address):
    with pytest.raises(ValueError, match=r"^ray_address: the Ray head's HOST:PORT, e.g. 127.0.0.1:6379"):
        EngineConfig(devices=["b/cpu:0"], placement={"b/cpu:0": [FUSED]}, cluster="ray", ray_address=address)


def test_a_ray_address_without_a_cluster_is_refused():
    with pytest.raises(ValueError, match=r"^ray_address: only with cluster='ray'"):
        EngineConfig(ray_address="10.0.0.1:6379")


def test_an_unknown_cluster_kind_is_refused():
    with pytest.raises(ValueError, match=r"^cluster: must be 'ray' or None .*'k8s'"):
        EngineConfig(cluster="k8s", ray_address="10.0.0.1:6379")


def test_a_cluster_config_keeps_its_node_placement():
    config = EngineConfig(devices=["a/cpu:3,0-2", "b/cuda"],
                          placement={"a/cpu:0-3": ["encoder", "decoder"], "b/cuda:0": ["dit"]}, **RAY)
    assert config.pool == ("a/cpu:0-3", "b/cuda:0")
    assert config.workers == (("a/cpu:0-3", "encoder"), ("b/cuda:0", "dit"), ("a/cpu:0-3", "decoder"))
    assert config.devices_of("dit") == ["b/cuda:0"]
    assert config.threads_per_worker("a/cpu:0-3") == 4  # one thread per core of its node's core set


def test_workers_on_another_nodes_whole_host_get_that_nodes_cores_not_this_hosts():
    from dfuse.engine.node_agent import sized_for_this_node

    config = EngineConfig(devices=["cpu:0", "b/cpu"], placement={"cpu:0": ["encoder"], "b/cpu": ["dit", "decoder"]}, **RAY)
    share = config.remote_cpu_share("b/cpu", workers_there=2)
    spec = WorkerSpec(worker_id=1, stage="dit", model_path="m", device="b/cpu", dtype="float32",
                      cpu_threads=config.threads_per_worker("b/cpu"), task_endpoint="tcp://b", result_endpoint="tcp://a",
                      engine_pid=1, segment_prefix="p", run_dir="/r", cpu_share=share)
    assert sized_for_this_node(spec, cpus=64).cpu_threads == 32  # node b's 64 cores, shared by its two workers
    assert sized_for_this_node(spec, cpus=1).cpu_threads == 1
    assert config.remote_cpu_share("cpu:0", workers_there=1) == 0  # this host's: sized here, as before
    assert EngineConfig(devices=["cpu:0", "b/cpu"], placement={"cpu:0": ["encoder"], "b/cpu": ["dit", "decoder"]},
                        cpu_threads=3, **RAY).remote_cpu_share("b/cpu", 2) == 0  # the user's count holds everywhere


def test_a_placement_naming_a_device_outside_the_node_pool_is_refused():
    with pytest.raises(ValueError, match=r"^placement: 'c/cpu:0' is not in devices \['b/cpu:0'\]"):
        EngineConfig(devices=["b/cpu:0"], placement={"c/cpu:0": [FUSED]}, **RAY)


# --- links between nodes --------------------------------------------------------------------
class _Nodes:
    """A cluster as worker_layout sees it: a device's node is its prefix; node a is the engine's."""

    def node_of(self, device):
        return device.partition("/")[0]

    def is_remote(self, device):
        return self.node_of(device) != "a"


def _links(*workers):
    return choose_links(workers, _Nodes())


def test_stages_on_one_node_share_memory_and_across_nodes_use_tcp():
    assert _links(("a/cpu:0", "encoder"), ("a/cpu:1", "dit"), ("a/cpu:0", "decoder")) == {
        "encoder->dit": "shm", "dit->decoder": "shm", "decoder->engine": "shm"}
    assert _links(("a/cpu:0", "encoder"), ("b/cpu:0", "dit"), ("a/cpu:0", "decoder")) == {
        "encoder->dit": "tcp", "dit->decoder": "tcp", "decoder->engine": "shm"}


def test_a_decoder_on_another_node_hands_its_pixels_to_the_engine_by_tcp():
    links = _links(("a/cpu:0", "encoder"), ("a/cpu:1", "dit"), ("b/cpu:0", "decoder"))
    assert links["dit->decoder"] == "tcp" and links["decoder->engine"] == "tcp"


def test_a_stage_split_over_nodes_uses_both_links():
    links = _links(("a/cpu:0", "encoder"), ("a/cpu:1", "dit"), ("b/cpu:0", "dit"), ("a/cpu:0", "decoder"))
    assert links["encoder->dit"] == "shm+tcp" and links["dit->decoder"] == "shm+tcp"


def test_gpus_of_another_node_are_not_probed_from_the_engine_host():
    # No CUDA here: probing b's GPUs from this host would fail; on their node they hand over in host memory.
    links = _links(("b/cuda:0", "encoder"), ("b/cuda:1", "dit"), ("b/cuda:1", "decoder"))
    assert links == {"encoder->dit": "shm", "dit->decoder": "shm", "decoder->engine": "tcp"}


# --- memory budgets -------------------------------------------------------------------------
def _root(tmp_path, available_gib=4):
    """A fake /proc: this host has `available_gib` free, and no cgroup limit."""
    (tmp_path / "proc").mkdir()
    (tmp_path / "proc/meminfo").write_text(f"MemTotal: {64 * 2**20} kB\nMemAvailable: {available_gib * 2**20} kB\n")
    return tmp_path


def _split_over(remote, **fields):
    """Encoder and decoder on this host's core 0, the DiT on `remote`."""
    return EngineConfig(devices=["cpu:0", remote], placement={"cpu:0": ["encoder", "decoder"], remote: ["dit"]},
                        **RAY, **fields)


@pytest.mark.parametrize("remote", ["b/cpu:0", "b/cuda:0"])
def test_a_remote_node_memory_is_not_measured_here(tmp_path, remote):
    budgets = detect_budgets(_split_over(remote), None, root=_root(tmp_path))
    assert budgets["encoder"] == budgets["decoder"] == int(4 * GIB * 0.8)  # this host's, measured
    assert budgets["dit"] > 1024 * GIB  # not this host's 4 GiB: nothing is refused for want of b's memory


@pytest.mark.parametrize("remote, said, expected", [
    ("b/cpu:0", 10 * GIB, int(10 * GIB * 0.8)),  # what b's agent measured there, with the same share
    ("b/cpu:0", None, None),  # b could not say: nothing refused for want of its memory
    ("b/cuda:0", 16 * GIB, 16 * GIB - GPU_RESERVE_BYTES),  # b's GPU, as b's agent saw it (no weights: no model dir)
    ("b/cuda:0", None, None),
])
def test_another_node_memory_is_what_its_agent_measures(tmp_path, remote, said, expected):
    asked = []

    def node_memory(memory):
        asked.append(memory)
        if said is None:
            return None
        return {"total": 2 * said, "available": said, "gpus": {"cuda:0": said, "cuda:1": 2 * said}}

    budgets = stage_budgets(_split_over(remote), memory_budgets(_split_over(remote), None, root=_root(tmp_path),
                                                                 node_memory=node_memory))
    assert budgets["decoder"] == int(4 * GIB * 0.8)
    assert asked == [memory_of(remote)]
    if expected is None:
        assert budgets["dit"] > 1024 * GIB
    else:
        assert budgets["dit"] == expected


def test_after_a_move_another_node_gpu_keeps_the_total_its_agent_measured(tmp_path):
    """Moves re-budget GPUs (gpus_only) from the reports taken at start: no Ray call then, and
    the node's GPU does not fall back to admitting everything."""
    config = _split_over("b/cuda:0")
    reports = {"b/cuda:0": {"total": 64 * GIB, "available": 32 * GIB, "gpus": {"cuda:0": 16 * GIB}}}
    moved = [("cpu:0", "encoder"), ("b/cuda:0", "dit+decoder")]
    again = memory_budgets(config, None, root=_root(tmp_path), workers=moved, gpus_only=True, node_memory=reports.get)
    assert again == {"b/cuda:0": 16 * GIB - GPU_RESERVE_BYTES}


@pytest.mark.parametrize("remote, limit_key, memory", [
    ("b/cpu:0", "b/cpu", "b/cpu"),
    ("b/cpu:0", "b/cpu:0", "b/cpu"),  # a core set names its node's memory
    ("b/cuda:0", "b/cuda:0", "b/cuda:0"),
    ("b/cuda:0", "b/cuda", "b/cuda:0"),  # as "cuda" is cuda:0 on this host
])
def test_memory_limit_gib_sets_a_remote_node_budget(tmp_path, remote, limit_key, memory):
    config = _split_over(remote, memory_limit_gib={limit_key: 2})
    assert dict(config.memory_limit_gib) == {memory: 2}
    budgets = detect_budgets(config, None, root=_root(tmp_path))
    assert budgets["dit"] == 2 * GIB and budgets["decoder"] == int(4 * GIB * 0.8)


# --- the CLI --------------------------------------------------------------------------------
@pytest.fixture
def no_model_work(monkeypatch):
    """The CLI's checks come first: resolving or reading the model would be a failure here."""
    def refuse(*args, **kwargs):
        raise AssertionError("the model was touched before the options were checked")

    monkeypatch.setattr("dfuse.cli.resolve_model_path", refuse)
    monkeypatch.setattr("dfuse.cli.describe_model", refuse)


@pytest.mark.parametrize("args, flag, detail", [
    (["--devices", "b/cpu:0", "--placement", "b/cpu:0=fused"], "--devices", "needs cluster='ray'"),
    (["--cluster", "ray"], "--ray-address", "the Ray head's HOST:PORT"),
    (["--cluster", "ray", "--ray-address", "nohost"], "--ray-address", "HOST:PORT"),
    (["--ray-address", "10.0.0.1:6379"], "--ray-address", "only with cluster='ray'"),
    (["--cluster", "k8s", "--ray-address", "10.0.0.1:6379"], "Invalid value for '--cluster'", "'k8s' is not 'ray'"),
])
def test_run_refuses_a_bad_cluster_before_any_work(no_model_work, args, flag, detail):
    result = CliRunner().invoke(main, ["run", "a fox", *args])
    assert result.exit_code == 2, result.output
    assert f"Error: {flag}" in result.output and detail in result.output
    assert "Traceback" not in result.output
