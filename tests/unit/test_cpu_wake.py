"""The CPU latency request that keeps idle CPUs quick to wake (engine/cpu_wake.py): held while
its owner runs, given back when released, paused and taken again for benchmarks, and a host
that does not allow it only costs the speed-up."""

import os
import struct

import pytest

from dfuse.engine.cpu_wake import CpuWakeHold, current_limit_us
from dfuse.engine.host_resources import HostResources

from process_utils import cpu_latency_request_allowed, qos_files_open

can_request = pytest.mark.skipif(not cpu_latency_request_allowed(), reason="no CPU latency request allowed here")


def test_a_host_that_does_not_allow_the_request_gives_none(tmp_path, caplog):
    caplog.set_level("INFO", logger="dfuse.engine")
    assert CpuWakeHold.acquire(0, path=str(tmp_path / "no-such-file")) is None
    assert "idle CPUs keep the OS's wake-up latency" in caplog.text


def test_the_request_written_is_the_asked_latency_as_a_native_int32(tmp_path):
    """What the kernel reads: 4 bytes, a raw s32 (the value alone tells it nothing else)."""
    file = tmp_path / "qos"
    file.write_bytes(b"")
    hold = CpuWakeHold.acquire(7, path=str(file))
    assert hold is not None and hold.held
    assert file.read_bytes() == struct.pack("=i", 7)
    hold.release()


def test_a_failed_write_gives_none_and_keeps_no_file_open(caplog):
    caplog.set_level("INFO", logger="dfuse.engine")
    before = len(os.listdir("/proc/self/fd"))
    assert CpuWakeHold.acquire(0, path="/dev/full") is None  # every write to it fails (ENOSPC)
    assert "writing /dev/full failed" in caplog.text
    assert len(os.listdir("/proc/self/fd")) == before


def test_a_forked_child_does_not_keep_the_request(tmp_path):
    """The kernel drops the request with the last copy of the file: a child forked while it is
    held (a DataLoader worker beside the engine) closes its copy at once."""
    file = tmp_path / "qos"
    file.write_bytes(b"")
    hold = CpuWakeHold.acquire(0, path=str(file))
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report whether it still holds the file, then leave
        os.write(write, b"1" if qos_files_open(str(file)) else b"0")
        os._exit(0)
    os.close(write)
    answer = os.read(read, 1)
    os.waitpid(pid, 0)
    os.close(read)
    assert answer == b"0", "a forked child kept the CPU latency request"
    assert hold.held  # the parent still does
    hold.release()


@can_request
def test_the_request_is_held_until_released():
    before = qos_files_open()
    hold = CpuWakeHold.acquire(0)
    assert hold is not None and hold.held
    assert qos_files_open() == before + 1
    assert current_limit_us() == 0  # the lowest request wins: ours
    hold.release()
    hold.release()  # idempotent
    assert not hold.held and qos_files_open() == before


@can_request
def test_paused_gives_the_request_back_and_takes_it_again():
    before = qos_files_open()
    hold = CpuWakeHold.acquire(0)
    with hold.paused():
        assert qos_files_open() == before and not hold.held
    assert hold.held and qos_files_open() == before + 1 and current_limit_us() == 0
    hold.release()
    with hold.paused():  # a released hold stays released
        pass
    assert not hold.held and qos_files_open() == before


@can_request
def test_host_resources_hold_it_only_when_asked_and_give_it_back_on_release():
    before = qos_files_open()
    without = HostResources(cpu_wake_latency_us=None)
    assert without.cpu_wake is None and qos_files_open() == before
    without.release()
    host = HostResources(cpu_wake_latency_us=0)
    assert host.cpu_wake is not None and qos_files_open() == before + 1
    host.release()
    assert qos_files_open() == before
