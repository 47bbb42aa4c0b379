"""The engine's janitor: a tiny process that removes the engine's segments and run dir once the
engine is gone, however it went.

    python -m dfuse.engine.transport.janitor      (stdin: {"prefix": ..., "run_dir": ...}\n, then lines)

The engine starts it (`Janitor.start`) right after taking its lock, in a session of its own so
that a signal to the engine's process group (`kill -9 -- -PGID`, Ctrl-C, a group SIGTERM) does
not reach it, and keeps the write end of its stdin. The first line on stdin names the segment
prefix and run dir to clean up (never the command line: `ps` shows that to every user). Then the
janitor only blocks reading stdin, where the engine tells it which workers it started and reaped
(`+<pid> <start time>` / `-<pid>` lines); at EOF -- the engine closed it after cleaning up itself, or the engine process ended and
the kernel closed it -- it removes the run dir, unlinks every file with the prefix (the lock
file last), unlinks what CUDA IPC left for each worker the engine never reaped once it has
exited (shm_files.unlink_cuda_ipc_files), then exits. It ignores SIGINT, SIGTERM and SIGHUP
(systemd signals the whole cgroup on stop): it exits when the engine does, never later than its
cleanup.

Why it is needed: the engine cleans up on close, its workers clean up when they see the engine
die, but when the engine and its workers die at the same moment (a group SIGKILL or SIGTERM) no
one is left, and the pools and the GB-sized weight cache would wait in /dev/shm for the next
engine start. Import nothing heavy here (no torch): only the standard library and shm_files.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import weakref

from .shm_files import RUN_DIR_PREFIX, is_engine_prefix, pid_running, unlink_cuda_ipc_files, unlink_segments

log = logging.getLogger("dfuse.transport")

MODULE = "dfuse.engine.transport.janitor"
DETACH = "--detach"  # start the real janitor as a process of its own, and exit
STRAGGLER_WAIT_S = 1.0  # after an engine that died uncleanly: one more pass for dying workers' files
WORKER_EXIT_WAIT_S = 10.0  # workers exit at once when their engine dies; a stuck one is not waited for longer


class Janitor:
    """The engine's handle on its janitor process."""

    def __init__(self, process: subprocess.Popen):
        self.process = process
        self._tell_lock = threading.Lock()  # workers are started and reaped from several threads
        _started.add(self)

    @classmethod
    def start(cls, prefix: str, run_dir: str, detached: bool = False) -> "Janitor":
        """`detached`: the janitor is not this process's child but its grandchild (a first child
        starts it and exits). A Ray actor needs that (engine/node_agent.py): Ray SIGKILLs every
        child of an actor's process when it exits, and the janitor must outlive the actor to
        clean up after it. `process` is then the first child, which has exited."""
        _check_args(prefix, run_dir)
        process = subprocess.Popen(
            [sys.executable, "-m", MODULE, *([DETACH] if detached else [])],
            stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,  # stderr inherited: it only reports errors
            close_fds=True, start_new_session=True,
        )
        try:  # one short line into an empty pipe: it never blocks
            os.write(process.stdin.fileno(), _header(prefix, run_dir))
        except OSError:  # it died at once: it has nothing to clean up, the next sweep does
            pass
        os.set_blocking(process.stdin.fileno(), False)  # _tell must never stall the engine core
        return cls(process)

    @property
    def pid(self) -> int:
        return self.process.pid

    def watch(self, pid: int, started: float) -> None:
        """A worker was started (at `started`, time.time()): if the engine dies without reaping
        it, clean up after it."""
        self._tell(f"+{pid} {started!r}\n")

    def forget(self, pid: int) -> None:
        """The engine reaped this worker and cleaned up after it (its pid may be reused now)."""
        self._tell(f"-{pid}\n")

    def _tell(self, line: str) -> None:
        # One short write on the raw fd: a line under PIPE_BUF goes in whole or not at all. If
        # the pipe is full (a stopped janitor), the line is dropped: the cost is a leftover file
        # after an engine crash, never a stalled core.
        with self._tell_lock:
            stdin = self.process.stdin
            if stdin is None or stdin.closed:
                return
            try:
                os.write(stdin.fileno(), line.encode())
            except (OSError, ValueError):  # full, or the janitor is gone
                pass

    def close(self, timeout: float = 5.0) -> None:
        """Let the janitor go (the engine has cleaned up: it finds nothing left) and reap it."""
        _started.discard(self)
        stdin = self.process.stdin
        if stdin is not None and not stdin.closed:
            try:
                stdin.close()
            except OSError:
                pass
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:  # it still finishes on its own; Popen reaps it later
            log.warning("the shared-memory janitor (pid %d) has not exited yet", self.process.pid)


_started: "weakref.WeakSet[Janitor]" = weakref.WeakSet()


def _forget_janitors_in_child() -> None:
    """After os.fork() (not fork+exec, which closes the pipe anyway): a child holding the write
    end would keep the janitor waiting after the engine died. Close the child's copy."""
    for janitor in list(_started):
        try:
            janitor.process.stdin.close()
        except (OSError, ValueError, AttributeError):
            pass
        janitor.process.returncode = 0  # not this child's to wait for
    _started.clear()


