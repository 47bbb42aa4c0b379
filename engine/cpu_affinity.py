"""Cores of their own for CPU workers, when they fit.

A worker left to the OS scheduler moves between cores as the load shifts, and each move leaves
its caches behind. The handoff feels it most: a stage that has just streamed a large output
through its core, then its sockets' threads on whichever core is free, hands over on cold caches
(`dfuse bench handoff`, 256 MiB: see bench/results/README.md for pinned against unpinned).

So when the torch threads of all CPU workers add up to no more than the cores this engine may
use, each worker gets a block of cores no other worker shares, as vLLM's and SGLang's CPU
backends bind each rank's threads. When they do not fit, pinning would stack workers on shared
cores and forbid the OS from evening out their load: placement is left to the OS. GPU workers
are never pinned (their host threads mostly wait on the device). The engine process stays
unpinned and no core is held back for it: its router thread is light and runs wherever the OS
puts it, beside the workers' threads.

"Cores" are logical CPUs, handed out in the order the OS numbers them: with SMT, two workers may
share a physical core's caches. An OpenMP affinity setting (OMP_PROC_BIND, GOMP_CPU_AFFINITY,
KMP_AFFINITY) is read when torch loads, before a worker pins itself, and may bind its threads
otherwise: turn pinning off (pin_cpu_workers=False) when using one.
"""

from __future__ import annotations

import logging
import os
from typing import Sequence

log = logging.getLogger("dfuse.worker")


def usable_cpus() -> list[int]:
    """The cores the calling thread may run on (a container's cpuset, taskset), in order."""
    return sorted(os.sched_getaffinity(0))


def plan(threads: Sequence[int], cpus: Sequence[int]) -> list[tuple[int, ...]] | None:
    """A block of `threads[i]` cores for worker i, no core in two blocks; None when the blocks
    would need more cores than `cpus` has."""
    if sum(threads) > len(cpus):
        return None
    blocks, start = [], 0
    for count in threads:
        blocks.append(tuple(cpus[start:start + count]))
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
