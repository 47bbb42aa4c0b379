"""Who may remove an engine's shared memory, and when: the liveness lock (good across PID
namespaces), the start-up sweep (segments and run dirs of dead engines only), a full /dev/shm
(transport pools fail clearly, the weight cache does without), and the janitor.

An engine "in another PID namespace" is simulated by a prefix whose pid is dead here while its
lock file is held by a live helper process; a dead engine whose pid number is alive here, by an
unheld lock file under a live pid.
"""

import errno
import json
import logging
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import pytest

from dfuse.engine.transport import shm_files
from dfuse.engine.transport.janitor import Janitor
from dfuse.engine.transport.shm import Segment, ShmFull
from dfuse.engine.transport.slots import SlotPool
from dfuse.engine.transport.shm_files import (
    EngineLock,
    list_segments,
    new_segment_prefix,
    sweep_stale_segments,
    unlink_segments,
)
from process_utils import LockHolder, alive, cmdline, dead_pid, wait_until

pytestmark = pytest.mark.skipif(not os.path.isdir(shm_files.SHM_DIR), reason="needs /dev/shm")



def _files(prefix):
    """Everything in /dev/shm named with `prefix`, the lock file included."""
    return sorted(n for n in os.listdir(shm_files.SHM_DIR) if n.startswith(prefix))


def _prefix(pid: int) -> str:
    return f"{shm_files.PREFIX}{pid}_{secrets.token_hex(4)}_"




@pytest.fixture
def prefixes():
    made = []
    yield made
    for prefix in made:
        unlink_segments(prefix)


# --- the liveness lock --------------------------------------------------------------------------
def test_a_held_lock_keeps_a_prefix_whose_pid_looks_dead_and_stale_ones_go(prefixes):
    pid = dead_pid()
    other_namespace, stale = _prefix(pid), _prefix(pid)
    prefixes += [other_namespace, stale]
    with LockHolder(other_namespace) as engine:
        Segment(other_namespace + "w0", 4096, create=True)
        Segment(other_namespace + "wt_vae.float32", 4096, create=True)
        Segment(stale + "w0", 4096, create=True)  # no lock file: only the (dead) pid can tell
        swept = sweep_stale_segments()
        assert _files(other_namespace) == [other_namespace + n for n in ("lock", "w0", "wt_vae.float32")]
        assert _files(stale) == [] and stale + "w0" in swept
        engine.die()  # now that engine is gone: its lock can be taken, everything goes, lock last
        swept = sweep_stale_segments()
    assert _files(other_namespace) == []
    assert swept.index(other_namespace + "lock") > swept.index(other_namespace + "wt_vae.float32")  # lock last


def test_a_lock_held_in_this_process_keeps_its_prefix(prefixes):
    prefix = new_segment_prefix()  # our pid, which lives; the lock decides anyway
    prefixes.append(prefix)
    lock = EngineLock.acquire(prefix)
    try:
        Segment(prefix + "w0", 4096, create=True)
        sweep_stale_segments()
        assert _files(prefix) == [prefix + "lock", prefix + "w0"]
    finally:
        unlink_segments(prefix)
        lock.release()
    assert _files(prefix) == []


