"""The engine's files in /dev/shm by name: who owns them, whether the owner lives, the sweep.

Torch-free on purpose (stdlib only): the janitor (janitor.py) is a process of its own that
imports this module and nothing heavy. shm.py re-exports everything public here.

Every engine owns one name prefix `dfuse_<engine pid>_<token>_` and one run dir:

    /dev/shm/dfuse_<pid>_<token>_lock      liveness lock: the engine holds flock(LOCK_EX) on it
                                           for its whole life (created first, unlinked last)
    /dev/shm/dfuse_<pid>_<token>_w<id>     slot pools (shm.py)
    /dev/shm/dfuse_<pid>_<token>_wt_<key>  host weight cache (stages/weights.py)
    <tmp>/dfuse-XXXXXXXX/                  run dir: ipc sockets, weight manifests; the lock
                                           file's content names it (path, device, inode)

Whether an engine lives is decided by its lock, not its pid: an engine in another PID namespace
that shares /dev/shm (docker --ipc=host) sees every pid of ours as dead, but a flock is held on
the file itself, whatever the namespace. The lock is released by the kernel when the engine
process ends, however it ends (its fd is never inherited). Prefixes without a lock file (an
engine older than the lock, or one that died between choosing its prefix and taking its lock)
fall back to the pid check. The lock file is not a segment: `list_segments` leaves it out,
`unlink_segments` removes it last.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import re
import secrets
import shutil
import stat
import tempfile
import weakref

log = logging.getLogger("dfuse.transport")

SHM_DIR = "/dev/shm"
PREFIX = "dfuse_"
LOCK_NAME = "lock"  # the lock file is `<prefix>lock`
RUN_DIR_PREFIX = "dfuse-"  # engine/core.py: tempfile.mkdtemp(prefix="dfuse-")

_ENGINE_PREFIX_RE = re.compile(rf"({PREFIX}(\d+)_[0-9A-Za-z]+_)")  # what new_segment_prefix() makes
_PID_RE = re.compile(rf"^{PREFIX}(\d+)_")


class ShmFull(ValueError, OSError):
    """/dev/shm cannot hold a new segment. An OSError (errno ENOSPC as a rule): a cache that can
    do without its segment catches it and carries on; and a ValueError: a pool the configuration
    asks for but the machine cannot hold is a bad setting, reported as one."""

    def __init__(self, message: str, error: int | None = errno.ENOSPC):
        super().__init__(message)
        self.errno = error  # str(self) stays the message (no strerror set)


def new_segment_prefix() -> str:
    """A per-engine name prefix: the pid tells humans (and old engines) whose it is, the token
    avoids collisions."""
    return f"{PREFIX}{os.getpid()}_{secrets.token_hex(4)}_"


def is_segment_name(name: str) -> bool:
    return name.startswith(PREFIX) and "/" not in name and name not in (".", "..")


def is_engine_prefix(prefix: str) -> bool:
    """True for a whole engine prefix (`dfuse_<pid>_<token>_`), never for a shorter one that
    would match other engines' names too."""
    return _ENGINE_PREFIX_RE.fullmatch(prefix) is not None


def lock_name(prefix: str) -> str:
    return prefix + LOCK_NAME


def unlink_segment(name: str) -> bool:
    """Unlink /dev/shm/`name` if it is a regular file of this user; anything else there (a
    directory, another user's file: a neighbour's, or planted to make us fail) is left alone.
    Never raises: a name we cannot or should not remove must not stop an engine from starting.
    True when it was unlinked."""
    path = os.path.join(SHM_DIR, name)
    try:
        info = os.lstat(path)
        if not stat.S_ISREG(info.st_mode) or info.st_uid != os.geteuid():
            log.debug("left %s alone: not a regular file of this user", path)
            return False
        os.unlink(path)
    except FileNotFoundError:
        return False
    except OSError as e:
        log.debug("could not unlink %s: %s", path, e)
        return False
    return True


