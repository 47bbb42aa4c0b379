"""`dfuse bench handoff --link tcp`: one hop between two nodes (on loopback), by tensor size.

Mechanisms, side by side in one run:
    dfuse-tcp   two spawned processes, as a producer and a consumer worker on two nodes. The
                producer writes the tensor in place into its host pool slot (a /dev/shm segment,
                made as SlotPool.create_host makes it) and serves the pool with a SlotServer
                (engine/transport/tcp.py) bound to 127.0.0.1. Per hop it sends a signed StageDone
                carrying the TensorRef over zmq TCP (what the engine forwards in a StageTask); the
                consumer opens it, `SlotClient.read`s the range, checks the last byte and acks, so
                the slot can be written again. The consumer never maps the producer's segment.
                `arrive_p50_us`: the median time until the message is in the consumer's hands.
    dfuse-tcp-hmac-payload  the same, plus HMAC-SHA256 over the tensor bytes on both sides: the
                producer tags the slot after its write (inside the timed hop) and sends the tag
                beside the message, the consumer checks it on the bytes it received. What
                "HMAC on every byte" would cost; tcp.py signs the header frames only.
    tcp-floor   what the link itself costs: the producer `sendall`s the bytes on a plain TCP
                connection, the consumer `recv_into`s (MSG_WAITALL) one buffer it keeps; no
                message, request, or signature. No mechanism moving bytes over this link can beat it.
    pickle-tcp  the naive way: pickle.dumps of the array, zmq TCP send, pickle.loads, between two
                processes (the receiver checks the last byte and acks).
    ray-object-ref  with --ray-address only (ray_link.py): an actor pinned on another node than
                the bench's driver `ray.put`s the array and returns the ref; the driver `ray.get`s it.
The hop is one-way, from the producer's send to the consumer holding (and checking) the bytes:
every process here runs on one host, whose CLOCK_MONOTONIC (perf_counter_ns) they share. The
first hop of each measurement (connections, the consumer's first read) is not counted.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import math
import os
import pickle  # the naive baseline being measured; dfuse never pickles on a socket
import platform
import socket
import time
from pathlib import Path

import msgspec
import numpy as np
import torch
import zmq

from ...engine import protocol as wire
from ...engine.config import TransportConfig
from ...engine.host_resources import HostResources
from ...engine.transport.shm import Segment
from ...engine.transport.shm_files import unlink_segment
from ...engine.transport.slots import SlotPool
from ...engine.transport.tcp import FrameSigner, ReceiveBuffers, SlotClient, SlotServer, new_secret, recv_exactly
from .process_pair import cpu_blocks, exit_with_parent, measurement, pool_numbers, run_pair, summarize

MECHANISMS = ("dfuse-tcp", "dfuse-tcp-hmac-payload", "tcp-floor", "pickle-tcp", "ray-object-ref")
TARGET_RATIO = 5.0  # the goal: dfuse-tcp at least 5x faster than Ray object refs ...
TARGET_FROM_BYTES = 16 * 2**20  # ... at 16 MiB and above
NO_RAY = "needs --ray-address ADDR: a running Ray cluster with a node other than the bench's own"
_PORTS = "ports.json"
_done_decoder = msgspec.msgpack.Decoder(wire.StageDone)


def iterations_for(nbytes: int, budget_bytes: int = 2**30) -> int:
    """Fewer samples than the shm bench: every hop here moves the bytes (and Ray and pickle move
    them slowly), and the whole run should stay within a few minutes on a small machine."""
    return int(min(100, max(10, budget_bytes // nbytes)))


# --- sockets: the consumer binds, the producer connects --------------------------------------------
def _bind(context: zmq.Context, run_dir: str) -> tuple[zmq.Socket, zmq.Socket]:
    """The consumer's hop (PULL) and ack (PUSH) sockets on random loopback TCP ports, written
    to the run dir before the consumer reports it listens (run_pair starts the producer after)."""
    hops, acks = context.socket(zmq.PULL), context.socket(zmq.PUSH)
    ports = {"hops": hops.bind_to_random_port("tcp://127.0.0.1"), "acks": acks.bind_to_random_port("tcp://127.0.0.1")}
    Path(run_dir, _PORTS).write_text(json.dumps(ports))
    return hops, acks


def _connect(context: zmq.Context, run_dir: str) -> tuple[zmq.Socket, zmq.Socket]:
    ports = json.loads(Path(run_dir, _PORTS).read_text())
    hops, acks = context.socket(zmq.PUSH), context.socket(zmq.PULL)
    hops.connect(f"tcp://127.0.0.1:{ports['hops']}")
    acks.connect(f"tcp://127.0.0.1:{ports['acks']}")
    return hops, acks


def _close(context: zmq.Context, *sockets: zmq.Socket) -> None:
    for socket in sockets:
        socket.close(linger=0)
    context.term()


def _payload_tag(secret: bytes, data: torch.Tensor) -> bytes:
    return hmac.new(secret, data.numpy(), hashlib.sha256).digest()  # hashlib reads the buffer in place


# --- dfuse-tcp: a SlotServer on the producer's node, a SlotClient on the consumer's -----------------
def _tcp_consumer(iterations: int, run_dir: str, secret: bytes, hmac_payload: bool, results) -> None:
    exit_with_parent()
    torch.set_num_threads(1)
    signer = FrameSigner(secret)
    context = zmq.Context()
    hops, acks = _bind(context, run_dir)
    client, buffers = SlotClient(signer), ReceiveBuffers()
    results.send_bytes(b"bound")
    address = signer.open(hops.recv())  # the producer's SlotServer, announced once (untimed)
    if address is None:
        raise RuntimeError("the slot server's address came with a bad signature")
    address = address.decode()
    samples, arrivals, wrong = [], [], 0
    for hop in range(iterations + 1):  # + an untimed first hop: connects to the slot server
        frames = hops.recv_multipart()
        arrived_ns = time.perf_counter_ns()
        frame = signer.open(frames[0])
        if frame is None:
            raise RuntimeError("a hop message came with a bad signature")
        message = _done_decoder.decode(frame)
        (ref,) = message.outputs
        nbytes = math.prod(ref.shape)  # uint8: bytes = elements
        buffer = buffers.take(nbytes)
        data = client.read(address, ref.pool, ref.offset, nbytes, into=buffer)
        good = int(data[-1]) == hop % 251
        if hmac_payload:
            good &= hmac.compare_digest(frames[1], _payload_tag(secret, data))
        elapsed_us = (time.perf_counter_ns() - message.request_id) / 1000
        wrong += not good
        if hop:
            samples.append(elapsed_us)
            arrivals.append((arrived_ns - message.request_id) / 1000)
        del data
        buffers.give(buffer)  # the task is over: as a worker's Endpoint.release
        acks.send(b"")
    results.send_bytes(json.dumps({"samples_us": samples, "arrivals_us": arrivals, "wrong_values": wrong}).encode())
    client.close()
    _close(context, hops, acks)


def _tcp_producer(pool_name: str, nbytes: int, iterations: int, run_dir: str, secret: bytes,
                  hmac_payload: bool) -> None:
    exit_with_parent()
    torch.set_num_threads(1)
    signer = FrameSigner(secret)
    pool = Segment(pool_name).data  # the host pool, mapped as a worker maps its output pool
    slot = pool[:nbytes]
    context = zmq.Context()
    server = SlotServer("127.0.0.1", signer, {pool_name: pool}.get)
    hops, acks = _connect(context, run_dir)
    hops.send(signer.sign(server.address.encode()))
    ref = wire.TensorRef("x", pool_name, 0, (nbytes,), "uint8")
    for hop in range(iterations + 1):
        slot.fill_(hop % 251)  # produced in place: not timed
        sent_ns = time.perf_counter_ns()
        frames = [signer.sign(wire.encode(wire.StageDone(0, sent_ns, [ref], wire.StageTimings(0.0, 0.0))))]
        if hmac_payload:  # inside the hop: the consumer may not read before the tag exists
            frames.append(_payload_tag(secret, slot))
        hops.send_multipart(frames)
        acks.recv()  # the consumer holds its copy: the slot may be written again
    server.close()
    _close(context, hops, acks)


def measure_dfuse_tcp(nbytes: int, iterations: int, host: HostResources, hmac_payload: bool = False) -> dict:
    """Both processes pinned, each on a core of its own, as in the shm bench's `dfuse`."""
    secret = new_secret()
    with measurement(host) as (host, run_dir):
        name = f"{host.segment_prefix}tcp{next(pool_numbers)}"
        SlotPool.create_host(name, nbytes, 1)
        try:
            result = json.loads(run_pair(
                _tcp_consumer, (iterations, run_dir, secret, hmac_payload),
                _tcp_producer, (name, nbytes, iterations, run_dir, secret, hmac_payload), host,
                cpu_blocks("cpu", "cpu")))
        finally:
            unlink_segment(name)
    mechanism = "dfuse-tcp-hmac-payload" if hmac_payload else "dfuse-tcp"
    if result["wrong_values"]:
        raise RuntimeError(f"{mechanism} read {result['wrong_values']} wrong values at {nbytes} bytes")
    summary = summarize(mechanism, nbytes, result["samples_us"])
    summary["arrive_p50_us"] = round(float(np.median(result["arrivals_us"])), 1)
    return summary


