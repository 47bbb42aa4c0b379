"""The leak check: what outlived a closed engine (worker processes, /dev/shm segments, its socket folder)."""

from __future__ import annotations

import multiprocessing
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
    # (and the janitor's exit, a child too, which follows the engine's close by a moment)
    leftovers = lambda: {p for p in worker_pids | _dfuse_children() if alive(p)}  # noqa: E731
    while time.monotonic() < deadline and leftovers():
        time.sleep(0.05)
    return {
        "leaked_processes": sorted(leftovers()),
        "leaked_segments": list_segments(prefix),
        "run_dir_left": os.path.exists(run_dir),
    }


def _dfuse_children() -> set[int]:
    """This process's children that run dfuse code (workers, the janitor: started with subprocess,
    so multiprocessing does not list them), and its multiprocessing children (a monolithic
    baseline's processes). Not multiprocessing's own resource tracker, which lives as long as
    this process does."""
    found = {c.pid for c in multiprocessing.active_children()}
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{entry}/stat") as f:
                parent = int(f.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                command = f.read()
        except (OSError, ValueError, IndexError):  # gone meanwhile, or not ours to read
            continue
        if parent == os.getpid() and b"dfuse." in command:
            found.add(int(entry))
    return found
