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
import json
import os
import platform
import statistics
import time
from pathlib import Path

import click
import msgspec
import torch
import zmq

from ...engine import protocol as wire
from ...engine.config import TransportConfig
from ...engine.devices import canonical_device
from ...engine.cpu_wake import current_limit_us
from ...engine.host_resources import HostResources
from ...engine.transport.endpoint import Endpoint
from ...engine.transport.shm import ShmFull
from ...engine.transport.shm_files import new_segment_prefix
from ...engine.transport.slots import SlotPool
from ...engine.transport.shm_files import unlink_segment
from .baselines import measure_memcpy, measure_pickle_zmq, measure_socket_floor, measure_spin_floor
from .ray_link import RayUnavailable
from .tcp_link import run_tcp_handoff
from ..lib.outputs import default_out, write_json
from .process_pair import cpu_blocks, exit_with_parent, measurement, pool_numbers, run_pair, summarize

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
    exit_with_parent()
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
    exit_with_parent()
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


def measure_dfuse(nbytes: int, iterations: int, device: str, full_write: bool = True, carry: bool = True,
                  consumer_device: str | None = None, host: HostResources | None = None, busy_poll: bool = False,
                  pinned: bool = True) -> dict:
    """`device` runs both processes, unless `consumer_device` names the consumer's (a CPU producer
    and a GPU consumer: the mixed link, read from pinned shared memory on the copy stream).
    `busy_poll`: the consumer spins on its socket instead of sleeping (not what a worker does).
    `pinned`: on CPU, each process on a core of its own as an engine pins its workers."""
    with measurement(host) as (host, run_dir):
        name = f"{host.segment_prefix}hop{next(pool_numbers)}"
        pool = None if device.startswith("cuda") else SlotPool.create_host(name, nbytes, 1)
        try:
            result = json.loads(run_pair(
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
    summary = summarize(mechanism, nbytes, result["samples_us"])
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
        for mechanism, nbytes in tqdm(steps, desc="handoff", unit="case", leave=False, disable=None):
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
                "last element (each mechanism is described in bench/handoff/command.py). dfuse: the producer rewrites "
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
@click.option("--link", type=click.Choice(["shm", "tcp"]), default="shm", show_default=True,
              help="shm: two processes on one node (shared memory, CUDA IPC); tcp: one cross-node hop on "
                   "loopback (SlotServer/SlotClient vs the bare link vs pickle over TCP vs Ray object refs).")
@click.option("--ray-address", default=None, metavar="ADDR",
              help="With --link tcp: a running Ray cluster (two nodes or more) for the ray-object-ref column; "
                   "without it that column is skipped.")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=default_out("handoff.json"),
              show_default=True, help="Where the JSON result is written.")
def handoff_command(sizes, device, link, ray_address, out):
    """One hop between two real processes: dfuse vs memcpy vs pickle over zmq, beside wake-up floors
    (--link tcp: one hop between nodes, dfuse vs the bare link vs pickle vs Ray object refs)."""
    try:
        parsed = [parse_size(s) for s in sizes.split(",") if s.strip()]
    except ValueError as e:
        raise click.UsageError(str(e)) from None
    try:
        device = canonical_device("--device", device)
    except ValueError as e:
        raise click.UsageError(str(e)) from None
    if link == "tcp" and device != "cpu":
        raise click.UsageError("--link tcp serves host pools: it runs with --device cpu only")
    if link == "shm" and ray_address is not None:
        raise click.UsageError("--ray-address goes with --link tcp")
    try:
        report = run_tcp_handoff(parsed, ray_address) if link == "tcp" else run_handoff(parsed, device)
    except RayUnavailable as e:
        raise click.UsageError(f"--ray-address: {e}") from None
    except ShmFull as e:  # a size this machine's /dev/shm cannot hold
        raise click.UsageError(f"--sizes: {', '.join(map(format_size, parsed))}: the largest does not fit in "
                               f"/dev/shm on this machine; choose smaller sizes ({e.errno and os.strerror(e.errno)})") from None
    click.echo(f"{'size':>10} {'mechanism':>22} {'p50 us':>10} {'p99 us':>10} {'arrive p50':>10}")
    for r in report["results"]:
        arrive = f"{r['arrive_p50_us']:>10.1f}" if "arrive_p50_us" in r else f"{'-':>10}"
        click.echo(f"{format_size(r['bytes']):>10} {r['mechanism']:>22} {r['p50_us']:>10.1f} {r['p99_us']:>10.1f} {arrive}")
    if link == "tcp":
        _echo_tcp_summary(report)
    write_json(out, report)
    click.echo(f"Wrote {out}")


def _echo_tcp_summary(report: dict) -> None:
    for row in report["ratios"]:
        ratios = ", ".join(f"{name.removesuffix('_over_dfuse-tcp')} {value:.1f}x" for name, value in row.items()
                           if name != "bytes" and value is not None)
        click.echo(f"{format_size(row['bytes']):>10} p50 / dfuse-tcp p50: {ratios}")
    for row in report["skipped"]:
        click.echo(f"skipped {row['mechanism']}: {row['reason']}")
    target = report["target"]
    verdict = {True: "met", False: "NOT met", None: "not measured"}[target["met"]]
    click.echo(f"target ({target['goal']}): {verdict}")
