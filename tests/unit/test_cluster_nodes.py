"""How RayCluster keeps track of nodes that leave and come back, and of agents that die, against
a cluster whose membership the test sets (no Ray runs: these are its bookkeeping rules; the e2e
tests in tests/e2e/test_ray_cluster.py run them on real Ray nodes)."""

import math
import time
from types import SimpleNamespace

import pytest

pytest.importorskip("ray")  # its exception types and scheduling strategy are the real ones

import ray.exceptions  # noqa: E402

from dfuse.engine.auto_placement import device_memory_gb  # noqa: E402
from dfuse.engine.cluster import AgentStarting, NodeLost, RayCluster  # noqa: E402
from dfuse.engine.config import EngineConfig  # noqa: E402
from dfuse.engine.devices import describe_device  # noqa: E402


A, B, B2 = "aa" * 28, "bb" * 28, "cc" * 28  # Ray node ids (hex, as NodeAffinitySchedulingStrategy checks)


class _Ref:
    def __init__(self, value=None, error=None):
        self.value, self.error = value, error


class _FakeRay:
    """What RayCluster asks of the `ray` module, with the membership and the calls' outcomes set
    by the test."""

    exceptions = ray.exceptions

    def __init__(self):
        self.members = {}  # node id -> (label, address, alive)
        self.actors = []
        self.pool_error = None  # what the next create_pool call fails with
        self.busy = False  # calls made are not answered yet
        self.pools_asked = 0
        self.memory_asked = 0

    def nodes(self):
        return [{"NodeID": i, "Alive": alive, "Labels": {"dfuse-node": label}, "NodeManagerAddress": address}
                for i, (label, address, alive) in self.members.items()]

    def wait(self, refs, timeout=None):
        if self.busy:  # the agent has not answered yet
            return [], refs
        return refs, []

    def get(self, ref, timeout=None):
        if ref.error is not None:
            raise ref.error
        return ref.value

    def kill(self, actor):
        pass

    def remote(self, cls):
        fake = self

        class Options:
            def options(self, **kw):
                return self

            def remote(self, secret, address):
                actor = SimpleNamespace(address=address)
                actor.info = SimpleNamespace(remote=lambda: _Ref(
                    {"pid": 1, "slot_server": f"tcp://{address}:1", "segment_prefix": f"p{len(fake.actors)}"}))
                def create_pool(worker_id, size, count):
                    fake.pools_asked += 1
                    return _Ref(f"p{len(fake.actors)}w{worker_id}", fake.pool_error)

                actor.create_pool = SimpleNamespace(remote=create_pool)
                def memory(gpus):  # what NodeAgent.memory measures there
                    fake.memory_asked += 1
                    return _Ref({"total": 64 << 30, "available": 32 << 30, **({"gpus": {"cuda:0": 80 << 30}} if gpus else {})})

                actor.memory = SimpleNamespace(remote=memory)
                fake.actors.append(actor)
                return actor

        return Options()


def _cluster(fake):
    fake.members = {A: ("a", "10.0.0.1", True), B: ("b", "10.0.0.2", True)}
    cluster = RayCluster.__new__(RayCluster)
    cluster._ray = fake
    cluster.secret = b"s" * 32
    cluster.own_node_id = A
    cluster._nodes = cluster._live_nodes()
    cluster.node_ids = {"a": A, "b": B}
    cluster._agents = {}
    cluster._pools_asked = {}
    cluster._totals = {}
    cluster.lost = set()
    cluster._watched = cluster._applied = None
    cluster._lost_at = {}
    return cluster


def _watch(cluster):
    cluster._watched = (time.monotonic(), cluster._live_nodes())  # what its thread reads every NODE_WATCH_S
    cluster.watch()  # on the engine core's next health check


def test_a_node_that_leaves_is_lost_until_it_comes_back_under_its_label_then_serves_again():
    fake = _FakeRay()
    cluster = _cluster(fake)
    first = cluster.new_pool("b/cpu:1", 1, 1024, 2)
    assert first.served_at == "tcp://10.0.0.2:1"
    fake.members[B] = ("b", "10.0.0.2", False)  # b's raylet died
    fake.pool_error = ray.exceptions.ActorDiedError()
    with pytest.raises(NodeLost):
        cluster.new_pool("b/cpu:1", 1, 1024, 2)
    assert cluster.lost_devices(["a/cpu:0", "b/cpu:1"]) == ["b/cpu:1"]
    assert cluster._agents == {}  # its dead agent is forgotten
    with pytest.raises(NodeLost):  # still gone
        cluster.new_pool("b/cpu:1", 1, 1024, 2)
    fake.members[B2] = ("b", "10.0.0.9", True)  # `ray start` again: a new node id, maybe a new address
    fake.pool_error = None
    again = cluster.new_pool("b/cpu:1", 1, 1024, 2)
    assert cluster.lost_devices(["a/cpu:0", "b/cpu:1"]) == []
    assert cluster.node_of("b/cpu:1") == B2 and cluster.node_address("b/cpu:1") == "10.0.0.9"
    assert again.served_at == "tcp://10.0.0.9:1" and len(fake.actors) == 2  # a new agent there


