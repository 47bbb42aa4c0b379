"""The baselines and floors `dfuse bench handoff` sets beside the dfuse hop (described in
bench/handoff/command.py): socket-floor, spin-floor, memcpy and pickle over zmq."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import pickle  # the naive baseline being measured; dfuse itself never pickles on a socket
import socket
import time

import torch
import zmq

from ...engine.host_resources import HostResources
from ...engine.transport.shm import Segment
from ...engine.transport.slots import SlotPool
from ...engine.transport.shm_files import unlink_segment
from .process_pair import cpu_blocks, exit_with_parent, measurement, next_report, pool_numbers, run_pair, summarize, sync


# --- socket-floor: the wake-up alone, without zmq --------------------------------------------------
def _socket_consumer(iterations: int, path: str, results) -> None:
    exit_with_parent()
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    listener.bind(path)
    listener.listen(1)
    results.send_bytes(b"bound")
    connection, _ = listener.accept()
    samples = []
    for i in range(iterations + 1):  # the first hop is untimed, as for dfuse
        sent_ns = int.from_bytes(connection.recv(8), "little")
        if i:
            samples.append((time.perf_counter_ns() - sent_ns) / 1000)
        connection.send(b"a")
    results.send_bytes(json.dumps(samples).encode())
    connection.close()
    listener.close()


def _socket_producer(nbytes: int, iterations: int, path: str, device: str) -> None:
    exit_with_parent()
    torch.set_num_threads(1)
    tensor = torch.empty(nbytes, dtype=torch.uint8, device=device)
    connection = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    connection.connect(path)
    for i in range(iterations + 1):
        tensor.fill_(i % 251)  # the same write as the dfuse producer's: not timed
        sync(device)
        connection.send(time.perf_counter_ns().to_bytes(8, "little"))
        connection.recv(1)
    connection.close()


def measure_socket_floor(nbytes: int, iterations: int, device: str, host: HostResources | None = None) -> dict:
    with measurement(host) as (host, run_dir):
        path = os.path.join(run_dir, "doorbell")
        samples = json.loads(run_pair(
            _socket_consumer, (iterations, path), _socket_producer, (nbytes, iterations, path, device), host,
            cpu_blocks(device, device)))
    return summarize("socket-floor", nbytes, samples)


# --- spin-floor: no sleep and no socket -----------------------------------------------------------
# What a consumer that never sleeps gets: it spins on a sequence word in shared memory that the
# producer bumps after its write, then reads the last element as the dfuse consumer does. Not a
# transport (it burns a core per waiting process and relies on x86's store order): the floor for
# the hop once neither sleeping nor a socket is in it. Words: [sequence, sent_ns, ack].
def _spin_consumer(pool: str | None, bell: str, iterations: int, results) -> None:
    exit_with_parent()
    torch.set_num_threads(1)
    words = Segment(bell).data.view(torch.int64).numpy()
    data = Segment(pool).data if pool else None  # a GPU producer's tensor is not read here
    results.send_bytes(b"bound")
    samples, wrong = [], 0
    while words[0] != 1:  # the producer is still starting: leave it the core
        time.sleep(0.001)
    for hop in range(1, iterations + 2):  # the first hop is untimed, as for dfuse
        while words[0] != hop:
            pass
        if data is not None:
            wrong += int(data[-1].item()) != hop % 251
        if hop > 1:
            samples.append((time.perf_counter_ns() - int(words[1])) / 1000)
        words[2] = hop
    results.send_bytes(json.dumps({"samples_us": samples, "wrong_values": wrong}).encode())


def _spin_producer(pool: str | None, bell: str, nbytes: int, iterations: int, device: str) -> None:
    exit_with_parent()
    torch.set_num_threads(1)
    words = Segment(bell).data.view(torch.int64).numpy()
    tensor = Segment(pool).data if pool else torch.empty(nbytes, dtype=torch.uint8, device=device)
    for hop in range(1, iterations + 2):
        tensor.fill_(hop % 251)  # the same write as the dfuse producer's: not timed
        sync(device)
        words[1] = time.perf_counter_ns()
        words[0] = hop  # after sent_ns: x86 makes stores visible in program order
        while words[2] != hop:
            pass


def measure_spin_floor(nbytes: int, iterations: int, device: str, host: HostResources | None = None) -> dict:
    with measurement(host) as (host, _):
        number = next(pool_numbers)
        names = [f"{host.segment_prefix}spin{number}", f"{host.segment_prefix}bell{number}"]
        pool = None if device.startswith("cuda") else SlotPool.create_host(names[0], nbytes, 1)
        bell = SlotPool.create_host(names[1], 4096, 1)
        try:
            result = json.loads(run_pair(
                _spin_consumer, (pool and pool.name, bell.name, iterations),
                _spin_producer, (pool and pool.name, bell.name, nbytes, iterations, device), host, cpu_blocks(device, device)))
        finally:
            for name in names:
                unlink_segment(name)
    if result["wrong_values"]:
        raise RuntimeError(f"spin-floor read {result['wrong_values']} wrong values at {nbytes} bytes")
    return summarize("spin-floor", nbytes, result["samples_us"])


# --- the floor and the naive way -------------------------------------------------------------------
def measure_memcpy(nbytes: int, iterations: int, device: str) -> dict:
    torch.set_num_threads(1)
    src = torch.full((nbytes,), 7, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)  # faults the pages in: a pool's slots are pre-faulted too
    samples = []
    for _ in range(iterations):
        sync(device)
        start = time.perf_counter_ns()
        dst.copy_(src)
        sync(device)
        samples.append((time.perf_counter_ns() - start) / 1000)
    return summarize("memcpy", nbytes, samples)


def _pickle_receiver(iterations: int, run_dir: str, results) -> None:
    exit_with_parent()
    context = zmq.Context()
    socket, acks = context.socket(zmq.PULL), context.socket(zmq.PUSH)
    socket.bind(f"ipc://{run_dir}/pickle")
    acks.bind(f"ipc://{run_dir}/pickle-ack")
    results.send_bytes(b"bound")
    samples = []
    for _ in range(iterations):
        sent_ns, array = pickle.loads(socket.recv())
        samples.append((time.perf_counter_ns() - sent_ns) / 1000)
        del array
        acks.send(b"")
    results.send_bytes(json.dumps(samples).encode())
    socket.close()
    acks.close()
    context.term()


def measure_pickle_zmq(nbytes: int, iterations: int, device: str, host: HostResources | None = None) -> dict:
    with measurement(host) as (_, run_dir):
        return summarize("pickle-zmq", nbytes, _pickle_send(nbytes, iterations, device, run_dir))


def _pickle_send(nbytes: int, iterations: int, device: str, run_dir: str) -> list[float]:
    spawn = mp.get_context("spawn")
    receiver, sender = spawn.Pipe(duplex=False)
    process = spawn.Process(target=_pickle_receiver, args=(iterations, run_dir, sender), daemon=True)
    process.start()
    sender.close()
    context = zmq.Context()
    socket, acks = context.socket(zmq.PUSH), context.socket(zmq.PULL)
    try:
        next_report(receiver, [process])
        socket.connect(f"ipc://{run_dir}/pickle")
        acks.connect(f"ipc://{run_dir}/pickle-ack")
        tensor = torch.full((nbytes,), 7, dtype=torch.uint8, device=device)
        for _ in range(iterations):
            sent_ns = time.perf_counter_ns()
            socket.send(pickle.dumps((sent_ns, tensor.cpu().numpy()), protocol=pickle.HIGHEST_PROTOCOL))
            while not acks.poll(1000):  # one hop at a time, like the dfuse hop: no queueing in the numbers
                if not process.is_alive():
                    raise RuntimeError(f"the pickle receiver died with exit code {process.exitcode}")
            acks.recv()
        samples = json.loads(next_report(receiver, [process]))
        process.join(30)
        return samples
    finally:
        socket.close(linger=0)
        acks.close(linger=0)
        context.term()
        if process.is_alive():
            process.kill()
            process.join()
