"""Helpers for tests that check processes, shared memory and files they hold (imported by basename)."""

import os
import time

from dfuse.engine.transport.shm_files import pid_running as alive  # noqa: F401  (the engine's own: a zombie counts as gone)


def engine_segments(engine_pid: int) -> list[str]:
    return sorted(n for n in os.listdir("/dev/shm") if n.startswith(f"dfuse_{engine_pid}_"))


def wait_until(condition, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return condition()


def children_of(pid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                        found.append(int(entry))
            except (OSError, ValueError, IndexError):  # gone (or reaped mid-read), or not ours to read
                pass
    return found


def cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def thread_cpus(pid: int) -> dict[int, str]:
    """Each thread of `pid` -> the CPUs it may run on (its Cpus_allowed_list, e.g. "0-3,6")."""
    allowed = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{tid}/status") as status:
            line = next(line for line in status if line.startswith("Cpus_allowed_list:"))
        allowed[int(tid)] = line.split(":", 1)[1].strip()
    return allowed


def qos_files_open(path: str | None = None) -> int:
    """How many copies of `path` this process holds open; by default its CPU latency requests
    (each is an open /dev/cpu_dma_latency: engine/cpu_wake.py)."""
    from dfuse.engine.cpu_wake import QOS_PATH

    count = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            count += os.readlink(f"/proc/self/fd/{fd}") == (path or QOS_PATH)
        except OSError:  # e.g. the fd listdir itself used, closed meanwhile
            pass
    return count


def cpu_latency_request_allowed() -> bool:
    """Whether this process may hold a CPU latency request here (a device node root can see may
    still be refused by a container's device rules: ask, as the engine does)."""
    from dfuse.engine.cpu_wake import CpuWakeHold

    hold = CpuWakeHold.acquire(0)
    if hold is None:
        return False
    hold.release()
    return True


HOLD_LOCK = """
import sys
from dfuse.engine.transport.shm_files import EngineLock
lock = EngineLock.acquire(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else None)
print("locked", flush=True)
sys.stdin.read()  # hold it until the test closes our stdin (or kills us)
"""


class LockHolder:
    """A live process holding `prefix`'s engine lock, naming `run_dir` (an engine, as far as a
    start-up sweep can tell)."""

    def __init__(self, prefix, run_dir=None):
        import subprocess
        import sys

        args = [sys.executable, "-c", HOLD_LOCK, prefix] + ([run_dir] if run_dir else [])
        self.process = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert self.process.stdout.readline().strip() == "locked"

    def die(self):
        self.process.kill()
        self.process.wait(30)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.die()


def dead_pid() -> int:
    """The pid of a process that has exited (skips the test in the rare case it was reused at once)."""
    import subprocess
    import sys

    import pytest

    from dfuse.engine.transport import shm_files

    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait(timeout=30)
    if shm_files._pid_alive(child.pid):  # pragma: no cover - reused at once
        pytest.skip(f"pid {child.pid} was reused")
    return child.pid


class Heartbeat:
    """A child process's proof of life for `run_watched`: what it has done so far, and how long
    it may now go without doing more. The child measures that on its own engine (the machine's
    pace: bench/chaos.py, Pace), so a slow or busy machine is not mistaken for a hung engine."""

    def __init__(self, path):
        self.path = str(path)
        self.last = None

    def __call__(self, done: str, quiet_limit_s: float) -> None:
        import json

        beat = json.dumps({"done": done, "quiet_limit_s": quiet_limit_s})
        if beat == self.last:
            return
        with open(self.path + ".tmp", "w") as f:
            f.write(beat)
        os.replace(self.path + ".tmp", self.path)  # the watcher never reads half a beat
        self.last = beat


def run_watched(script_path, args: list[str], heartbeat_path, first_quiet_limit_s: float):
    """Run the Python script at `script_path` in a child until it exits, and kill it once it has
    gone longer without a new heartbeat (see Heartbeat) than its last one allowed, or
    `first_quiet_limit_s` before its first. Returns (exit code or None if killed, stdout, stderr,
    why it was killed). The child can import this module (Heartbeat)."""
    import json
    import pathlib
    import subprocess
    import sys

    heartbeat_path = pathlib.Path(heartbeat_path)
    folder = heartbeat_path.parent
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [os.path.dirname(__file__),
                                                                    os.environ.get("PYTHONPATH")])))
    # Files, not pipes: a child that logs more than a pipe holds would block while it is polled.
    with open(folder / "child.out", "w") as out, open(folder / "child.err", "w") as err:
        proc = subprocess.Popen([sys.executable, str(script_path), *args], stdout=out, stderr=err, env=env)
        last_beat, quiet_limit_s, changed = None, first_quiet_limit_s, time.monotonic()
        killed = None
        while proc.poll() is None:
            try:
                beat = heartbeat_path.read_text()
            except FileNotFoundError:
                beat = None
            if beat != last_beat:
                last_beat, changed = beat, time.monotonic()
                quiet_limit_s = json.loads(beat)["quiet_limit_s"]
            elif time.monotonic() - changed > quiet_limit_s:
                done = json.loads(beat)["done"] if beat else "nothing yet"
                killed = f"no progress for {quiet_limit_s:.1f} s (the limit it measured; done: {done})"
                proc.kill()
                break
            time.sleep(0.2)
        code = proc.wait()
    return (None if killed else code), (folder / "child.out").read_text(), (folder / "child.err").read_text(), killed


def run_sweep(*args: str, timeout: float = 240) -> tuple[int, bytes, int]:
    """`dfuse bench sweep ARGS` in a child process: (exit code, its stdout and stderr as bytes
    (text mode would turn a progress bar's carriage returns into newlines), its pid). Killed
    past `timeout`."""
    import subprocess
    import sys

    command = [sys.executable, "-c", "from dfuse.cli import main; main()", "bench", "sweep", *args]
    print("command", " ".join(command))
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        raw, _ = process.communicate(timeout=timeout)
    finally:
        if process.poll() is None:
            process.kill()
    return process.returncode, raw, process.pid


def assert_every_request_served(doc: dict, modes: list[str], rate: str) -> list[dict]:
    """A sweep's JSON: one point per mode at `rate`, each completing every request it was sent
    (none failed, none left unfinished), its allocation sampled. Returns the points."""
    points = doc["points"]
    assert [(p["mode"], p["rate_rps"]) for p in points] == [(m, float(rate)) for m in modes]
    submitted = doc["trace"]["requests_per_rate"][rate]
    assert submitted > 0
    for point in points:
        assert point["submitted"] == point["completed"] == submitted, point["errors"]
        assert point["failed"] == point["unfinished"] == 0
        assert point["allocation"]["t_s"], "the allocation was sampled"
    return points
