"""The CPU latency request that keeps idle CPUs quick to wake (engine/cpu_wake.py): held while
its owner runs, given back when released, paused and taken again for benchmarks, and a host
that does not allow it only costs the speed-up."""

import os

import pytest

from dfuse.engine.cpu_wake import QOS_PATH, CpuWakeHold, current_limit_us
from dfuse.engine.host_resources import HostResources

from process_utils import qos_files_open

can_request = pytest.mark.skipif(not os.access(QOS_PATH, os.W_OK), reason=f"{QOS_PATH} is not writable here")


def test_a_host_that_does_not_allow_the_request_gives_none(tmp_path, caplog):
    caplog.set_level("INFO", logger="dfuse.engine")
    assert CpuWakeHold.acquire(0, path=str(tmp_path / "no-such-file")) is None
    assert "idle CPUs keep the OS's wake-up latency" in caplog.text


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
    assert qos_files_open() == before


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