def unlink_cuda_ipc_files(pid: int, started: float) -> list[str]:
    """Unlink what exporting CUDA IPC handles left in /dev/shm for `pid`, a worker that exited
    and had started at `started` (time.time()).

    The CUDA driver gives a process that exports IPC memory or interprocess events an 80 KiB
    `cuda.shm.<n>.<pid in hex>.<n>`, and torch's export a reference-count file
    `torch_<pid>_<n>_<n>`. The driver's stays even after a normal exit, torch's after an exit
    that skips its atexit hooks (a killed or stopped worker); H100, driver 580: see
    bench/results/README.md. A GPU worker that restarts all day would pile them up. Only files
    this user made since the worker started are taken: the same names from an earlier process
    with that pid, another user's or another container's sharing /dev/shm stay."""
    own = re.compile(rf"cuda\.shm\.\d+\.{pid:x}\.\d+|torch_{pid}_\d+_\d+")
    removed = []
    for name in _list_files(""):
        if not own.fullmatch(name):
            continue
        path = os.path.join(SHM_DIR, name)
        try:
            info = os.stat(path)
            if info.st_uid != os.geteuid() or info.st_mtime < started - 1.0:  # 1 s: timestamp granularity
                continue
            os.unlink(path)
        except OSError:  # gone meanwhile, or not ours to remove: never worth failing the caller
            continue
        removed.append(name)
    return removed


def list_segments(prefix: str = PREFIX) -> list[str]:
    """Segments (shared memory) whose names start with `prefix`; engines' lock files are not."""
    return [n for n in _list_files(prefix) if not _is_lock(n)]


def _list_files(prefix: str) -> list[str]:
    try:
        return sorted(n for n in os.listdir(SHM_DIR) if n.startswith(prefix))
    except FileNotFoundError:
        return []


def _is_lock(name: str) -> bool:
    match = _ENGINE_PREFIX_RE.match(name)
    return match is not None and name == lock_name(match.group(1))


def unlink_segments(prefix: str) -> list[str]:
    """Unlink every file named with `prefix`, an engine's lock file last (while a prefix still
    has segments, its lock is what says whether they are in use). Returns the names unlinked."""
    names = _list_files(prefix)
    names.sort(key=_is_lock)  # stable: segments in name order, then the lock
    return [name for name in names if unlink_segment(name)]


class EngineLock:
    """An engine's liveness lock: `<prefix>lock` in /dev/shm, created 0600 before any other
    segment of the prefix and flock()ed exclusively until `release()` or the process's end.

    The fd stays in this process only (non-inheritable: never in a worker or the janitor; closed
    in a child made by a bare fork), so the lock says exactly "the engine process lives"."""

    def __init__(self, prefix: str, fd: int):
        self.prefix = prefix
        self._fd: int | None = fd
        _held.add(self)

    @classmethod
    def acquire(cls, prefix: str, run_dir: str | None = None) -> "EngineLock":
        """Create and lock `<prefix>lock`, before any segment of `prefix`. With `run_dir` (the
        engine's), the lock file names it, so that a sweep can remove it once the engine is dead."""
        if not is_engine_prefix(prefix):
            raise ValueError(f"not an engine segment prefix: {prefix!r}")
        content = _describe_run_dir(run_dir) if run_dir is not None else b""
        return cls(prefix, _create_locked(os.path.join(SHM_DIR, lock_name(prefix)), content))

    @property
    def held(self) -> bool:
        return self._fd is not None

    def release(self) -> None:
        """Drop the lock and unlink the lock file if it is still ours. Call it after the
        engine's segments are gone: a prefix with segments and no lock falls back to pid checks."""
        fd, self._fd = self._fd, None
        if fd is None:
            return
        _held.discard(self)
        try:
            path = os.path.join(SHM_DIR, lock_name(self.prefix))
            mine, there = os.fstat(fd), os.stat(path, follow_symlinks=False)
            if (mine.st_dev, mine.st_ino) == (there.st_dev, there.st_ino):
                os.unlink(path)
        except FileNotFoundError:
            pass
        finally:
            os.close(fd)  # closing the last fd of the open file drops the flock