# --- tcp-floor: the bytes on a plain connection, nothing else ------------------------------------
def _floor_consumer(nbytes: int, iterations: int, run_dir: str, results) -> None:
    exit_with_parent()
    listener = socket.create_server(("127.0.0.1", 0))
    Path(run_dir, _PORTS).write_text(json.dumps({"floor": listener.getsockname()[1]}))
    results.send_bytes(b"bound")
    connection, _ = listener.accept()
    stamp, buffer = bytearray(8), torch.empty(nbytes, dtype=torch.uint8)
    samples, wrong = [], 0
    for hop in range(iterations + 1):  # + an untimed first hop, as for dfuse-tcp
        for view in (memoryview(stamp), memoryview(buffer.numpy())):
            recv_exactly(connection, view)  # as SlotClient reads
        wrong += int(buffer[-1]) != hop % 251
        if hop:
            samples.append((time.perf_counter_ns() - int.from_bytes(stamp, "big")) / 1000)
        connection.sendall(b"a")
    results.send_bytes(json.dumps({"samples_us": samples, "wrong_values": wrong}).encode())
    connection.close()
    listener.close()


def _floor_producer(nbytes: int, iterations: int, run_dir: str) -> None:
    exit_with_parent()
    port = json.loads(Path(run_dir, _PORTS).read_text())["floor"]
    connection = socket.create_connection(("127.0.0.1", port))
    connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    array = torch.empty(nbytes, dtype=torch.uint8)
    for hop in range(iterations + 1):
        array.fill_(hop % 251)  # the same write as dfuse-tcp's: not timed
        connection.sendall(time.perf_counter_ns().to_bytes(8, "big"))
        connection.sendall(memoryview(array.numpy()))
        connection.recv(1)
    connection.close()


