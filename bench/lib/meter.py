"""How busy the rest of the machine was while a benchmark timed something (Linux /proc).

Other processes on a 2-core machine (tests, builds) distort a timing badly, worst of all for
multi-threaded torch, whose threads wait for each other: every benchmark that times on the CPU
measures the CPU time others used meanwhile and reports it beside its numbers.
"""

from __future__ import annotations

import os
import time

BUSY_SHARE = 0.05  # other processes using more than this share of the cores during a timed phase: flagged


def machine_busy_s() -> float | None:
    """CPU seconds the whole machine spent busy since boot (/proc/stat), None elsewhere.

    Busy is user + nice + system + irq + softirq + steal. The two "guest" columns that follow
    are left out on purpose: the kernel already counts guest time inside user and nice, so
    summing every column but idle and iowait counts a guest VM's time twice. iowait is idle
    time (a CPU waiting for a disk runs nothing)."""
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    user, nice, system, idle, iowait, irq, softirq, steal = (fields + [0] * 8)[:8]
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def processes_cpu_s(pids: list[int]) -> float | None:
    """CPU seconds (user + system, every thread) the processes `pids` used so far; None if one is gone."""
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            return None
        total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15 of proc(5))
    return total / os.sysconf("SC_CLK_TCK")


class CpuMeter:
    """CPU seconds used from its creation on by our processes (`pids`) and by everything else."""

    def __init__(self, pids: list[int]):
        self._pids = pids
        self._start = (machine_busy_s(), processes_cpu_s(pids))

    def read(self) -> tuple[float, float] | None:
        """(our CPU seconds, other processes' CPU seconds) so far; None where /proc cannot tell."""
        busy, ours = machine_busy_s(), processes_cpu_s(self._pids)
        if None in (busy, ours, *self._start):
            return None
        ours_s, busy_s = ours - self._start[1], busy - self._start[0]
        return ours_s, max(0.0, busy_s - ours_s)

    def stop(self, wall: float) -> dict:
        """The phase's numbers as reported (empty where /proc cannot tell): shares are of all cores."""
        seconds = self.read()
        if seconds is None:
            return {}
        ours_s, other = seconds
        cores = os.cpu_count() or 1
        return {
            "cpu_s": round(ours_s, 3),
            "cpu_utilisation": round(ours_s / wall / cores, 3),
            "other_processes_cpu_s": round(other, 3),
            "other_processes_cpu_share": round(other / wall / cores, 3),
        }


def wait_quiet(max_s: float, window_s: float = 1.0) -> float:
    """Wait until the whole machine was nearly idle for `window_s` (at most `max_s`); seconds waited."""
    started = time.perf_counter()
    cores = os.cpu_count() or 1
    while time.perf_counter() - started < max_s:
        before = machine_busy_s()
        time.sleep(window_s)
        after = machine_busy_s()
        if before is None or after is None or (after - before) / window_s / cores <= BUSY_SHARE:
            break
    return time.perf_counter() - started