_held: "weakref.WeakSet[EngineLock]" = weakref.WeakSet()


def _drop_locks_in_child() -> None:
    """After os.fork() (not fork+exec, which closes the fd anyway): the child shares the lock's
    open file, so it would keep a dead engine's lock held. Close its copy; the parent keeps the lock."""
    for lock in list(_held):
        fd, lock._fd = lock._fd, None
        if fd is not None:
            try:
                os.close(fd)
            except OSError:
                pass
    _held.clear()


os.register_at_fork(after_in_child=_drop_locks_in_child)


def _create_locked(path: str, content: bytes = b"") -> int:
    """A new file at `path`, 0600, holding `content`, returned as an fd that already holds
    flock(LOCK_EX). ShmFull when /dev/shm has no room for it (nothing is left behind then).

    The file is made unnamed (O_TMPFILE), written, locked, then linked in: nobody can see the
    name while it is unlocked, so a sweep can never take a starting engine for a dead one."""
    directory = os.path.dirname(path)
    fd = None
    try:
        fd = os.open(directory, os.O_TMPFILE | os.O_RDWR, 0o600)
        os.write(fd, content)
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.link(f"/proc/self/fd/{fd}", path)  # FileExistsError when the name is taken
        return fd
    except FileExistsError:
        os.close(fd)
        raise
    except (AttributeError, OSError) as e:  # no O_TMPFILE on this file system, or no /proc
        if fd is not None:
            os.close(fd)  # an unnamed file goes with its last fd
        if getattr(e, "errno", None) == errno.ENOSPC:
            raise _full(path) from None
    # Fallback: create, then lock at once. A sweep that opened the name in between and locked it
    # first takes us for dead and unlinks it: then we hold a lock on a nameless file. Refuse.
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    except OSError as e:
        if e.errno == errno.ENOSPC:
            raise _full(path) from None
        raise
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        if os.fstat(fd).st_nlink == 0:
            raise RuntimeError(f"{path} was swept while it was being created; start again")
        os.write(fd, content)
    except BaseException as e:
        if os.fstat(fd).st_nlink:  # ours (O_EXCL): an empty lock file would say nothing
            os.unlink(path)
        os.close(fd)
        if isinstance(e, OSError) and e.errno == errno.ENOSPC:
            raise _full(path) from None
        raise
    return fd


def _full(path: str) -> ShmFull:
    return ShmFull(f"cannot create the engine's lock file {path}: {SHM_DIR} is full ({os.strerror(errno.ENOSPC)}); "
                   f"free space in {SHM_DIR} or give the machine more shared memory")


def _describe_run_dir(run_dir: str) -> bytes:
    """What a lock file says about its engine's run dir: path, device and inode (JSON)."""
    info = os.stat(run_dir, follow_symlinks=False)
    return json.dumps({"run_dir": os.path.abspath(run_dir), "dev": info.st_dev, "ino": info.st_ino}).encode()


def _described_run_dir(lock_fd: int) -> tuple[str, int, int] | None:
    """(path, device, inode) of the run dir a lock file names, as its engine saw it."""
    try:
        described = json.loads(os.pread(lock_fd, 4096, 0) or b"null")
        path, dev, ino = described["run_dir"], int(described["dev"]), int(described["ino"])
    except (OSError, ValueError, TypeError, KeyError, RecursionError):
        return None
    return (path, dev, ino) if isinstance(path, str) else None


