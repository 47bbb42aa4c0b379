"""Beyond one host: the engine's Ray cluster, its nodes, and the workers it starts on them.

    Engine(model, cluster="ray", ray_address="HEAD:6379",
           devices=["a/cpu:0", "b/cpu:0"], placement={"a/cpu:0": ["encoder", "decoder"], "b/cpu:0": ["dit"]})

A device `NODE/DEVICE` lives on the node whose Ray label `dfuse-node` is NODE (or, for a node
without one, whose IP is NODE); a device without a node, or on the engine's own node, is this
host's, and its workers start as on one host. For every other node the engine starts one
`NodeAgent` actor there (engine/node_agent.py, pinned with NodeAffinitySchedulingStrategy): it
creates the node's pools, serves them to other nodes, and runs the node's workers (the same
worker code), which talk to the engine over ZeroMQ TCP with an HMAC on every frame.

Nodes are told apart by their Ray node id, never by IP: two nodes may share an IP (as on a test
machine) and must still hand tensors over TCP. Ray is imported only here, and only when a
cluster is asked for.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from dataclasses import dataclass

from .devices import describe_device, is_cpu, split_node
from .launcher import STOP_TIMEOUT_S
from .admission import host_memory
from .node_agent import NodeAgent, encoded
from .transport.slots import SlotPool
from .transport.tcp import FrameSigner, new_secret

log = logging.getLogger("dfuse.cluster")

NODE_LABEL = "dfuse-node"
LOST = -9  # the exit code reported for a worker whose agent is gone (with its node, as a rule)
AGENT_START_TIMEOUT_S = 120.0
POOL_TIMEOUT_S = 10.0  # an agent that is up creates a pool in milliseconds
GPU_QUERY_TIMEOUT_S = 150.0  # the first ask of a node's GPUs starts a child process that imports torch
NODE_WATCH_S = 2.0  # how often the cluster's membership is read (one call to Ray's GCS, off the engine core)


class NodeLost(OSError):
    """A node of the engine's devices left the cluster (its raylet died, the machine went down)."""

    node_lost = True  # what engine/recovery.py checks (it does not import this module: Ray stays optional)


class AgentStarting(OSError):
    """A node's agent is still starting: the engine tries the worker's start again shortly."""


@dataclass(frozen=True)
class AgentInfo:
    """What a started agent says of itself (NodeAgent.info)."""

    pid: int
    slot_server: str  # the address serving its node's pools
    segment_prefix: str  # its pools' names start with it


@dataclass
class _Agent:
    actor: object
    info_ref: object  # what the actor's info() will say once it runs
    info: AgentInfo | None = None