def test_an_unheld_lock_means_dead_even_when_the_pid_number_lives_here(prefixes):
    # A dead engine from another PID namespace whose pid number is a live process here (us).
    prefix = _prefix(os.getpid())
    prefixes.append(prefix)
    fd = os.open(os.path.join(shm_files.SHM_DIR, prefix + "lock"), os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
    os.close(fd)  # nobody holds it
    Segment(prefix + "w0", 4096, create=True)
    assert set(sweep_stale_segments()) >= {prefix + "w0", prefix + "lock"}
    assert _files(prefix) == []


def test_the_lock_file_is_private_never_inherited_and_not_a_segment(prefixes):
    prefix = new_segment_prefix()
    prefixes.append(prefix)
    lock = EngineLock.acquire(prefix)
    try:
        info = os.stat(os.path.join(shm_files.SHM_DIR, prefix + "lock"))
        assert oct(info.st_mode & 0o777) == oct(0o600) and info.st_uid == os.getuid()
        assert not os.get_inheritable(lock._fd)
        # A child (spawned with pass_fds=() or not) cannot hold it: a second open file fails to lock.
        held = subprocess.run([sys.executable, "-c", (
            "import fcntl, os, sys; fd = os.open(sys.argv[1], os.O_RDONLY)\n"
            "try: fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)\n"
            "except BlockingIOError: sys.exit(3)"), os.path.join(shm_files.SHM_DIR, prefix + "lock")], close_fds=False)
        assert held.returncode == 3
        Segment(prefix + "w0", 4096, create=True)
        assert list_segments(prefix) == [prefix + "w0"]  # segments only
        with pytest.raises(FileExistsError):
            EngineLock.acquire(prefix)  # one engine per prefix
        assert unlink_segments(prefix) == [prefix + "w0", prefix + "lock"]  # lock last
    finally:
        lock.release()
        lock.release()  # idempotent
    assert _files(prefix) == []


def test_a_child_forked_by_the_engine_does_not_keep_its_lock(prefixes):
    prefix = new_segment_prefix()
    prefixes.append(prefix)
    lock = EngineLock.acquire(prefix)
    read_end, write_end = os.pipe()
    started_read, started_write = os.pipe()
    child = os.fork()
    if child == 0:  # e.g. a bare fork in the application that embeds the engine
        try:
            os.close(write_end)
            os.write(started_write, b"x")  # at-fork hooks have run by now
            os.read(read_end, 1)
        finally:
            os._exit(0)
    os.close(read_end)
    os.close(started_write)
    os.read(started_read, 1)
    os.close(started_read)
    try:
        fd, lock._fd = lock._fd, None
        os.close(fd)  # the engine process "dies" (its fd closes) while the forked child lives on
        with shm_files._dead_engine(prefix) as (dead, _):
            assert dead
    finally:
        os.close(write_end)
        os.waitpid(child, 0)


@pytest.mark.parametrize("prefix", ["dfuse_", "dfuse_12_", "dfuse_x_ab_", "dfuse_12_ab_/x"])
def test_locks_and_janitors_only_take_whole_engine_prefixes(prefix):
    with pytest.raises(ValueError):
        EngineLock.acquire(prefix)
    with pytest.raises(ValueError):
        Janitor.start(prefix, os.path.join(tempfile.gettempdir(), "dfuse-x"))


# --- run dirs ----------------------------------------------------------------------------------
def test_the_sweep_removes_a_dead_engines_run_dir_and_nothing_else(prefixes):
    dead, live = _prefix(dead_pid()), new_segment_prefix()
    prefixes += [dead, live]
    dead_dir, live_dir, plain_dir = (tempfile.mkdtemp(prefix="dfuse-") for _ in range(3))
    try:
        with LockHolder(live, live_dir), LockHolder(dead, dead_dir) as engine:
            Segment(dead + "w0", 4096, create=True)
            with open(os.path.join(dead_dir, "results"), "w"):
                pass
            described = json.loads(open(os.path.join(shm_files.SHM_DIR, dead + "lock")).read())
            assert described["run_dir"] == dead_dir
            engine.die()
            sweep_stale_segments()
            assert not os.path.exists(dead_dir) and _files(dead) == []
            assert os.path.isdir(live_dir) and _files(live) == [live + "lock"]
            assert os.path.isdir(plain_dir)  # a dfuse- dir no lock names: not ours to judge
    finally:
        for path in (dead_dir, live_dir, plain_dir):
            shutil.rmtree(path, ignore_errors=True)


@pytest.mark.parametrize("where", ["other inode", "not in the temp dir", "not named dfuse-"])
def test_the_sweep_only_removes_the_very_run_dir_a_dead_engine_made(where, prefixes, tmp_path):
    # A dead engine's (unheld) lock file that names a directory the sweep must not touch.
    prefix = _prefix(dead_pid())
    prefixes.append(prefix)
    directory = {"other inode": None, "not in the temp dir": str(tmp_path / "dfuse-x"),
                 "not named dfuse-": tempfile.mkdtemp(prefix="other-")}[where] or tempfile.mkdtemp(prefix="dfuse-")
    os.makedirs(directory, exist_ok=True)
    try:
        info = os.stat(directory)
        ino = info.st_ino + (1 if where == "other inode" else 0)  # e.g. a namesake in another mount namespace
        with open(os.path.join(shm_files.SHM_DIR, prefix + "lock"), "x") as f:
            json.dump({"run_dir": directory, "dev": info.st_dev, "ino": ino}, f)
        sweep_stale_segments()
        assert _files(prefix) == [] and os.path.isdir(directory)
    finally:
        shutil.rmtree(directory, ignore_errors=True)


# --- a full /dev/shm -----------------------------------------------------------------------------
@pytest.fixture
def full_dev_shm(monkeypatch):
    """posix_fallocate fails with ENOSPC, as on a full /dev/shm, for names containing `which`."""
    real = os.posix_fallocate

    def patch(which: str):
        def fallocate(fd, offset, length):
            if which in os.path.basename(os.readlink(f"/proc/self/fd/{fd}")):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return real(fd, offset, length)

        monkeypatch.setattr(os, "posix_fallocate", fallocate)

    return patch


def test_a_pool_that_does_not_fit_says_which_setting_to_lower(full_dev_shm, prefixes):
    prefix = new_segment_prefix()
    prefixes.append(prefix)
    full_dev_shm("_w0")
    with pytest.raises(ShmFull, match=r"^transport: cannot reserve 1 MiB in /dev/shm .*transport.slot_mib") as info:
        SlotPool.create_host(prefix + "w0", 1 << 18, 4)
    assert isinstance(info.value, ValueError) and isinstance(info.value, OSError)
    assert info.value.errno == errno.ENOSPC
    assert _files(prefix) == []  # no half-made segment


@pytest.mark.parametrize("tmpfile", [True, False], ids=["O_TMPFILE", "no O_TMPFILE"])
def test_an_engine_lock_on_a_full_dev_shm_says_so_and_leaves_no_file(tmpfile, monkeypatch, prefixes):
    # A full tmpfs still makes the (empty) file, then refuses its first write.
    prefix = new_segment_prefix()
    prefixes.append(prefix)
    real = os.write

    def write(fd, data):
        if os.readlink(f"/proc/self/fd/{fd}").startswith(shm_files.SHM_DIR + "/"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(fd, data)

    monkeypatch.setattr(os, "write", write)
    if not tmpfile:
        monkeypatch.delattr(os, "O_TMPFILE", raising=False)
    run_dir = tempfile.mkdtemp(prefix="dfuse-")
    try:
        with pytest.raises(ShmFull, match=r"lock file .*/dev/shm is full .*give the machine more shared memory"):
            EngineLock.acquire(prefix, run_dir)
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)
    assert _files(prefix) == []


def test_the_weight_cache_loads_from_disk_when_dev_shm_is_full(full_dev_shm, tmp_path, caplog):
    import torch

    from dfuse.stages import weights
    from dfuse.engine.models.tiny import tiny_model_path
    from dfuse.engine.protocol import WorkerSpec
    from dfuse.stages.worker import load_stage

    torch.set_num_threads(1)
    prefix = new_segment_prefix()
    spec = WorkerSpec(0, "decoder", str(tiny_model_path("tiny-sd3")), "cpu", "float32", 1, "", "", os.getpid(),
                      prefix, str(tmp_path))
    full_dev_shm("_wt_")
    weights.attach(prefix, str(tmp_path))
    try:
        with caplog.at_level(logging.WARNING, logger="dfuse.weights"):
            first = load_stage(spec, "decoder")
            second = load_stage(spec, "decoder")  # nothing in the cache: from disk again
        assert "no room in shared memory for vae" in caplog.text and "slot_mib" not in caplog.text
        assert _files(prefix) == [] and not (tmp_path / "weights").exists()
        a, b = weights._modules(first.model)["vae"].state_dict(), weights._modules(second.model)["vae"].state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    finally:
        weights._cache = None
        unlink_segments(prefix)


# --- the janitor ---------------------------------------------------------------------------------
def test_the_janitor_imports_nothing_heavy():
    code = ("import sys, dfuse.engine.transport.janitor\n"
            "heavy = [m for m in ('torch', 'numpy', 'zmq', 'diffusers', 'transformers') if m in sys.modules]\n"
            "assert not heavy, heavy")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=tempfile.gettempdir())