def measure_tcp_floor(nbytes: int, iterations: int, host: HostResources) -> dict:
    with measurement(host) as (host, run_dir):
        result = json.loads(run_pair(_floor_consumer, (nbytes, iterations, run_dir), _floor_producer,
                                     (nbytes, iterations, run_dir), host, cpu_blocks("cpu", "cpu")))
    if result["wrong_values"]:
        raise RuntimeError(f"tcp-floor read {result['wrong_values']} wrong values at {nbytes} bytes")
    return summarize("tcp-floor", nbytes, result["samples_us"])


# --- pickle-tcp: the naive way --------------------------------------------------------------------
def _pickle_consumer(iterations: int, run_dir: str, results) -> None:
    exit_with_parent()
    context = zmq.Context()
    hops, acks = _bind(context, run_dir)
    results.send_bytes(b"bound")
    samples, wrong = [], 0
    for hop in range(iterations + 1):  # + an untimed first hop, as for dfuse-tcp
        sent_ns, array = pickle.loads(hops.recv())
        wrong += int(array[-1]) != hop % 251
        if hop:
            samples.append((time.perf_counter_ns() - sent_ns) / 1000)
        del array
        acks.send(b"")
    results.send_bytes(json.dumps({"samples_us": samples, "wrong_values": wrong}).encode())
    _close(context, hops, acks)


def _pickle_producer(nbytes: int, iterations: int, run_dir: str) -> None:
    exit_with_parent()
    array = np.zeros(nbytes, dtype=np.uint8)
    context = zmq.Context()
    hops, acks = _connect(context, run_dir)
    for hop in range(iterations + 1):
        array.fill(hop % 251)  # the same write as dfuse-tcp's: not timed
        sent_ns = time.perf_counter_ns()
        hops.send(pickle.dumps((sent_ns, array), protocol=pickle.HIGHEST_PROTOCOL))
        acks.recv()
    _close(context, hops, acks)


def measure_pickle_tcp(nbytes: int, iterations: int, host: HostResources) -> dict:
    with measurement(host) as (host, run_dir):
        result = json.loads(run_pair(_pickle_consumer, (iterations, run_dir), _pickle_producer,
                                     (nbytes, iterations, run_dir), host, cpu_blocks("cpu", "cpu")))
    if result["wrong_values"]:
        raise RuntimeError(f"pickle-tcp read {result['wrong_values']} wrong values at {nbytes} bytes")
    return summarize("pickle-tcp", nbytes, result["samples_us"])


