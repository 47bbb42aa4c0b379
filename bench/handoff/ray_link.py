"""The `ray-object-ref` mechanism of `dfuse bench handoff --link tcp`: one hop through Ray's
object store between two nodes of a running cluster (--ray-address).

Direction: producer node -> consumer node. An actor pinned (NodeAffinitySchedulingStrategy,
soft=False) on a node other than the bench's driver writes the array (not timed), then
`ray.put`s it into its node's object store and returns the ref inside a list (so that Ray hands
over the ref, not the value); the driver `ray.get`s it, which pulls the object into the driver
node's store, and checks the last byte. The hop runs from just before the `ray.put` (the copy
into the store is the producer's part of the hop: a dfuse stage writes into its slot in place)
to the driver holding the array. Nothing here starts or stops Ray: it connects to the cluster
given and leaves it as it was (the actor is killed at the end).
"""

from __future__ import annotations

import time

import numpy as np

from .process_pair import summarize

TIMEOUT_S = 120.0  # one ray.get; a 256 MiB hop takes about a second on a 2-core VM


class RayUnavailable(RuntimeError):
    """--ray-address names no cluster we can use (unreachable, or no second node)."""


class ArrayProducer:
    """The Ray actor (module-level, so workers import it by name): one array, rewritten per hop."""

    def __init__(self):
        self._array = np.zeros(0, dtype=np.uint8)

    def node(self) -> str:
        import ray

        return ray.get_runtime_context().get_node_id()

    def produce(self, nbytes: int, value: int):
        import ray

        if self._array.nbytes != nbytes:
            self._array = np.zeros(nbytes, dtype=np.uint8)
        self._array.fill(value)  # the write: not timed, as in the other mechanisms
        sent_ns = time.perf_counter_ns()
        return sent_ns, [ray.put(self._array)]  # in a list: the driver gets the ref, not the bytes


class RayLink:
    """A driver connected to the cluster at `address` and a producer actor on another node."""

    def __init__(self, address: str):
        try:
            import ray
            from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
        except ImportError:
            raise RayUnavailable("ray is not installed (pip install ray)") from None
        self._ray = ray
        self.version = ray.__version__
        try:
            ray.init(address=address, log_to_driver=False, logging_level="ERROR")
        except (ConnectionError, RuntimeError, ValueError) as e:
            raise RayUnavailable(f"cannot connect to a Ray cluster at {address}: {e}") from None
        try:
            here = ray.get_runtime_context().get_node_id()
            others = sorted(n["NodeID"] for n in ray.nodes() if n["Alive"] and n["NodeID"] != here)
            if not others:
                raise RayUnavailable(f"the Ray cluster at {address} has no node other than the driver's: "
                                     "a cross-node hop needs two")
            actor = ray.remote(num_cpus=0)(ArrayProducer)
            self._producer = actor.options(
                scheduling_strategy=NodeAffinitySchedulingStrategy(others[0], soft=False)).remote()
            there = ray.get(self._producer.node.remote(), timeout=TIMEOUT_S)
        except BaseException:
            ray.shutdown()
            raise
        self.placement = {"producer_node": there, "consumer_node": here,
                          "direction": "actor on producer_node ray.put()s and returns the ref; the driver on "
                                       "consumer_node ray.get()s it"}

    def measure(self, nbytes: int, iterations: int) -> dict:
        ray = self._ray
        samples, arrivals, wrong = [], [], 0
        for hop in range(iterations + 1):  # + an untimed first hop, as for the other mechanisms
            sent_ns, (ref,) = ray.get(self._producer.produce.remote(nbytes, hop % 251), timeout=TIMEOUT_S)
            arrived_ns = time.perf_counter_ns()
            array = ray.get(ref, timeout=TIMEOUT_S)
            wrong += int(array[-1]) != hop % 251
            done_ns = time.perf_counter_ns()
            del array, ref  # frees the object on both nodes before the next hop
            if hop:
                samples.append((done_ns - sent_ns) / 1000)
                arrivals.append((arrived_ns - sent_ns) / 1000)
        if wrong:
            raise RuntimeError(f"ray-object-ref read {wrong} wrong values at {nbytes} bytes")
        summary = summarize("ray-object-ref", nbytes, samples)
        summary["arrive_p50_us"] = round(float(np.median(arrivals)), 1)  # the ref in the driver's hands
        return summary

    def close(self) -> None:
        try:
            self._ray.kill(self._producer)
        finally:
            self._ray.shutdown()