@pytest.fixture
def engine_files(prefixes):
    """A prefix with a lock, two segments and a run dir, as an engine has them."""
    prefix = new_segment_prefix()
    prefixes.append(prefix)
    run_dir = tempfile.mkdtemp(prefix="dfuse-")
    lock = EngineLock.acquire(prefix, run_dir)
    Segment(prefix + "w0", 4096, create=True)
    Segment(prefix + "wt_vae.float32", 4096, create=True)
    os.mkdir(os.path.join(run_dir, "weights"))
    yield prefix, run_dir
    lock.release()
    shutil.rmtree(run_dir, ignore_errors=True)


def test_the_janitor_cleans_up_at_eof_and_ignores_termination_signals(engine_files):
    prefix, run_dir = engine_files
    janitor = Janitor.start(prefix, run_dir)
    time.sleep(0.5)  # let it install its signal dispositions
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        os.kill(janitor.pid, sig)
    time.sleep(0.3)
    assert janitor.process.poll() is None, "a group SIGTERM would have left nobody to clean up"
    assert _files(prefix) and os.path.isdir(run_dir)  # nothing happens while the engine lives
    janitor.close()
    assert janitor.process.returncode == 0
    assert _files(prefix) == [] and not os.path.exists(run_dir)


def test_the_janitor_of_a_killed_engine_cleans_up_and_exits(engine_files):
    prefix, run_dir = engine_files
    # The "engine": a process that starts the janitor and is then killed with SIGKILL.
    engine = subprocess.Popen([sys.executable, "-c", (
        "import sys, time\n"
        "from dfuse.engine.transport.janitor import Janitor\n"
        "print(Janitor.start(sys.argv[1], sys.argv[2]).pid, flush=True)\n"
        "time.sleep(600)"), prefix, run_dir], stdout=subprocess.PIPE, text=True)
    try:
        janitor_pid = int(engine.stdout.readline())
        assert alive(janitor_pid) and os.getsid(janitor_pid) != os.getsid(engine.pid)
        engine.kill()
        engine.wait(30)
        assert wait_until(lambda: _files(prefix) == [] and not os.path.exists(run_dir), 10)
        assert wait_until(lambda: not alive(janitor_pid), 10), "the janitor outlived its cleanup"
    finally:
        engine.kill()