os.register_at_fork(after_in_child=_forget_janitors_in_child)


def _check_args(prefix: str, run_dir: str) -> None:
    # A short prefix ("dfuse_") would match every engine's segments, not just this one's.
    if not is_engine_prefix(prefix):
        raise ValueError(f"janitor: not an engine segment prefix: {prefix!r}")
    if not os.path.isabs(run_dir) or not os.path.basename(run_dir.rstrip("/")).startswith(RUN_DIR_PREFIX):
        raise ValueError(f"janitor: not a dfuse run dir: {run_dir!r}")


def _header(prefix: str, run_dir: str) -> bytes:
    return json.dumps({"prefix": prefix, "run_dir": run_dir}).encode() + b"\n"


def _read_header(fd: int = 0) -> tuple[str, str, bytes]:
    """The engine's first line: (prefix, run dir, what was read past it). ValueError if none."""
    data = b""
    while b"\n" not in data and len(data) < 65536:
        try:
            chunk = os.read(fd, 4096)
        except OSError:
            chunk = b""
        if not chunk:
            break
        data += chunk
    line, newline, rest = data.partition(b"\n")
    try:
        described = json.loads(line) if newline else None
        prefix, run_dir = described["prefix"], described["run_dir"]
    except (ValueError, TypeError, KeyError) as e:
        raise ValueError("janitor: the engine named no prefix and run dir on stdin") from e
    if not isinstance(prefix, str) or not isinstance(run_dir, str):
        raise ValueError("janitor: the engine named no prefix and run dir on stdin")
    _check_args(prefix, run_dir)
    return prefix, run_dir, rest


def clean_after_reaped(pid: int, started: float, janitor: Janitor | None) -> None:
    """A worker (started at `started`, time.time()) has been joined: unlink what CUDA IPC left
    for it in /dev/shm now, and tell the janitor it need not (the pid may be reused)."""
    unlink_cuda_ipc_files(pid, started)
    if janitor is not None:
        janitor.forget(pid)


def clean(prefix: str, run_dir: str) -> list[str]:
    """Remove the engine's run dir, then unlink its segments, its lock file last (the lock file
    names the run dir: while it exists, a sweep can still find both). What was removed."""
    removed = []
    if os.path.isdir(run_dir) and not os.path.islink(run_dir):
        shutil.rmtree(run_dir, ignore_errors=True)
        removed.append(run_dir)
    return removed + unlink_segments(prefix)


def _read_workers_until_eof(fd: int = 0, pending: bytes = b"") -> dict[int, float]:
    """Follow the engine's `+<pid> <start time>` / `-<pid>` lines until EOF: the workers it has
    not reaped, with their start times. `pending`: what was read already."""
    workers = {}
    while True:
        *lines, pending = pending.split(b"\n")
        for line in lines:
            sign, (pid, _, started) = line[:1], line[1:].partition(b" ")
            if not pid.isdigit():
                continue
            if sign == b"-":
                workers.pop(int(pid), None)
            elif sign == b"+":
                try:
                    workers[int(pid)] = float(started)
                except ValueError:
                    pass
        try:
            chunk = os.read(fd, 4096)
        except OSError:
            chunk = b""
        if not chunk:
            return workers
        pending += chunk


def clean_after_workers(workers: dict[int, float], timeout: float = WORKER_EXIT_WAIT_S) -> list[str]:
    """Unlink what CUDA IPC left in /dev/shm for these workers (pid -> start time), each as soon
    as it has exited (they go on their own when their engine dies; zombies count as exited);
    after `timeout`, the stuck ones' too. Files older than a worker's start are never taken."""
    left, removed = dict(workers), []
    deadline = time.monotonic() + timeout
    while left:
        for pid in [p for p in left if not pid_running(p) or time.monotonic() >= deadline]:
            removed += unlink_cuda_ipc_files(pid, left.pop(pid))
        if left:
            time.sleep(0.05)
    return removed


def main() -> int:
    if sys.argv[1:] == [DETACH]:  # hand stdin (the pipe) to the janitor proper, which init adopts
        subprocess.Popen([sys.executable, "-m", MODULE], stdout=subprocess.DEVNULL, close_fds=True,
                         start_new_session=True)
        return 0
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)
    try:
        prefix, run_dir, pending = _read_header()
    except ValueError as e:
        print(e, file=sys.stderr)
        return 2
    workers = _read_workers_until_eof(pending=pending)
    if clean(prefix, run_dir):
        # The engine did not clean up: it died, maybe with workers that are dying too and might
        # still create a file (a weight segment being published). Look once more, then go.
        time.sleep(STRAGGLER_WAIT_S)
        clean(prefix, run_dir)
    clean_after_workers(workers)  # none left when the engine reaped every worker itself
    return 0


if __name__ == "__main__":
    sys.exit(main())
