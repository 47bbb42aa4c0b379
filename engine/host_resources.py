"""What an engine owns on its host beside its processes, made and given back as one:

- a private run dir (0700, random name): the control sockets and weight manifests;
- a /dev/shm name prefix for its segments (slot pools, weight cache), with the liveness lock
  that tells other engines' sweeps this engine is alive (transport/shm_files.py);
- the janitor, a process of its own that removes both if the engine and its workers die
  together (transport/janitor.py);
- optionally, a CPU latency request that keeps idle CPUs quick to wake (cpu_wake.py).

Creating one first sweeps what dead engines left behind.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile

import zmq

from .cpu_wake import CpuWakeHold
from .transport.janitor import Janitor
from .transport.shm_files import EngineLock, new_segment_prefix, sweep_stale_segments, unlink_segments

log = logging.getLogger("dfuse.engine")
_LONGEST_SOCKET_NAME = 16  # "/w63.1000", "/pickle-ack": what endpoint() is asked for, with room to spare


class HostResources:
    def __init__(self, cpu_wake_latency_us: int | None = None, detached_janitor: bool = False) -> None:
        """`cpu_wake_latency_us`: hold a CPU latency request of that many us (None: none).
        `detached_janitor`: see Janitor.start (a Ray actor's resources)."""
        sweep_stale_segments()
        self.run_dir = tempfile.mkdtemp(prefix="dfuse-")
        longest = zmq.IPC_PATH_MAX_LEN - _LONGEST_SOCKET_NAME
        if len(self.run_dir) > longest:  # else a bind fails later, less clearly
            shutil.rmtree(self.run_dir, ignore_errors=True)
            raise ValueError(
                f"TMPDIR: the engine's socket directory {self.run_dir} has {len(self.run_dir)} characters, and "
                f"at most {longest} leave room for its Unix sockets' names; set TMPDIR (or TMP, TEMP) to a "
                "shorter directory, e.g. /tmp")
        self.segment_prefix = new_segment_prefix()
        self._janitor: Janitor | None = None
        # The liveness lock comes before any segment of the prefix: while this process holds it,
        # no sweep (from any PID namespace) takes our segments for a dead engine's.
        try:
            self._lock: EngineLock | None = EngineLock.acquire(self.segment_prefix, self.run_dir)
        except BaseException:
            shutil.rmtree(self.run_dir, ignore_errors=True)
            raise
        # If this process and its workers die together (a group SIGKILL or SIGTERM), nobody here
        # is left to clean up: the janitor, in a session of its own, does it then.
        try:
            self._janitor = Janitor.start(self.segment_prefix, self.run_dir, detached=detached_janitor)
        except OSError as e:
            log.warning("no shared-memory janitor (%s): if the engine and its workers are killed together, "
                        "their segments stay until the next engine starts", e)
        # Last: nothing can fail after it, and it ends with this process whatever happens.
        self.cpu_wake = None if cpu_wake_latency_us is None else CpuWakeHold.acquire(cpu_wake_latency_us)

    @property
    def janitor(self) -> Janitor | None:
        """Told which workers run (launcher.spawn_worker), to clean up after them too."""
        return self._janitor

    def endpoint(self, name: str) -> str:
        """A ZeroMQ endpoint in the run dir (only this user can reach it)."""
        return f"ipc://{os.path.join(self.run_dir, name)}"

    def release(self) -> None:
        """Give the CPU latency request back, unlink every segment, remove the run dir, then drop
        the lock and let the janitor go (it finds nothing left and exits; it is reaped here).
        Idempotent."""
        if self.cpu_wake is not None:  # first: nothing below can keep it held if it raises
            self.cpu_wake.release()
        unlink_segments(self.segment_prefix)
        shutil.rmtree(self.run_dir, ignore_errors=True)
        lock, self._lock = self._lock, None
        if lock is not None:
            lock.release()
        janitor, self._janitor = self._janitor, None
        if janitor is not None:
            janitor.close()