def test_the_janitor_cleans_up_after_the_workers_the_engine_did_not_reap(engine_files):
    """What CUDA IPC leaves in /dev/shm for a worker (unlinked by the engine when it reaps one)
    is the janitor's to unlink if the engine died first; never for a worker the engine reaped,
    whose pid may belong to another process by then, nor a file older than the worker."""
    prefix, run_dir = engine_files
    unreaped, reaped, reused = dead_pid(), dead_pid(), dead_pid()
    started = time.time() - 60
    planted = {pid: [os.path.join(shm_files.SHM_DIR, f"cuda.shm.0.{pid:x}.1"), os.path.join(shm_files.SHM_DIR, f"torch_{pid}_7_0")]
               for pid in (unreaped, reaped, reused)}
    every = [path for paths in planted.values() for path in paths]
    try:
        for path in every:
            open(path, "wb").close()
        for path in planted[reused]:  # left by an earlier process that had the worker's pid
            os.utime(path, (started - 3600, started - 3600))
        janitor = Janitor.start(prefix, run_dir)
        for pid in (unreaped, reaped, reused):
            janitor.watch(pid, started)
        janitor.forget(reaped)
        janitor.close()
        assert janitor.process.returncode == 0
        assert not any(os.path.exists(p) for p in planted[unreaped])
        assert all(os.path.exists(p) for p in planted[reaped] + planted[reused])
    finally:
        for path in every:
            if os.path.exists(path):
                os.unlink(path)


def test_the_janitors_command_line_names_no_prefix_or_run_dir():
    prefix, run_dir = new_segment_prefix(), tempfile.mkdtemp(prefix="dfuse-")
    janitor = Janitor.start(prefix, run_dir)
    try:
        assert wait_until(lambda: "dfuse.engine.transport.janitor" in cmdline(janitor.pid), 10)
        seen = cmdline(janitor.pid)
        assert prefix not in seen and run_dir not in seen
    finally:
        janitor.close()
    assert janitor.process.returncode == 0
    assert not os.path.exists(run_dir)  # it still learnt what to clean up
