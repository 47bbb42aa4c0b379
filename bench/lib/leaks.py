"""The leak check: what outlived a closed engine (worker processes, /dev/shm segments, its socket folder)."""

from __future__ import annotations

import os
import time

from ...engine.transport.shm_files import list_segments
from ...engine.transport.shm_files import pid_running as alive  # a zombie counts as gone


def close_and_check(engine, worker_pids: set[int], wait_s: float = 10.0) -> dict:
    """Close the engine, then report what outlived it: worker processes (every pid the caller saw,
    replacements included, and any child of this process), segments, socket folder."""
    prefix, run_dir = engine.host_names  # read before close: the names stay valid after it
    engine.close()
    deadline = time.monotonic() + wait_s  # close() joins the workers: this only absorbs a slow reap
    while time.monotonic() < deadline and any(alive(p) for p in worker_pids):
        time.sleep(0.05)
    children = {p for p in _children_of(os.getpid()) if alive(p)}
    return {
        "leaked_processes": sorted({p for p in worker_pids if alive(p)} | children),
        "leaked_segments": list_segments(prefix),
        "run_dir_left": os.path.exists(run_dir),
    }


def _children_of(pid: int) -> set[int]:
    """Processes whose parent is `pid` (workers are started with subprocess, so multiprocessing
    does not list them)."""
    found = set()
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{entry}/stat") as f:
                if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                    found.add(int(entry))
        except (OSError, ValueError, IndexError):  # gone meanwhile, or not ours to read
            pass
    return found