def _removable_run_dir(described: tuple[str, int, int] | None) -> str | None:
    """The run dir a dead engine's lock file names, if it is safe to remove: a real directory
    named `dfuse-*` right in this process's tempfile.gettempdir(), owned by this user, on the
    device and inode the engine saw (not a namesake on another file system, e.g. another
    container's /tmp). The name itself is mkdtemp's random one."""
    if described is None:
        return None
    path, dev, ino = described
    if (os.path.dirname(path) != os.path.abspath(tempfile.gettempdir())
            or not os.path.basename(path).startswith(RUN_DIR_PREFIX)):
        return None
    try:
        info = os.stat(path, follow_symlinks=False)
    except OSError:
        return None
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.geteuid() or (info.st_dev, info.st_ino) != (dev, ino):
        return None
    return path


def _trusted(info: os.stat_result) -> bool:
    """A lock file whose word the sweep may take: a regular file of this user that nobody else
    could have written. Anyone can create `/dev/shm/dfuse_*_lock`; one planted by another user
    could name our live engine's run dir and have us delete it."""
    return stat.S_ISREG(info.st_mode) and info.st_uid == os.geteuid() and not info.st_mode & 0o022


@contextlib.contextmanager
def _dead_engine(prefix: str):
    """Yields (dead, the run dir its lock file names or None) for the engine that owns `prefix`.
    While `dead` is true, this process holds the dead engine's lock, so no second sweep judges
    it meanwhile. A lock file that is not ours (`_trusted`) counts as alive: not ours to judge."""
    try:
        fd = os.open(os.path.join(SHM_DIR, lock_name(prefix)), os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except FileNotFoundError:
        # No lock file: an engine from before the lock, or one that died between choosing its
        # prefix and taking its lock. Only the pid can tell (wrong across PID namespaces).
        yield not _pid_alive(int(_ENGINE_PREFIX_RE.fullmatch(prefix).group(2))), None
        return
    except OSError:  # another user's (0600), or not a file we made
        yield False, None
        return
    try:
        if not _trusted(os.fstat(fd)):
            log.debug("left %s alone: not a lock file of this user", lock_name(prefix))
            yield False, None
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:  # BlockingIOError: a live engine holds it (or another sweep does)
            yield False, _described_run_dir(fd)
            return
        yield True, _described_run_dir(fd)
    finally:
        os.close(fd)


def sweep_stale_segments() -> list[str]:
    """Unlink the segments of dfuse engines that no longer run (e.g. killed with SIGKILL), and
    remove their run dirs. An engine is dead when its lock file can be locked; without a lock
    file, when its pid is. Returns the segment names unlinked."""
    swept: list[str] = []
    prefixes: set[str] = set()
    for name in _list_files(PREFIX):
        match = _ENGINE_PREFIX_RE.match(name)
        if match:
            prefixes.add(match.group(1))
        elif (old := _PID_RE.match(name)) and not _pid_alive(int(old.group(1))):
            if unlink_segment(name):  # a name without a token: only its pid can tell
                swept.append(name)
    with contextlib.ExitStack() as held:  # the dead engines' locks, until their files are gone
        judged = [(prefix, *held.enter_context(_dead_engine(prefix))) for prefix in sorted(prefixes)]
        # A run dir some live engine's lock names is never removed, whatever a dead one's says.
        live_dirs = {described[1:] for _, dead, described in judged if not dead and described is not None}
        for prefix, dead, described in judged:
            if not dead:
                continue
            run_dir = _removable_run_dir(described)
            if run_dir is not None and described[1:] not in live_dirs:
                shutil.rmtree(run_dir, ignore_errors=True)
                log.info("removed the run dir %s of a dead engine", run_dir)
            swept += unlink_segments(prefix)  # its lock file last
    if swept:
        log.info("unlinked %d segments of dead engines", len(swept))
    return swept


def pid_running(pid: int) -> bool:
    """Alive and not a zombie (an exited child its parent, or init, has not reaped yet)."""
    if not _pid_alive(pid):
        return False
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:  # gone (and reaped) since kill() answered
        return False
    except (OSError, IndexError):
        return True  # no /proc: the kill() answer stands


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):  # OverflowError: a name like dfuse_99999999999999999999_
        return False
    except PermissionError:
        return True
    return True