class RayCluster:
    def __init__(self, address: str, devices: list[str]):
        try:
            import ray
        except ImportError:
            raise ValueError("cluster: 'ray' needs Ray installed (pip install 'dfuse[ray]')") from None
        self._ray = ray
        self._connected_here = not ray.is_initialized()  # then closing the engine disconnects too
        if self._connected_here:
            # Only the cluster the user named (never one found by chance), no dashboard here.
            ray.init(address=address, include_dashboard=False, log_to_driver=False,
                     configure_logging=False)
        else:  # this process joined a cluster already (its own ray.init): the engine uses that one
            joined = ray.get_runtime_context().gcs_address
            if joined != address:
                log.warning("ray_address is %s, but this process is connected to the Ray cluster at %s already: "
                            "the engine uses that one", address, joined)
        try:
            self._init_nodes(devices)
        except BaseException:
            if self._connected_here:
                ray.shutdown()
            raise

    def _init_nodes(self, devices: list[str]) -> None:
        ray = self._ray
        self.secret = new_secret()
        self.opener = FrameSigner(self.secret)  # the core thread's: opens every remote worker's frames to the engine
        self.own_node_id = ray.get_runtime_context().get_node_id()
        self._nodes = self._live_nodes()
        self.host = self._nodes[self.own_node_id]["NodeManagerAddress"]  # where the engine listens for workers
        self.node_ids: dict[str, str] = {}  # node name (as devices say it) -> Ray node id
        for device in devices:
            node = split_node(device)[0]
            if node is not None and node not in self.node_ids:
                self.node_ids[node] = self._find(node, self._nodes)
        self._agents: dict[str, _Agent] = {}  # node id -> its NodeAgent
        self._pools_asked: dict[tuple[str, int], tuple] = {}  # (node id, worker id) -> (agent, create_pool's ref)
        self._totals: dict[tuple[str, bool], dict | None] = {}  # (node id, host?) -> its memory, for planning
        self.lost: set[str] = set()  # node names found gone
        # The membership as a thread of its own last read it (a call to Ray's GCS, which may hang
        # while the head is unreachable: never on the engine core), and as `watch` last applied it.
        self._watched: tuple[float, dict[str, dict]] | None = None  # (when its read began, the live nodes)
        self._applied: tuple[float, dict[str, dict]] | None = None
        self._lost_at: dict[str, float] = {}  # node name -> when a call found it gone
        self._stop_watching = threading.Event()
        threading.Thread(target=self._read_membership, name="dfuse-ray-nodes", daemon=True).start()

    # --- nodes ------------------------------------------------------------------------------
    def _live_nodes(self) -> dict[str, dict]:
        return {n["NodeID"]: n for n in self._ray.nodes() if n.get("Alive")}

    def _find(self, name: str, nodes: dict[str, dict]) -> str:
        """The id of the one live node (of `nodes`) with label or IP `name`; ValueError otherwise."""
        by_label = [i for i, n in nodes.items() if (n.get("Labels") or {}).get(NODE_LABEL) == name]
        by_ip = [i for i, n in nodes.items() if n.get("NodeManagerAddress") == name]
        found = by_label or by_ip
        if len(found) != 1:
            known = sorted({(n.get("Labels") or {}).get(NODE_LABEL) or n.get("NodeManagerAddress")
                            for n in nodes.values()})
            why = "no live node" if not found else f"{len(found)} nodes"
            raise ValueError(f"devices: {why} of the Ray cluster has the {NODE_LABEL} label (or IP) {name!r}; "
                             f"nodes: {known}")
        return found[0]

    def is_remote(self, device: str) -> bool:
        """Whether `device`'s workers run on another node than the engine's (through an agent)."""
        node = split_node(device)[0]
        return node is not None and self.node_ids[node] != self.own_node_id

    def node_of(self, device: str) -> str:
        """The Ray node id of `device` (the engine's own for an unprefixed one)."""
        node = split_node(device)[0]
        return self.own_node_id if node is None else self.node_ids[node]

    def node_address(self, device: str) -> str:
        """The address the cluster knows `device`'s node by (its workers bind their sockets there)."""
        return self._nodes[self.node_of(device)]["NodeManagerAddress"]

    # --- agents -----------------------------------------------------------------------------
    def agent(self, device: str, wait: bool = True) -> "_Agent":
        """The NodeAgent of `device`'s node, started there on first use. NodeLost if the node is
        gone. `wait=False` (the engine core, replacing a worker): AgentStarting while a new agent
        starts, rather than block the core for as long as that takes."""
        node_id = self.node_of(device)
        agent = self._agents.get(node_id)
        if agent is None:
            live = self._live_nodes()
            if node_id not in live:
                node_id = self._rejoined(device, live)  # NodeLost unless it is back
            from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

            actor = self._ray.remote(NodeAgent).options(
                num_cpus=0, max_concurrency=256, max_restarts=0,
                scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False)
            ).remote(self.secret, self.node_address(device))
            agent = self._agents[node_id] = _Agent(actor, actor.info.remote())
        if agent.info is None:
            ready, _ = self._ray.wait([agent.info_ref], timeout=AGENT_START_TIMEOUT_S if wait else 0)
            if not ready:
                if node_id not in self._live_nodes():  # Ray keeps an actor for a dead node pending
                    del self._agents[node_id]
                    self._ray.kill(agent.actor)
                    raise self._lose(device)
                if wait:
                    raise TimeoutError(f"the dfuse agent on node {split_node(device)[0]} did not start within "
                                       f"{AGENT_START_TIMEOUT_S:.0f} s")
                raise AgentStarting(f"the dfuse agent on node {split_node(device)[0]} is starting")
            try:
                agent.info = AgentInfo(**self._ray.get(agent.info_ref))
            except Exception as e:  # it could not start: its node is gone, or it failed there
                del self._agents[node_id]
                if node_id not in self._live_nodes():
                    raise self._lose(device) from None
                raise OSError(f"the dfuse agent on node {split_node(device)[0]} failed to start: {e}") from None
            name = split_node(device)[0]
            if name in self.lost:  # it left, came back (`_rejoined`), and runs our agent again
                self.lost.discard(name)
                log.warning("node %s is back in the Ray cluster: its devices serve again", name)
        return agent

    def _call(self, device: str, agent: "_Agent", what: str, ref, timeout: float):
        """ray.get of a call to `device`'s `agent`, its failures as OSError (NodeLost when the
        node is gone): what the engine core's recovery and moves catch, never a Ray exception
        type. An agent that died, or whose node left, is forgotten: the next start makes a new
        one (on the node again once it is back, `_rejoined`)."""
        try:
            return self._ray.get(ref, timeout=timeout)
        except Exception as e:
            gone = self.node_of(device) not in self._live_nodes()
            if gone or isinstance(e, self._ray.exceptions.ActorDiedError):  # not a passing ActorUnavailableError
                self.forget(device, agent.actor)
            if gone:
                raise self._lose(device) from None
            raise OSError(f"{what} on node {split_node(device)[0]} failed: {type(e).__name__}: {e}") from None

    def _read_membership(self) -> None:
        while not self._stop_watching.wait(NODE_WATCH_S):
            try:
                started = time.monotonic()
                self._watched = (started, self._live_nodes())
            except Exception as e:  # the GCS is unreachable for now: read again next time
                log.info("could not read the Ray cluster's nodes: %s", e)

    def watch(self) -> None:
        """Keep `lost` true to Ray's node table (as last read, every NODE_WATCH_S): a node of the
        engine's devices that left is lost even when none of its workers is there to notice
        (none was placed there, or they all stopped), and one that came back under its label or
        IP serves again even when no worker of its restarts to find it. On the engine core."""
        watched = self._watched
        if watched is None or watched is self._applied:
            return
        self._applied = watched
        read_at, live = watched
        for name, node_id in list(self.node_ids.items()):
            if node_id not in live:
                self._agents.pop(node_id, None)  # it went with its node; a worker there starts a new one
                try:
                    node_id = self._find(name, live)
                except ValueError:
                    if name not in self.lost:
                        log.warning("node %s has left the Ray cluster: its devices serve no more until it is back", name)
                    self.lost.add(name)
                    continue
                self._nodes.update(live)
                self.node_ids[name] = node_id
            if name in self.lost and read_at > self._lost_at.get(name, -math.inf):  # not a read from before the loss
                self.lost.discard(name)
                log.warning("node %s is back in the Ray cluster: its devices serve again", name)

    def _rejoined(self, device: str, live: dict[str, dict]) -> str:
        """The node of `device` left; it may be back (`ray start` again with its label or IP),
        under a new Ray node id: then its devices serve again, with a new agent. NodeLost if not."""
        name = split_node(device)[0]
        try:
            node_id = self._find(name, live)
        except ValueError:
            raise self._lose(device) from None
        self._nodes.update(live)  # its address may have changed
        self.node_ids[name] = node_id  # lost until an agent runs there (agent()) or `watch` sees it
        return node_id

    def _lose(self, device: str) -> "NodeLost":
        """`device`'s node is gone (until it comes back): the error to raise."""
        node = split_node(device)[0]
        self.lost.add(node)
        self._lost_at[node] = time.monotonic()
        return NodeLost(f"node {node} of device {device} has left the Ray cluster")

    def lost_devices(self, devices) -> list[str]:
        return [d for d in devices if split_node(d)[0] in self.lost]

    def new_pool(self, device: str, worker_id: int, slot_bytes: int, n_slots: int, wait: bool = True) -> SlotPool:
        """An output pool for a worker on `device`'s node, made by its agent there (the engine's
        credits for it here). `wait=False` on the engine core: AgentStarting while the agent
        starts or makes the pool, rather than block (the next try takes the pool once made)."""
        agent = self.agent(device, wait=wait)
        key = (self.node_of(device), worker_id)
        asked = self._pools_asked.get(key)
        if asked is None or asked[0] is not agent:  # not asked yet, or of an agent since replaced
            asked = self._pools_asked[key] = (agent, agent.actor.create_pool.remote(worker_id, slot_bytes, n_slots))
        if not wait and not self._ray.wait([asked[1]], timeout=0)[0]:
            raise AgentStarting(f"the dfuse agent on node {split_node(device)[0]} is making worker {worker_id}'s pool")
        del self._pools_asked[key]
        name = self._call(device, agent, "creating a pool", asked[1], POOL_TIMEOUT_S)
        return SlotPool(name, slot_bytes, n_slots, served_at=agent.info.slot_server)

    def node_memory(self, device: str) -> dict | None:
        """{"total": bytes, "available": bytes} of the host memory of `device`'s node, measured
        there by its running agent (this host's, measured here), and for a GPU device "gpus":
        {"cuda:0": total bytes, ...} of that node; None when it cannot say (no agent runs there,
        the call failed): then no request is refused for want of it. Changes nothing here: other
        threads than the engine core's may ask (the engine's budgets)."""
        if not self.is_remote(device):
            return host_memory()
        agent = self._agents.get(self.node_of(device))
        gpus = not is_cpu(device)
        try:
            if agent is None or agent.info is None:
                raise OSError("no dfuse agent runs there")
            return self._ray.get(agent.actor.memory.remote(gpus), timeout=GPU_QUERY_TIMEOUT_S if gpus else POOL_TIMEOUT_S)
        except Exception as e:
            log.info("the memory of node %s is not known (%s): its requests are not checked against it",
                     split_node(device)[0], e)
            return None

    def device_memory_gib(self, device: str) -> float:
        """What `device` holds, in GiB, for the planner (engine/auto_placement.py): its GPU's
        memory, or for a CPU device its node's host memory; measured on its node by its agent
        (started now if it is not yet), once per node for its host and once for its GPUs, however
        many devices and plans ask. inf when that cannot be told: the planner then takes it as
        unbounded (the user's memory_limit_gib for it bounds it)."""
        if not self.is_remote(device):
            return describe_device(split_node(device)[1])[1]
        key = (self.node_of(device), is_cpu(device))
        if key not in self._totals:
            try:
                self.agent(device)
                self._totals[key] = self.node_memory(device)
            except OSError as e:
                log.warning("the memory of node %s is not known (%s)", split_node(device)[0], e)
                self._totals[key] = None
        measured = self._totals[key]
        total = None if measured is None else measured["total"] if is_cpu(device) else \
            measured.get("gpus", {}).get(split_node(device)[1])
        if total is None:
            log.warning("the memory of %s is not known: it is planned as unbounded", device)
            return math.inf
        return total / 2**30

    def owns_pool(self, device: str, name: str) -> bool:
        """Whether pool `name` is one of the running agent's on `device`'s node (an agent that
        replaced a dead one has none of its pools)."""
        agent = self._agents.get(self.node_of(device))
        return agent is not None and agent.info is not None and name.startswith(agent.info.segment_prefix)

    def remove_pool(self, device: str, name: str) -> None:
        agent = self._agents.get(self.node_of(device))
        if agent is not None:
            try:
                agent.actor.remove_pool.remote(name)
            except Exception as e:  # its agent is gone, and the pool with it
                log.info("could not remove pool %s: %s", name, e)

    def spawn(self, device: str, spec) -> "RemoteWorkerProcess":
        """Start a worker on `device`'s node (its agent must be up: see `agent`)."""
        agent = self.agent(device, wait=False)
        try:
            exit_ref = agent.actor.run.remote(encoded(spec))
        except Exception as e:
            raise OSError(f"could not start a worker on node {split_node(device)[0]}: {e}") from None
        return RemoteWorkerProcess(self._ray, agent.actor, spec.worker_id, exit_ref)

    def forget(self, device: str, actor) -> None:
        """`device`'s agent `actor` died (its node went, or it was killed): a later spawn starts a
        new one. Only that agent is forgotten: another worker's recovery may have started its
        replacement already."""
        agent = self._agents.get(self.node_of(device))
        if agent is not None and agent.actor is actor:
            del self._agents[self.node_of(device)]

    def close(self) -> None:
        """Stop every agent (each stops its workers and gives its node's resources back). Never
        raises: it runs while the engine closes, maybe after Ray itself went."""
        self._stop_watching.set()
        agents, self._agents = list(self._agents.values()), {}
        if not self._ray.is_initialized():
            return
        try:
            refs = [agent.actor.shutdown.remote() for agent in agents]
            deadline = time.monotonic() + STOP_TIMEOUT_S + 5
            for ref in refs:
                try:
                    self._ray.get(ref, timeout=max(0.1, deadline - time.monotonic()))
                except Exception as e:  # a node already gone: nothing there to stop
                    log.info("an agent could not shut down: %s", e)
            for agent in agents:
                self._ray.kill(agent.actor)
        except Exception as e:
            log.warning("could not stop the agents on other nodes: %s", e)
        if self._connected_here:
            self._ray.shutdown()


