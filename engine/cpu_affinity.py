"""Cores of their own for CPU workers, when they fit.

A worker left to the OS scheduler moves between cores as the load shifts, and each move leaves
its caches behind; its socket threads run on whichever core is free, often the one a large
write just went through. Measured on the handoff (`dfuse bench handoff`, 2-core VM): pinned,
a 256 MiB hop was 1.3-1.5x faster than placed by the OS; at 16 MiB no different, at 64 MiB
mixed (bench/results/README.md).

So when the torch threads of all CPU workers add up to no more than the cores this engine may
use, each worker gets a block of cores no other worker shares, as vLLM's and SGLang's CPU
backends bind each rank's threads. When they do not fit, pinning would stack workers on shared
cores and forbid the OS from evening out their load: placement is left to the OS. GPU workers
are never pinned (their host threads mostly wait on the device). The engine process stays
unpinned and no core is held back for it: its core thread is light and runs wherever the OS
puts it, beside the workers' threads.

With SMT, a worker gets whole physical cores (all their hardware threads) when every worker
thread can have one; otherwise it gets logical CPUs, siblings side by side, so that a physical
core is shared within a worker before it is shared between two.

An OpenMP affinity setting (OMP_PROC_BIND, OMP_PLACES, GOMP_CPU_AFFINITY, KMP_AFFINITY) is read
when torch loads, before a worker could pin itself, and would bind its threads elsewhere: with
one set, the user has chosen a placement, and workers are not pinned.
"""

from __future__ import annotations

import logging
import os
from typing import Sequence

log = logging.getLogger("dfuse.worker")


OPENMP_AFFINITY = ("OMP_PROC_BIND", "OMP_PLACES", "GOMP_CPU_AFFINITY", "KMP_AFFINITY")


def openmp_affinity() -> str | None:
    """The OpenMP affinity variable set in this environment (the workers inherit it), if any."""
    return next((name for name in OPENMP_AFFINITY if os.environ.get(name)), None)


def usable_cpus() -> list[int]:
    """The cores the calling thread may run on (a container's cpuset, taskset), in order."""
    return sorted(os.sched_getaffinity(0))


def physical_cores(cpus: Sequence[int]) -> list[list[int]]:
    """`cpus` grouped by the physical core they belong to (SMT siblings together), in order of
    their first CPU. Where sysfs does not say, each CPU is a core of its own."""
    cores: dict[str, list[int]] = {}
    for cpu in sorted(cpus):
        try:  # the kernel's own list of the core's hardware threads, e.g. "0,64" or "0-1"
            with open(f"/sys/devices/system/cpu/cpu{cpu}/topology/thread_siblings_list") as siblings:
                key = siblings.read().strip()
        except OSError:
            key = f"cpu{cpu}"
        cores.setdefault(key, []).append(cpu)
    return list(cores.values())


def plan(threads: Sequence[int], cores: Sequence[Sequence[int]]) -> list[tuple[int, ...]] | None:
    """The CPUs of worker i, for `threads[i]` threads each, no CPU in two workers' sets, from
    `cores` (physical cores, each a list of its logical CPUs): `threads[i]` whole cores each when
    there are enough, else `threads[i]` logical CPUs each, siblings side by side. None when the
    threads outnumber the logical CPUs."""
    logical = [cpu for core in cores for cpu in core]
    if sum(threads) > len(logical):
        return None
    units = cores if sum(threads) <= len(cores) else [[cpu] for cpu in logical]
    blocks, start = [], 0
    for count in threads:
        blocks.append(tuple(sorted(cpu for unit in units[start:start + count] for cpu in unit)))
        start += count
    return blocks


def pin_this_process(cpus: Sequence[int]) -> None:
    """Run every thread of this process, and every thread it starts later, on `cpus` only.

    Called first thing in a worker; the threads that exist already (the interpreter may have
    started some while importing) are pinned one by one, later ones inherit their creator's.
    Cores that are no longer ours (a cpuset changed since the plan) leave the process unpinned,
    with a warning: a worker that cannot pin still serves."""
    for tid in os.listdir("/proc/self/task"):
        try:
            os.sched_setaffinity(int(tid), cpus)
        except ProcessLookupError:  # the thread ended meanwhile
            pass
        except OSError as e:
            log.warning("could not pin to cores %s (%s): running where the OS places this worker", describe(cpus), e)
            return


def describe(cpus: Sequence[int]) -> str:
    """0-3,6: the form of taskset and /proc's Cpus_allowed_list."""
    ranges: list[list[int]] = []
    for cpu in sorted(cpus):
        if ranges and cpu == ranges[-1][1] + 1:
            ranges[-1][1] = cpu
        else:
            ranges.append([cpu, cpu])
    return ",".join(str(a) if a == b else f"{a}-{b}" for a, b in ranges)
