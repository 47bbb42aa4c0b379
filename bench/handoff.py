"""`dfuse bench handoff`: the cost of one hop between two processes, by tensor size.

Mechanisms, each measured here in one run:
    dfuse       two spawned processes with the real transport: the producer writes the tensor in
                place into its slot, sends a StageDone carrying TensorRefs over zmq; the consumer
                decodes it and `Endpoint.fetch`es the inputs (a view on CPU / same GPU), checks a
                value, and acks so the slot can be reused. `arrive_p50_us`: the median time until the
                message is in the consumer's hands (then come decode, fetch, read).
    dfuse-os-idle the same, with the engine's CPU latency request given back (engine/cpu_wake.py):
                idle CPUs halt as the OS lets them, and the consumer, asleep through the write,
                wakes on a halted CPU. Listed only where the request could be made.
    dfuse-unpinned the same, with the OS placing both processes (on CPU, dfuse and the floors run each
                process on a core of its own, as an engine pins CPU workers that fit).
    dfuse-touch1 the same, but the producer rewrites one element: the consumer sleeps only briefly.
    dfuse-busy-poll the same, but the consumer spins on its socket instead of sleeping, as no
                worker does (it burns a core): what never sleeping would buy.
    memcpy      the floor: one copy of the same bytes inside one process (1 thread on CPU).
    pickle-zmq  the naive way: pickle.dumps of the array, zmq send, pickle.loads on the other side.
    zmq-floor   the dfuse processes, write and wait, but the message carries no tensor.
    socket-floor the same write, then one bare AF_UNIX datagram between two Python processes: no
                zmq, no tensor. The cheapest wake-up any design that sleeps while it waits can get.
    spin-floor  the same write, then a sequence word in shared memory that the consumer spins on
                (no sleep, no socket), and the same read of the last element (CPU): the floor for
                a design that burns a core per waiting process.
The hop time is one-way: CLOCK_MONOTONIC (perf_counter_ns) is shared by all processes of a host.

The bench holds what an engine holds (HostResources: a liveness lock, a janitor and, with the
engine's default transport config, the CPU latency request) and names its segments and run dirs
under it, and its processes exit with it: a bench killed mid-run, even with SIGKILL, leaves no
256 MiB segment in /dev/shm and no process behind.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import multiprocessing as mp
import multiprocessing.connection
import os
import pickle  # the naive baseline being measured; dfuse itself never pickles on a socket
import platform
import shutil
import socket
import statistics
import tempfile
import threading
import time
from pathlib import Path

import click
import msgspec
import torch
import zmq

from ..engine import protocol as wire
from ..engine.config import TransportConfig, check_device
from ..engine.cpu_affinity import pin_this_process, plan, usable_cpus
from ..engine.cpu_wake import current_limit_us
from ..engine.host_resources import HostResources
from ..engine.transport.endpoint import Endpoint
from ..engine.transport.janitor import clean_after_reaped
from ..engine.transport.shm import Segment, ShmFull, SlotPool, new_segment_prefix
from ..engine.transport.shm_files import unlink_segment
from .outputs import default_out

DEFAULT_SIZES = "64KiB,1MiB,16MiB,64MiB,256MiB"
_UNITS = {"KiB": 2**10, "MiB": 2**20, "GiB": 2**30, "B": 1}


def parse_size(text: str) -> int:
    text = text.strip()
    for unit, factor in _UNITS.items():
        if text.endswith(unit) and text[: -len(unit)].strip().isdecimal() and int(text[: -len(unit)]) > 0:
            return int(text[: -len(unit)]) * factor
    raise ValueError(f"--sizes: {text!r} is not a size like 64KiB, 16MiB or 1GiB (more than 0 bytes)")


def format_size(nbytes: int) -> str:
    """64 KiB, 1 MiB, 1.5 GiB: the largest binary unit the size reaches, without trailing zeros."""
    for unit, factor in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if nbytes >= factor:
            return f"{nbytes / factor:.2f}".rstrip("0").rstrip(".") + f" {unit}"
    return f"{nbytes} B"


def iterations_for(nbytes: int, budget_bytes: int = 4 * 2**30) -> int:
    """Enough samples for a p99 on small sizes, bounded time on large ones."""
    return int(min(200, max(10, budget_bytes // nbytes)))


# --- dfuse: two real processes --------------------------------------------------------------------
# The consumer hears what a worker hears from its producer's side: a pool announcement, then refs.
_hop_decoder = msgspec.msgpack.Decoder(wire.OpenPool | wire.StageDone)


def _producer(
    device: str, pool_name: str | None, nbytes: int, iterations: int, run_dir: str, full_write: bool, carry: bool
) -> None:
    _exit_with_parent()
    torch.set_num_threads(1)
    endpoint = Endpoint(torch.device(device))
    context = zmq.Context()
    hops, acks = context.socket(zmq.PUSH), context.socket(zmq.PULL)
    hops.connect(f"ipc://{run_dir}/hop")
    acks.connect(f"ipc://{run_dir}/ack")
    if pool_name is None:  # GPU: the producer owns its pool and exports it once
        info = endpoint.create_gpu_pool(f"{new_segment_prefix()}gpu", nbytes, 1)
        pool_name = info.name
        hops.send(wire.encode(wire.OpenPool(info)))
    slot = wire.OutputSlot(pool_name, 0, nbytes)
    for i in range(iterations + 1):  # + the consumer's untimed first hop
        writer = endpoint.writer(slot)
        tensor = writer.empty("x", (nbytes,), torch.uint8)  # produced in place: not timed
        # On a GPU the write goes through the copy stream: the slot's event must order it too.
        with torch.cuda.stream(endpoint.copy_stream) if endpoint.cuda else contextlib.nullcontext():
            if full_write:
                tensor.fill_(i % 251)
            else:
                tensor[-1] = i % 251
        endpoint.finish(slot)  # GPU: the slot's event is recorded, the writes are done
        sent_ns = time.perf_counter_ns()
        refs = writer.refs if carry else []
        hops.send(wire.encode(wire.StageDone(0, sent_ns, refs, wire.StageTimings(0.0, 0.0))))
        acks.recv()  # the consumer has read it: the slot may be written again
    hops.close()
    acks.close()
    context.term()


def _consumer(device: str, iterations: int, run_dir: str, busy_poll: bool, results) -> None:
    _exit_with_parent()
    torch.set_num_threads(1)
    endpoint = Endpoint(torch.device(device))
    context = zmq.Context()
    hops, acks = context.socket(zmq.PULL), context.socket(zmq.PUSH)
    hops.bind(f"ipc://{run_dir}/hop")
    acks.bind(f"ipc://{run_dir}/ack")
    results.send_bytes(b"bound")
    samples, arrivals, wrong, hops_seen = [], [], 0, 0
    while len(samples) < iterations:
        if busy_poll:  # never sleep: the wake-up leaves the hop, a whole core is spent on waiting
            while not hops.poll(0):
                pass
        frame = hops.recv()
        arrived_ns = time.perf_counter_ns()
        message = _hop_decoder.decode(frame)
        if isinstance(message, wire.OpenPool):
            endpoint.open_pool(message.pool)
            continue
        if message.outputs:
            tensor = endpoint.fetch(hops_seen, message.outputs)["x"]
            value = int(tensor[-1].item())  # a real read of the far end (waits for the GPU writes)
            wrong += value != hops_seen % 251
        elapsed_us = (time.perf_counter_ns() - message.request_id) / 1000
        hops_seen += 1
        if hops_seen > 1:  # the first hop maps the pool (once per process, as in a worker)
            samples.append(elapsed_us)
            arrivals.append((arrived_ns - message.request_id) / 1000)
        acks.send(b"")
    results.send_bytes(json.dumps({"samples_us": samples, "arrivals_us": arrivals, "wrong_values": wrong,
                                   "consumer_cpus": sorted(os.sched_getaffinity(0))}).encode())
    hops.close()
    acks.close()
    context.term()


def _exit_with_parent() -> None:
    """A bench process never outlives the bench: killed mid-hop (SIGKILL included), the bench
    leaves its children blocked on a socket no one will write to. Its sentinel ends them."""
    parent = mp.parent_process()
    if parent is None:
        return

    def watch() -> None:
        multiprocessing.connection.wait([parent.sentinel])
        os._exit(1)

    threading.Thread(target=watch, daemon=True, name="exit-with-bench").start()


@contextlib.contextmanager
def _measurement(host: HostResources | None):
    """(host resources, a fresh run dir under them) for one measurement: the given host's, or
    ones held for this measurement alone. The run dir goes when the measurement ends."""
    with contextlib.ExitStack() as stack:
        if host is None:
            host = HostResources()
            stack.callback(host.release)
        run_dir = tempfile.mkdtemp(dir=host.run_dir)
        stack.callback(shutil.rmtree, run_dir, ignore_errors=True)
        yield host, run_dir


_pool_numbers = itertools.count()


def cpu_blocks(consumer_device: str, producer_device: str, pinned: bool = True) -> list | None:
    """Cores for (consumer, producer) as an engine pins 1-thread CPU workers: each CPU process
    its own core when they fit (engine/cpu_affinity.py); a GPU process None, as an engine's GPU
    workers are not pinned. None when nothing is pinned (the OS places both)."""
    on_cpu = [device == "cpu" for device in (consumer_device, producer_device)]
    blocks = plan([1] * sum(on_cpu), usable_cpus()) if pinned and any(on_cpu) else None
    if blocks is None:
        return None
    blocks = iter(blocks)
    return [next(blocks) if cpu else None for cpu in on_cpu]


def _pinned(cpus: tuple[int, ...] | None, target, *args) -> None:
    """Spawn target: pin, then run `target` (whose threads inherit the pinning)."""
    if cpus:
        pin_this_process(cpus)
    target(*args)


def _run_pair(consumer, consumer_args: tuple, producer, producer_args: tuple, host: HostResources,
              cpus: list[tuple[int, ...]] | None = None) -> bytes:
    """Start the consumer, wait until it listens, then the producer; return the consumer's report.
    `cpus`: the cores of (consumer, producer), or None to leave them to the OS.
    Neither process outlives the measurement, and the janitor knows both (CUDA IPC leftovers)."""
    spawn = mp.get_context("spawn")
    receiver, sender = spawn.Pipe(duplex=False)
    started = time.time()
    consumer_cpus, producer_cpus = cpus or (None, None)
    processes = [spawn.Process(target=_pinned, args=(consumer_cpus, consumer, *consumer_args, sender), daemon=True)]
    try:
        processes[0].start()
        _watch(host, processes[0], started)
        sender.close()  # the consumer's copy is the only one: its death reads as EOF here
        _report(receiver, processes)  # listening
        processes.append(spawn.Process(target=_pinned, args=(producer_cpus, producer, *producer_args), daemon=True))
        processes[1].start()
        _watch(host, processes[1], started)
        report = _report(receiver, processes)
        for process in processes:
            process.join(30)
        return report
    finally:
        for process in processes:
            if process.pid is None:  # never started
                continue
            if process.is_alive():
                process.kill()
                process.join()
            clean_after_reaped(process.pid, started, host.janitor)


def _report(receiver, processes) -> bytes:
    """The consumer's next message. A bench process that dies before it is sent fails the bench
    (the other one would wait for it forever)."""
    waiting = list(processes)
    while True:
        ready = multiprocessing.connection.wait([receiver, *(p.sentinel for p in waiting)])
        if receiver in ready:
            try:
                return receiver.recv_bytes()
            except EOFError:  # the consumer, the only writer, is gone
                processes[0].join(10)
                raise RuntimeError(f"a handoff consumer exited (exit code {processes[0].exitcode}) "
                                   "before it reported") from None
        for process in [p for p in waiting if p.sentinel in ready]:
            process.join()  # its sentinel fired: it is exiting, and exitcode needs it reaped
            if process.exitcode:
                raise RuntimeError(f"a handoff process ({process.name}) died with exit code {process.exitcode}")
            waiting.remove(process)  # the producer is done: the consumer reports next


def _watch(host: HostResources, process, started: float) -> None:
    if host.janitor is not None:
        host.janitor.watch(process.pid, started)


def measure_dfuse(nbytes: int, iterations: int, device: str, full_write: bool = True, carry: bool = True,
                  consumer_device: str | None = None, host: HostResources | None = None, busy_poll: bool = False,
                  pinned: bool = True) -> dict:
    """`device` runs both processes, unless `consumer_device` names the consumer's (a CPU producer
    and a GPU consumer: the mixed link, read from pinned shared memory on the copy stream).
    `busy_poll`: the consumer spins on its socket instead of sleeping (not what a worker does).
    `pinned`: on CPU, each process on a core of its own as an engine pins its workers."""
    with _measurement(host) as (host, run_dir):
        name = f"{host.segment_prefix}hop{next(_pool_numbers)}"
        pool = None if device.startswith("cuda") else SlotPool.create_host(name, nbytes, 1)
        try:
            result = json.loads(_run_pair(
                _consumer, (consumer_device or device, iterations, run_dir, busy_poll),
                _producer, (device, pool and pool.name, nbytes, iterations, run_dir, full_write, carry), host,
                cpu_blocks(consumer_device or device, device, pinned),
            ))
        finally:
            unlink_segment(name)
    if result["wrong_values"]:
        raise RuntimeError(f"dfuse handoff read {result['wrong_values']} wrong values at {nbytes} bytes")
    mechanism = ("zmq-floor" if not carry else "dfuse-touch1" if not full_write
                 else "dfuse-busy-poll" if busy_poll else "dfuse" if pinned or device != "cpu" else "dfuse-unpinned")
    summary = _summary(mechanism, nbytes, result["samples_us"])
    summary["arrive_p50_us"] = round(statistics.median(result["arrivals_us"]), 1)  # the median arrival
    summary["consumer_cpus"] = result["consumer_cpus"]  # where it ran, as the kernel says
    return summary


def measure_dfuse_os_idle(nbytes: int, iterations: int, device: str, host: HostResources | None = None) -> dict:
    """`dfuse` without the CPU latency request: it is system-wide, so it is given back meanwhile.
    `cpu_latency_limit_us` is the limit the kernel kept (another holder, e.g. a tuned profile, may
    keep it low: then this row is not the OS's default)."""
    hold = host.cpu_wake if host is not None else None
    with hold.paused() if hold is not None else contextlib.nullcontext():
        limit = current_limit_us()
        summary = measure_dfuse(nbytes, iterations, device, host=host)
    return {**summary, "mechanism": "dfuse-os-idle", "cpu_latency_limit_us": limit}


# --- socket-floor: the wake-up alone, without zmq --------------------------------------------------
def _socket_consumer(iterations: int, path: str, results) -> None:
    _exit_with_parent()
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
    _exit_with_parent()
    torch.set_num_threads(1)
    tensor = torch.empty(nbytes, dtype=torch.uint8, device=device)
    connection = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    connection.connect(path)
    for i in range(iterations + 1):
        tensor.fill_(i % 251)  # the same write as the dfuse producer's: not timed
        _sync(device)
        connection.send(time.perf_counter_ns().to_bytes(8, "little"))
        connection.recv(1)
    connection.close()


def measure_socket_floor(nbytes: int, iterations: int, device: str, host: HostResources | None = None) -> dict:
    with _measurement(host) as (host, run_dir):
        path = os.path.join(run_dir, "doorbell")
        samples = json.loads(_run_pair(
            _socket_consumer, (iterations, path), _socket_producer, (nbytes, iterations, path, device), host,
            cpu_blocks(device, device)))
    return _summary("socket-floor", nbytes, samples)


# --- spin-floor: no sleep and no socket -----------------------------------------------------------
# What a consumer that never sleeps gets: it spins on a sequence word in shared memory that the
# producer bumps after its write, then reads the last element as the dfuse consumer does. Not a
# transport (it burns a core per waiting process and relies on x86's store order): the floor for
# the hop once neither sleeping nor a socket is in it. Words: [sequence, sent_ns, ack].
def _spin_consumer(pool: str | None, bell: str, iterations: int, results) -> None:
    _exit_with_parent()
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
    _exit_with_parent()
    torch.set_num_threads(1)
    words = Segment(bell).data.view(torch.int64).numpy()
    tensor = Segment(pool).data if pool else torch.empty(nbytes, dtype=torch.uint8, device=device)
    for hop in range(1, iterations + 2):
        tensor.fill_(hop % 251)  # the same write as the dfuse producer's: not timed
        _sync(device)
        words[1] = time.perf_counter_ns()
        words[0] = hop  # after sent_ns: x86 makes stores visible in program order
        while words[2] != hop:
            pass


def measure_spin_floor(nbytes: int, iterations: int, device: str, host: HostResources | None = None) -> dict:
    with _measurement(host) as (host, _):
        number = next(_pool_numbers)
        names = [f"{host.segment_prefix}spin{number}", f"{host.segment_prefix}bell{number}"]
        pool = None if device.startswith("cuda") else SlotPool.create_host(names[0], nbytes, 1)
        bell = SlotPool.create_host(names[1], 4096, 1)
        try:
            result = json.loads(_run_pair(
                _spin_consumer, (pool and pool.name, bell.name, iterations),
                _spin_producer, (pool and pool.name, bell.name, nbytes, iterations, device), host, cpu_blocks(device, device)))
        finally:
            for name in names:
                unlink_segment(name)
    if result["wrong_values"]:
        raise RuntimeError(f"spin-floor read {result['wrong_values']} wrong values at {nbytes} bytes")
    return _summary("spin-floor", nbytes, result["samples_us"])


# --- the floor and the naive way -------------------------------------------------------------------
def measure_memcpy(nbytes: int, iterations: int, device: str) -> dict:
    torch.set_num_threads(1)
    src = torch.full((nbytes,), 7, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)  # faults the pages in: a pool's slots are pre-faulted too
    samples = []
    for _ in range(iterations):
        _sync(device)
        start = time.perf_counter_ns()
        dst.copy_(src)
        _sync(device)
        samples.append((time.perf_counter_ns() - start) / 1000)
    return _summary("memcpy", nbytes, samples)


def _pickle_receiver(iterations: int, run_dir: str, results) -> None:
    _exit_with_parent()
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
    with _measurement(host) as (_, run_dir):
        return _summary("pickle-zmq", nbytes, _pickle_send(nbytes, iterations, device, run_dir))


def _pickle_send(nbytes: int, iterations: int, device: str, run_dir: str) -> list[float]:
    spawn = mp.get_context("spawn")
    receiver, sender = spawn.Pipe(duplex=False)
    process = spawn.Process(target=_pickle_receiver, args=(iterations, run_dir, sender), daemon=True)
    process.start()
    sender.close()
    context = zmq.Context()
    socket, acks = context.socket(zmq.PUSH), context.socket(zmq.PULL)
    try:
        _report(receiver, [process])
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
        samples = json.loads(_report(receiver, [process]))
        process.join(30)
        return samples
    finally:
        socket.close(linger=0)
        acks.close(linger=0)
        context.term()
        if process.is_alive():
            process.kill()
            process.join()


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


def _summary(mechanism: str, nbytes: int, samples_us: list[float]) -> dict:
    ordered = sorted(samples_us)
    p99 = ordered[min(len(ordered) - 1, int(round(0.99 * (len(ordered) - 1))))]
    return {"mechanism": mechanism, "bytes": nbytes, "p50_us": round(statistics.median(ordered), 1),
            "p99_us": round(p99, 1), "samples": len(ordered)}


# Each takes (nbytes, iterations, device, host).
MECHANISMS = {
    "dfuse": lambda nbytes, iterations, device, host: measure_dfuse(nbytes, iterations, device, host=host),
    "dfuse-os-idle": measure_dfuse_os_idle,
    "dfuse-unpinned": lambda nbytes, iterations, device, host: measure_dfuse(
        nbytes, iterations, device, host=host, pinned=False),
    "dfuse-touch1": lambda nbytes, iterations, device, host: measure_dfuse(
        nbytes, iterations, device, full_write=False, host=host),
    "dfuse-busy-poll": lambda nbytes, iterations, device, host: measure_dfuse(
        nbytes, iterations, device, host=host, busy_poll=True),
    "zmq-floor": lambda nbytes, iterations, device, host: measure_dfuse(nbytes, iterations, device, carry=False, host=host),
    "socket-floor": measure_socket_floor,
    "memcpy": lambda nbytes, iterations, device, host: measure_memcpy(nbytes, iterations, device),
    "pickle-zmq": measure_pickle_zmq,
}
if platform.machine() in ("x86_64", "AMD64"):  # spin-floor relies on x86's store order
    MECHANISMS["spin-floor"] = measure_spin_floor


def run_handoff(sizes: list[int], device: str, mechanisms=tuple(MECHANISMS)) -> dict:
    from tqdm import tqdm

    results = []
    # As an engine with the default transport config runs: with its CPU latency request, if allowed.
    host = HostResources(TransportConfig().cpu_wake_latency_us)
    wake_us = host.cpu_wake.max_us if host.cpu_wake is not None else None
    if wake_us is None:  # nothing to give back: the row would measure `dfuse` twice
        mechanisms = [m for m in mechanisms if m != "dfuse-os-idle"]
    pinned = cpu_blocks(device, device)
    if pinned is None:  # GPU, or one core: `dfuse` is not pinned either
        mechanisms = [m for m in mechanisms if m != "dfuse-unpinned"]
    steps = [(m, n) for n in sizes for m in mechanisms]
    try:
        for mechanism, nbytes in tqdm(steps, desc="handoff", unit="case", leave=False):
            results.append(MECHANISMS[mechanism](nbytes, iterations_for(nbytes), device, host))
        if host.cpu_wake is not None and not host.cpu_wake.held:  # lost when dfuse-os-idle gave it back
            wake_us = None
    finally:
        host.release()
    return {
        "benchmark": "handoff",
        "device": device if device == "cpu" else torch.cuda.get_device_name(device),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__},
        "cpu_wake_latency_us": wake_us,  # the engine's CPU latency request during the run; None: not (all of) it
        "pinned_cpus": pinned,  # (consumer's, producer's) cores, as an engine pins CPU workers; None: the OS's
        "note": "one-way hop p50/p99 in microseconds, from the producer's send to the consumer's read of the "
                "last element (each mechanism is described in bench/handoff.py). dfuse: the producer rewrites "
                "the whole tensor in place before every hop (as a stage would), the consumer maps a view (same "
                "GPU: a CUDA IPC view ordered by an interprocess event); arrive_p50_us: the median time until "
                "the message is in the consumer's hands; idle CPUs are kept polling by the engine's CPU latency "
                "request (cpu_wake_latency_us) unless it is null, and on CPU both processes run on cores of their "
                "own (pinned_cpus) as an engine pins CPU workers that fit. dfuse-os-idle: the same without "
                "that request. dfuse-unpinned: the same with the OS placing both processes. "
                "dfuse-touch1: one element rewritten. dfuse-busy-poll: the "
                "consumer spins on its socket instead of sleeping. zmq-floor: no tensor in the message, nothing "
                "read. socket-floor: the same write, then one bare AF_UNIX datagram (no zmq, no tensor): the "
                "cheapest wake-up for a consumer that sleeps while it waits. spin-floor: the same write, then a "
                "sequence word in shared memory the consumer spins on and (CPU) the same read: the floor for a "
                "consumer that never sleeps. A sleeping consumer wakes more slowly the longer it slept, most of "
                "all on a halted CPU (dfuse-os-idle), and after a large write its first steps run on cold caches: "
                "large sizes pay both whatever the transport does.",
        "results": results,
    }


