"""The start-up sweep and other users of the host: /dev/shm is writable by everyone, so what is
there under our names may be a neighbour's, or planted on purpose. The sweep only takes the word
of lock files of this user, never removes a run dir a live engine's lock names, and skips what it
cannot or should not remove instead of failing the engine's start.

Another user is simulated with os.chown to `NOBODY` (the tests run as root), as a user of their
own would make the file.
"""

import json
import os
import secrets
import shutil
import tempfile

import pytest

from dfuse.engine.transport import shm_files
from dfuse.engine.transport.shm_files import new_segment_prefix, sweep_stale_segments, unlink_segments

from process_utils import LockHolder, dead_pid

NOBODY = 65534
pytestmark = pytest.mark.skipif(os.geteuid() != 0 or not os.path.isdir(shm_files.SHM_DIR),
                                reason="chowns files to another user: needs root and /dev/shm")



def _shm(name: str) -> str:
    return os.path.join(shm_files.SHM_DIR, name)


def _plant_lock(prefix: str, run_dir: str, owner: int, mode: int = 0o644) -> str:
    """A lock file, not held by anyone, naming `run_dir` exactly as an engine's would."""
    info = os.stat(run_dir)
    path = _shm(prefix + "lock")
    with open(path, "x") as f:
        json.dump({"run_dir": run_dir, "dev": info.st_dev, "ino": info.st_ino}, f)
    os.chmod(path, mode)
    os.chown(path, owner, owner)
    return path


class _LiveEngine:
    """A process holding an engine lock that names its run dir: a live engine, to the sweep."""

    def __init__(self):
        self.prefix, self.run_dir = new_segment_prefix(), tempfile.mkdtemp(prefix="dfuse-")
        self.holder = LockHolder(self.prefix, self.run_dir)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.holder.die()
        unlink_segments(self.prefix)
        shutil.rmtree(self.run_dir, ignore_errors=True)


def _remove(*paths):
    for path in paths:
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path, ignore_errors=True)
        elif os.path.lexists(path):
            os.unlink(path)


def test_a_lock_file_planted_by_another_user_cannot_get_a_live_engines_run_dir_removed():
    # The neighbour names the victim's live run dir (its name, device and inode are visible to
    # all in /tmp) in a lock file nobody holds: a "dead engine" whose run dir is the victim's.
    with _LiveEngine() as victim:
        planted = _plant_lock(f"dfuse_{dead_pid()}_{secrets.token_hex(4)}_", victim.run_dir, NOBODY)
        try:
            sweep_stale_segments()  # the victim's next engine starts
            assert os.path.isdir(victim.run_dir), "a live engine's run dir was removed"
            assert os.path.exists(planted)  # another user's file: not ours to remove either
        finally:
            _remove(planted)


def test_a_dead_lock_naming_a_live_engines_run_dir_does_not_get_it_removed():
    # Even a lock file of this user: a run dir a live engine's lock names is never removed.
    with _LiveEngine() as live:
        prefix = f"dfuse_{dead_pid()}_{secrets.token_hex(4)}_"
        planted = _plant_lock(prefix, live.run_dir, os.geteuid(), 0o600)
        try:
            sweep_stale_segments()
            assert os.path.isdir(live.run_dir), "a live engine's run dir was removed"
            assert not os.path.exists(planted)  # the dead prefix itself is swept
        finally:
            _remove(planted)


def test_the_sweep_skips_what_it_cannot_or_should_not_remove():
    dead = dead_pid()
    directory = _shm(f"dfuse_{dead}_x")  # IsADirectoryError once
    directory_with_token = _shm(f"dfuse_{dead}_{secrets.token_hex(4)}_w0")
    theirs = [_shm(f"dfuse_{dead}_y"), _shm(f"dfuse_{dead}_{secrets.token_hex(4)}_w0")]
    huge_pid = _shm("dfuse_99999999999999999999_z")  # OverflowError in os.kill once
    ours = _shm(f"dfuse_{dead}_{secrets.token_hex(4)}_w0")
    try:
        os.mkdir(directory)
        os.mkdir(directory_with_token)
        for path in theirs + [huge_pid, ours]:
            open(path, "x").close()
        for path in theirs:
            os.chown(path, NOBODY, NOBODY)
        swept = sweep_stale_segments()
        assert os.path.isdir(directory) and os.path.isdir(directory_with_token)
        assert all(os.path.exists(path) for path in theirs), "another user's files were removed"
        assert not os.path.exists(ours) and os.path.basename(ours) in swept  # a dead engine's, ours
        assert not os.path.exists(huge_pid)
    finally:
        _remove(directory, directory_with_token, *theirs, huge_pid, ours)

