"""`dfuse bench handoff` runs every mechanism between real processes and leaves nothing behind: the
dfuse hop reads the value the producer wrote on every hop (the run fails otherwise), and each
mechanism reports its samples. No timing is asserted: speeds live in bench/results/.
A bench killed with SIGKILL in the middle of a hop leaves nothing behind either."""

import json
import os
import subprocess
import sys

import pytest
from click.testing import CliRunner

from dfuse.bench.handoff.command import MECHANISMS
from dfuse.bench.handoff.process_pair import run_pair
from dfuse.engine.cpu_affinity import physical_cores, plan
from dfuse.engine.cpu_wake import current_limit_us
from dfuse.engine.host_resources import HostResources
from dfuse.cli import main
from process_utils import (alive, children_of, cmdline, cpu_latency_request_allowed, engine_segments, qos_files_open,
                           wait_until)


def test_handoff_runs_every_mechanism_and_leaves_no_segment(tmp_path):
    before = set(engine_segments(os.getpid()))  # ours only: other engines may run beside the test
    requests_before = qos_files_open()
    os_limit = current_limit_us() if requests_before == 0 else None  # None: a request of ours is in it
    out = tmp_path / "handoff.json"
    result = CliRunner().invoke(main, ["bench", "handoff", "--sizes", "64KiB", "--out", str(out)])
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    # As an engine runs: with the CPU latency request where the host allows it, and then beside
    # it the same hop without (dfuse-os-idle); the request ends with the bench.
    allowed = cpu_latency_request_allowed()
    assert report["cpu_wake_latency_us"] == (0 if allowed else None)
    expected = set(MECHANISMS) - (set() if allowed else {"dfuse-os-idle"})
    # As an engine pins two 1-thread CPU workers: each on a core of its own, where two cores are;
    # beside it the same hop placed by the OS (dfuse-unpinned).
    cores = sorted(os.sched_getaffinity(0))
    planned = plan([1, 1], physical_cores(cores))  # the engine's plan (tests/unit/test_cpu_affinity.py)
    assert report["pinned_cpus"] == ([list(block) for block in planned] if planned else None)
    expected -= set() if planned else {"dfuse-unpinned"}
    for row in report["results"]:  # where the consumer really ran, as the kernel says
        if row["mechanism"] == "dfuse-unpinned":
            assert row["consumer_cpus"] == cores, row
        elif row["mechanism"].startswith("dfuse") or row["mechanism"] == "zmq-floor":
            assert row["consumer_cpus"] == (list(planned[0]) if planned else cores), row
    assert {r["mechanism"] for r in report["results"]} == expected
    for row in report["results"]:  # given back, the kernel's limit is what it was without the bench
        if row["mechanism"] == "dfuse-os-idle" and os_limit is not None:
            assert row["cpu_latency_limit_us"] == os_limit, row
    assert qos_files_open() == requests_before
    for row in report["results"]:
        assert row["bytes"] == 64 * 1024
        assert row["samples"] > 0 and 0 < row["p50_us"] <= row["p99_us"], row
        if row["mechanism"].startswith("dfuse"):  # the message's arrival is a part of the hop
            assert 0 < row["arrive_p50_us"] <= row["p50_us"], row
    assert set(engine_segments(os.getpid())) <= before



def test_handoff_over_tcp_runs_without_ray_and_says_why_the_ray_column_is_skipped(tmp_path):
    before = set(engine_segments(os.getpid()))
    out = tmp_path / "handoff-tcp.json"
    result = CliRunner().invoke(main, ["bench", "handoff", "--link", "tcp", "--sizes", "64KiB", "--out", str(out)])
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    assert report["link"] == "tcp"
    # Every hop read the value its producer wrote (the run fails otherwise); Ray needs a cluster.
    assert {r["mechanism"] for r in report["results"]} == {"dfuse-tcp", "dfuse-tcp-hmac-payload", "tcp-floor", "pickle-tcp"}
    for row in report["results"]:
        assert row["bytes"] == 64 * 1024
        assert row["samples"] > 0 and 0 < row["p50_us"] <= row["p99_us"], row
    (skipped,) = report["skipped"]
    assert skipped["mechanism"] == "ray-object-ref" and "--ray-address" in skipped["reason"]
    assert "skipped ray-object-ref: needs --ray-address" in result.output
    (ratios,) = report["ratios"]
    assert ratios["ray-object-ref_over_dfuse-tcp"] is None and ratios["pickle-tcp_over_dfuse-tcp"] > 0
    assert ratios["tcp-floor_over_dfuse-tcp"] > 0  # the link's own cost, beside dfuse's
    assert report["target"]["met"] is None and report["target"]["ray_over_tcp_floor"] == {}  # not measured, never claimed
    assert set(engine_segments(os.getpid())) <= before

def test_a_bench_killed_mid_hop_leaves_no_segment_run_dir_or_process(tmp_path):
    log = tmp_path / "bench.log"
    with open(log, "wb") as out:
        bench = subprocess.Popen([sys.executable, "-m", "dfuse.cli", "bench", "handoff", "--sizes", "16MiB",
                                  "--out", str(tmp_path / "handoff.json")], stdout=out, stderr=subprocess.STDOUT)
    try:
        # Mid-hop: a child has mapped the hop's pool, which only a producer past its start-up (its
        # consumer bound before it was spawned) or a consumer that got a hop does.
        assert wait_until(lambda: _hop_mapped(bench.pid), 120), f"no hop started: {log.read_text()[-2000:]}"
        (lock,) = [n for n in engine_segments(bench.pid) if n.endswith("_lock")]
        with open(os.path.join("/dev/shm", lock)) as f:
            run_dir = json.load(f)["run_dir"]
        children = children_of(bench.pid)

        bench.kill()
        bench.wait(30)
        assert wait_until(lambda: engine_segments(bench.pid) == [], 15), f"left in /dev/shm: {engine_segments(bench.pid)}"
        assert wait_until(lambda: not os.path.exists(run_dir), 15), f"run dir left: {run_dir}"
        assert wait_until(lambda: not any(alive(p) for p in children), 30), "a bench process outlived the bench"
    finally:
        if bench.poll() is None:
            bench.kill()
            bench.wait(30)


def _dies_before_reporting(*args) -> None:
    os._exit(3)


@pytest.mark.timeout(120)
def test_a_handoff_process_that_dies_fails_the_bench_instead_of_hanging_it():
    host = HostResources()
    try:
        with pytest.raises(RuntimeError, match="exit code 3"):
            run_pair(_dies_before_reporting, (), _dies_before_reporting, (), host)
    finally:
        host.release()


def _hop_mapped(pid: int) -> bool:
    for child in children_of(pid):
        if "multiprocessing.spawn" in cmdline(child):
            try:
                with open(f"/proc/{child}/maps") as f:
                    if "_hop" in f.read():
                        return True
            except OSError:  # exited meanwhile
                pass
    return False
