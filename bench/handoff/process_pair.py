"""Two spawned processes measured as a pair, for `dfuse bench handoff`: start the consumer, then
the producer, collect the consumer's report; pin them as an engine pins CPU workers; make neither
outlive the bench, even one killed with SIGKILL; and summarise samples into p50 / p99.

Each measurement holds what an engine holds (HostResources: a liveness lock, a janitor) and
names its segments and run dirs under it, so a bench killed mid-run leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import itertools
import multiprocessing as mp
import multiprocessing.connection
import os
import shutil
import statistics
import tempfile
import threading
import time

import torch

from ...engine.cpu_affinity import openmp_affinity, physical_cores, pin_this_process, plan, usable_cpus
from ...engine.host_resources import HostResources
from ...engine.transport.janitor import clean_after_reaped


def exit_with_parent() -> None:
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
def measurement(host: HostResources | None):
    """(host resources, a fresh run dir under them) for one measurement: the given host's, or
    ones held for this measurement alone. The run dir goes when the measurement ends."""
    with contextlib.ExitStack() as stack:
        if host is None:
            host = HostResources()
            stack.callback(host.release)
        run_dir = tempfile.mkdtemp(dir=host.run_dir)
        stack.callback(shutil.rmtree, run_dir, ignore_errors=True)
        yield host, run_dir


pool_numbers = itertools.count()


def cpu_blocks(consumer_device: str, producer_device: str, pinned: bool = True) -> list | None:
    """Cores for (consumer, producer) as an engine pins 1-thread CPU workers: each CPU process
    its own core when they fit (engine/cpu_affinity.py); a GPU process None, as an engine's GPU
    workers are not pinned. None when nothing is pinned (the OS places both)."""
    on_cpu = [device == "cpu" for device in (consumer_device, producer_device)]
    pinned = pinned and any(on_cpu) and not openmp_affinity()
    blocks = plan([1] * sum(on_cpu), physical_cores(usable_cpus())) if pinned else None
    if blocks is None:
        return None
    blocks = iter(blocks)
    return [next(blocks) if cpu else None for cpu in on_cpu]


def _pinned(cpus: tuple[int, ...] | None, target, *args) -> None:
    """Spawn target: pin, then run `target` (whose threads inherit the pinning)."""
    if cpus:
        pin_this_process(cpus)
    target(*args)


def run_pair(consumer, consumer_args: tuple, producer, producer_args: tuple, host: HostResources,
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
        next_report(receiver, processes)  # listening
        processes.append(spawn.Process(target=_pinned, args=(producer_cpus, producer, *producer_args), daemon=True))
        processes[1].start()
        _watch(host, processes[1], started)
        report = next_report(receiver, processes)
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


def next_report(receiver, processes) -> bytes:
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


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


def summarize(mechanism: str, nbytes: int, samples_us: list[float]) -> dict:
    ordered = sorted(samples_us)
    p99 = ordered[min(len(ordered) - 1, int(round(0.99 * (len(ordered) - 1))))]
    return {"mechanism": mechanism, "bytes": nbytes, "p50_us": round(statistics.median(ordered), 1),
            "p99_us": round(p99, 1), "samples": len(ordered)}