class RemoteWorkerProcess:
    """A worker an agent runs on another node, with the interface of launcher.WorkerProcess."""

    remote = True  # its pid is its node's

    def __init__(self, ray, agent, worker_id: int, exit_ref):
        self._ray, self._agent, self._worker_id, self._exit = ray, agent, worker_id, exit_ref
        self.pid: int | None = None  # this node cannot see it; its READY says
        self._code: int | None = None
        self.node_lost = False  # its agent died (its node went, as a rule): its pool went with it

    @property
    def exitcode(self) -> int | None:
        if self._code is None:
            if not self._ray.is_initialized():  # Ray went first (the user's ray.shutdown()): so did this worker
                self._code = LOST
                return self._code
            ready, _ = self._ray.wait([self._exit], timeout=0)
            if ready:
                try:
                    self._code = self._ray.get(self._exit)
                except Exception:  # the agent died: its node is gone, or it was killed
                    self._code, self.node_lost = LOST, True
        return self._code

    @property
    def agent(self):
        return self._agent

    @property
    def alive(self) -> bool:
        return self.exitcode is None

    def send_stop(self) -> None:
        try:
            self._agent.stop.remote(self._worker_id)
        except Exception as e:  # its agent (or Ray itself, at interpreter exit) is gone: so is the worker
            log.info("could not stop worker %d: %s", self._worker_id, e)

    def wait_exit(self, timeout: float) -> bool:
        try:
            if self._ray.is_initialized():
                self._ray.wait([self._exit], timeout=timeout)
        except Exception:
            pass
        return self.exitcode is not None

    def kill(self) -> None:
        """SIGKILL it, through its agent; never waits (the engine core calls this): its agent
        reaps it, and its exit code follows."""
        if self.exitcode is None:
            try:
                self._agent.kill.remote(self._worker_id)
            except Exception as e:
                log.info("could not kill worker %d: %s", self._worker_id, e)

    def reaped(self) -> None:
        """Its agent waited for it and cleaned up after it."""