# --- the run ---------------------------------------------------------------------------------------
def _ratios(results: list[dict], sizes: list[int]) -> list[dict]:
    """Per size, p50 of each other mechanism / p50 of dfuse-tcp (above 1: dfuse-tcp is faster)."""
    p50 = {(r["mechanism"], r["bytes"]): r["p50_us"] for r in results}
    rows = []
    for nbytes in sizes:
        base = p50.get(("dfuse-tcp", nbytes))
        row = {"bytes": nbytes}
        for mechanism in MECHANISMS[1:]:
            other = p50.get((mechanism, nbytes))
            row[f"{mechanism}_over_dfuse-tcp"] = round(other / base, 2) if base and other else None
        rows.append(row)
    return rows


def _target(results: list[dict], ratios: list[dict]) -> dict:
    measured = [r["ray-object-ref_over_dfuse-tcp"] for r in ratios if r["bytes"] >= TARGET_FROM_BYTES]
    met = None if not measured or None in measured else min(measured) >= TARGET_RATIO
    p50 = {(r["mechanism"], r["bytes"]): r["p50_us"] for r in results}
    # The most any mechanism could gain on Ray here: Ray's p50 over the link's own (tcp-floor).
    reachable = {n: round(p50[("ray-object-ref", n)] / p50[("tcp-floor", n)], 2)
                 for (m, n) in p50 if m == "ray-object-ref" and n >= TARGET_FROM_BYTES and ("tcp-floor", n) in p50}
    return {"goal": f"dfuse-tcp p50 at least {TARGET_RATIO:g}x lower than ray-object-ref at 16 MiB and above",
            "met": met,  # None: not measured (no Ray, or no size from 16 MiB up)
            "ray_over_tcp_floor": reachable}


def run_tcp_handoff(sizes: list[int], ray_address: str | None = None) -> dict:
    from tqdm import tqdm

    from .ray_link import RayLink

    # As an engine with the default transport config runs: with its CPU latency request, if allowed.
    host = HostResources(TransportConfig().cpu_wake_latency_us)
    results, skipped, ray = [], [], None
    try:
        if ray_address is None:
            skipped.append({"mechanism": "ray-object-ref", "reason": NO_RAY})
        else:
            ray = RayLink(ray_address)
        mechanisms = [m for m in MECHANISMS if m != "ray-object-ref" or ray is not None]
        steps = [(m, n) for n in sizes for m in mechanisms]  # mechanisms interleaved, size by size
        for mechanism, nbytes in tqdm(steps, desc="handoff tcp", unit="case", leave=False, disable=None):
            iterations = iterations_for(nbytes)
            if mechanism == "ray-object-ref":
                results.append(ray.measure(nbytes, iterations))
            elif mechanism == "pickle-tcp":
                results.append(measure_pickle_tcp(nbytes, iterations, host))
            elif mechanism == "tcp-floor":
                results.append(measure_tcp_floor(nbytes, iterations, host))
            else:
                results.append(measure_dfuse_tcp(nbytes, iterations, host, mechanism == "dfuse-tcp-hmac-payload"))
        wake_us = host.cpu_wake.max_us if host.cpu_wake is not None and host.cpu_wake.held else None
    finally:
        if ray is not None:
            ray.close()
        host.release()
    ratios = _ratios(results, sizes)
    return {
        "benchmark": "handoff",
        "link": "tcp",
        "device": "cpu",
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__,
                    "zmq": zmq.zmq_version(), "ray": ray.version if ray is not None else None},
        "cpu_wake_latency_us": wake_us,  # the engine's CPU latency request during the run; None: not held
        "pinned_cpus": cpu_blocks("cpu", "cpu"),  # (consumer's, producer's) cores for dfuse-tcp and pickle-tcp
        "ray": ray.placement if ray is not None else None,  # which node produced, which consumed
        "note": "one-way hop p50/p99 in microseconds from the producer's send to the consumer holding the "
                "bytes (each mechanism is described in bench/handoff/tcp_link.py), all on loopback TCP. "
                "dfuse-tcp: signed StageDone with the TensorRef over zmq TCP, then SlotClient.read from the "
                "producer's SlotServer into a kept buffer (headers HMAC-signed, payload not hashed); arrive_p50_us: the median "
                "time until the message is in the consumer's hands. dfuse-tcp-hmac-payload: the same plus "
                "HMAC-SHA256 over the payload on both sides. tcp-floor: the bytes alone on a plain TCP "
                "connection into a kept buffer, the link's floor. pickle-tcp: pickle.dumps, zmq TCP, pickle.loads. "
                "ray-object-ref: ray.put in an actor on another node, ray.get in the driver. The producer "
                "rewrites the whole tensor before every hop (not timed); ratios: p50 of the other mechanism "
                "over p50 of dfuse-tcp at the same size.",
        "results": results,
        "skipped": skipped,
        "ratios": ratios,
        "target": _target(results, ratios),
    }
