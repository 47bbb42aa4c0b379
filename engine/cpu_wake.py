"""Keep idle CPUs quick to wake while an engine runs (Linux CPU latency QoS).

A stage worker sleeps while its producer computes, then is woken by a message. If its CPU went
idle meanwhile, the kernel halted it, and waking a halted CPU is the slowest part of a hop: a VM
exit and a host reschedule on a virtual machine, a deep C-state exit on bare metal; the longer a
thread slept, the more it costs (measured: bench/results/README.md, handoff). A CPU latency
request of 0 us keeps idle CPUs in the kernel's polling idle state instead: they spin only while
nothing else wants them (a runnable thread preempts the polling at once), and a wake-up costs
what it costs on a busy CPU.
The price is power (and turbo headroom, and an SMT sibling's share), and on a VM the host time
of idle vCPUs.

The request is the open file itself (/dev/cpu_dma_latency, the interface tuned's
latency-performance profile uses): the kernel drops it when the last copy of the file closes.
Spawned workers never get a copy, and a child forked from the engine closes its copy at once
(register_at_fork below), so the request ends with the engine however the engine ends, SIGKILL
included. It is system-wide, and holders combine by taking the lowest value. Writing it needs
permission (root, or a udev rule for the group); without it the engine runs as before and says
so at INFO level.
"""

from __future__ import annotations

import contextlib
import logging
import os
import struct
import weakref

log = logging.getLogger("dfuse.engine")

QOS_PATH = "/dev/cpu_dma_latency"
MAX_US = 1_000_000  # a bound any useful request is far below (the kernel's default is 2000 s)


class CpuWakeHold:
    """One CPU latency request, held until `release()` or the process ends."""

    def __init__(self, fd: int, max_us: int, path: str) -> None:
        self._fd: int | None = fd
        self.max_us = max_us
        self.path = path
        _holds.add(self)

    @classmethod
    def acquire(cls, max_us: int, path: str = QOS_PATH) -> CpuWakeHold | None:
        """Ask that no idle CPU take longer than `max_us` to wake; None (and why, logged) if
        this host does not let this process ask."""
        value = struct.pack("=i", max_us)  # before the open: an out-of-range value leaks nothing
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
        except OSError as e:
            log.info("idle CPUs keep the OS's wake-up latency: cannot open %s (%s)", path, e.strerror)
            return None
        try:
            os.write(fd, value)
        except OSError as e:
            os.close(fd)
            log.info("idle CPUs keep the OS's wake-up latency: writing %s failed (%s)", path, e.strerror)
            return None
        return cls(fd, max_us, path)

    @property
    def held(self) -> bool:
        return self._fd is not None

    def release(self) -> None:
        """Give the request back (idempotent)."""
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)

    @contextlib.contextmanager
    def paused(self):
        """Give the request back for a while, then ask again: what the OS's own latency gives,
        measured beside what the request gives (bench/handoff/command.py). A released hold stays so."""
        if not self.held:
            yield
            return
        self.release()
        try:
            yield
        finally:
            again = CpuWakeHold.acquire(self.max_us, self.path)
            if again is None:
                log.warning("could not ask for the CPU latency request again: idle CPUs keep the OS's latency")
            else:
                self._fd, again._fd = again._fd, None


_holds: weakref.WeakSet[CpuWakeHold] = weakref.WeakSet()


def _forget_holds_in_child() -> None:
    """A forked child (a DataLoader worker, user code beside the engine) must not keep the
    engine's request alive: close its copy of every held file."""
    for hold in list(_holds):
        hold.release()


os.register_at_fork(after_in_child=_forget_holds_in_child)


def current_limit_us(path: str = QOS_PATH) -> int | None:
    """The wake-up latency the kernel currently allows idle CPUs (every holder's lowest
    request), or None where it cannot be read here."""
    try:
        with open(path, "rb") as file:
            return struct.unpack("=i", file.read(4))[0]
    except (OSError, struct.error):
        return None