@click.command("handoff")
@click.option("--sizes", default=DEFAULT_SIZES, show_default=True, help="Comma-separated sizes (KiB, MiB, GiB).")
@click.option("--device", default="cpu", show_default=True, help="cpu, or cuda:N for the same-GPU CUDA IPC link.")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=default_out("handoff.json"),
              show_default=True, help="Where the JSON result is written.")
def handoff_command(sizes, device, out):
    """One hop between two real processes: dfuse vs memcpy vs pickle over zmq, beside wake-up floors."""
    try:
        parsed = [parse_size(s) for s in sizes.split(",") if s.strip()]
    except ValueError as e:
        raise click.UsageError(str(e)) from None
    try:
        device = check_device("--device", device)
    except ValueError as e:
        raise click.UsageError(str(e)) from None
    try:
        report = run_handoff(parsed, device)
    except ShmFull as e:  # a size this machine's /dev/shm cannot hold
        raise click.UsageError(f"--sizes: {', '.join(map(format_size, parsed))}: the largest does not fit in "
                               f"/dev/shm on this machine; choose smaller sizes ({e.errno and os.strerror(e.errno)})") from None
    click.echo(f"{'size':>10} {'mechanism':>15} {'p50 us':>10} {'p99 us':>10} {'arrive p50':>10}")
    for r in report["results"]:
        arrive = f"{r['arrive_p50_us']:>10.1f}" if "arrive_p50_us" in r else f"{'-':>10}"
        click.echo(f"{format_size(r['bytes']):>10} {r['mechanism']:>15} {r['p50_us']:>10.1f} {r['p99_us']:>10.1f} {arrive}")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    click.echo(f"Wrote {out}")