def test_an_agent_that_died_on_a_live_node_is_replaced_and_a_passing_outage_keeps_it():
    fake = _FakeRay()
    cluster = _cluster(fake)
    cluster.new_pool("b/cpu:1", 1, 1024, 2)
    fake.pool_error = ray.exceptions.ActorUnavailableError("a network blip", None)
    with pytest.raises(OSError, match="creating a pool on node b failed"):
        cluster.new_pool("b/cpu:1", 1, 1024, 2)
    assert len(cluster._agents) == 1  # kept: it may answer again; a second agent there would orphan the first
    fake.pool_error = ray.exceptions.ActorDiedError()
    with pytest.raises(OSError) as raised:
        cluster.new_pool("b/cpu:1", 1, 1024, 2)
    assert not isinstance(raised.value, NodeLost) and cluster._agents == {}  # the node is up: only the agent died
    fake.pool_error = None
    cluster.new_pool("b/cpu:1", 1, 1024, 2)
    assert len(fake.actors) == 2 and cluster.lost_devices(["b/cpu:1"]) == []


def test_a_node_without_workers_is_seen_to_leave_and_to_come_back_by_the_cores_watch():
    fake = _FakeRay()
    cluster = _cluster(fake)  # b hosts no worker: nothing of the engine's calls it
    _watch(cluster)
    assert cluster.lost_devices(["a/cpu:0", "b/cpu:1"]) == []
    fake.members[B] = ("b", "10.0.0.2", False)  # b's raylet died
    _watch(cluster)
    assert cluster.lost_devices(["a/cpu:0", "b/cpu:1"]) == ["b/cpu:1"]
    fake.members[B2] = ("b", "10.0.0.9", True)  # `ray start` again: a new node id and address
    _watch(cluster)
    assert cluster.lost_devices(["a/cpu:0", "b/cpu:1"]) == []
    assert cluster.node_of("b/cpu:1") == B2 and cluster.node_address("b/cpu:1") == "10.0.0.9"
    assert cluster.new_pool("b/cpu:1", 1, 1024, 2).served_at == "tcp://10.0.0.9:1"  # a worker may start there


def test_a_node_whose_workers_all_stopped_is_back_without_a_worker_restarting_there():
    fake = _FakeRay()
    cluster = _cluster(fake)
    cluster.new_pool("b/cpu:1", 1, 1024, 2)
    fake.members[B] = ("b", "10.0.0.2", False)
    fake.pool_error = ray.exceptions.ActorDiedError()
    with pytest.raises(NodeLost):  # a worker's restart there finds it gone ...
        cluster.new_pool("b/cpu:1", 1, 1024, 2)
    fake.members[B2] = ("b", "10.0.0.2", True)  # ... and none tries again (it was leaving anyway)
    _watch(cluster)
    assert cluster.lost_devices(["b/cpu:1"]) == [] and cluster.node_of("b/cpu:1") == B2
    fake.pool_error = None
    cluster.new_pool("b/cpu:1", 1, 1024, 2)  # a worker starts there: an agent on B2
    fake.members[B2] = ("b", "10.0.0.2", False)  # gone again: the watch forgets that agent with its node
    _watch(cluster)
    assert cluster.lost_devices(["b/cpu:1"]) == ["b/cpu:1"] and cluster._agents == {}


def test_the_planner_is_given_the_memory_each_node_measures_for_its_devices():
    fake = _FakeRay()
    cluster = _cluster(fake)
    config = EngineConfig(model="synthetic:encoder=1ms", cluster="ray", ray_address="127.0.0.1:6379",
                          devices=["cpu:0", "b/cpu:0", "b/cpu:1", "b/cuda:0", "b/cuda:1"], placement="auto")
    gb = device_memory_gb(config, cluster)
    assert gb["cpu:0"] == pytest.approx(describe_device("cpu:0")[1] * 2**30 / 1e9)  # this host's: its only CPU device
    assert gb["b/cpu:0"] == gb["b/cpu:1"] == pytest.approx(32 * 2**30 / 1e9)  # node b's 64 GiB, shared by two
    assert gb["b/cuda:0"] == pytest.approx(80 * 2**30 / 1e9)
    assert gb["b/cuda:1"] == math.inf  # node b reports no such GPU: planned as unbounded, not as empty
    device_memory_gb(config, cluster)  # a second plan (auto placement, then the elastic policy's) ...
    assert fake.memory_asked == 2  # ... asks nothing more: node b was asked once for its host, once for its GPUs


def test_a_membership_read_before_a_node_was_found_gone_does_not_bring_it_back():
    fake = _FakeRay()
    cluster = _cluster(fake)
    cluster.new_pool("b/cpu:1", 1, 1024, 2)
    stale = (time.monotonic(), cluster._live_nodes())  # read while b was still up ...
    fake.members[B] = ("b", "10.0.0.2", False)
    fake.pool_error = ray.exceptions.ActorDiedError()
    with pytest.raises(NodeLost):  # ... then a call finds it gone ...
        cluster.new_pool("b/cpu:1", 1, 1024, 2)
    cluster._watched = stale  # ... and the engine core applies the older read
    cluster.watch()
    assert cluster.lost_devices(["b/cpu:1"]) == ["b/cpu:1"]
    _watch(cluster)  # a read after the loss: still gone
    assert cluster.lost_devices(["b/cpu:1"]) == ["b/cpu:1"]


def test_the_engine_core_never_waits_for_an_agent_making_a_pool():
    fake = _FakeRay()
    cluster = _cluster(fake)
    cluster.agent("b/cpu:1")  # up
    fake.busy = True  # its answers are slow (a loaded node, a slow network)
    for _ in range(3):
        with pytest.raises(AgentStarting, match="making worker 1's pool"):  # the core retries later
            cluster.new_pool("b/cpu:1", 1, 1024, 2, wait=False)
    fake.busy = False
    pool = cluster.new_pool("b/cpu:1", 1, 1024, 2, wait=False)
    assert pool.served_at == "tcp://10.0.0.2:1" and fake.pools_asked == 1  # asked once, taken when made
