"""CPU workers get cores of their own when they all fit, and only then (the plan; the pinning of
real processes is tested in tests/e2e/test_cpu_pinning.py)."""

import os

import pytest

from dfuse.engine import cpu_affinity
from dfuse.engine import worker_layout as placement
from dfuse.engine.config import EngineConfig
from dfuse.engine.worker_layout import build_workers, pin_cpu_workers
from dfuse.engine.transport.shm_files import list_segments, new_segment_prefix, unlink_segments



def _no_smt(*cpus):
    return [[cpu] for cpu in cpus]


SMT_4X2 = [[0, 4], [1, 5], [2, 6], [3, 7]]  # 4 physical cores, 2 hardware threads each (Linux's usual numbering)


def test_plan_gives_disjoint_blocks_of_the_cores_given_when_they_fit():
    assert cpu_affinity.plan([2, 1, 3], _no_smt(0, 1, 2, 3, 4, 5, 6)) == [(0, 1), (2,), (3, 4, 5)]
    # A cpuset with holes (a container's): blocks come from the cores it allows, never others.
    assert cpu_affinity.plan([1, 2], _no_smt(3, 8, 9)) == [(3,), (8, 9)]


def test_with_smt_workers_get_whole_physical_cores_when_there_are_enough():
    assert cpu_affinity.plan([1, 1], SMT_4X2) == [(0, 4), (1, 5)]
    assert cpu_affinity.plan([2, 2], SMT_4X2) == [(0, 1, 4, 5), (2, 3, 6, 7)]


def test_with_smt_and_more_threads_than_physical_cores_siblings_stay_side_by_side():
    # 6 threads, 4 physical cores: logical CPUs, so that worker 0 has 0 and its sibling 4.
    assert cpu_affinity.plan([3, 3], SMT_4X2) == [(0, 1, 4), (2, 5, 6)]
    assert cpu_affinity.plan([4, 4], SMT_4X2) == [(0, 1, 4, 5), (2, 3, 6, 7)]


def test_plan_refuses_when_the_threads_need_more_cores_than_there_are():
    assert cpu_affinity.plan([1, 1, 1], _no_smt(0, 1)) is None
    assert cpu_affinity.plan([4], _no_smt(0, 1, 2)) is None
    assert cpu_affinity.plan([5, 4], SMT_4X2) is None


def test_physical_cores_groups_this_machines_cpus_by_core():
    cpus = cpu_affinity.usable_cpus()
    cores = cpu_affinity.physical_cores(cpus)
    assert sorted(cpu for core in cores for cpu in core) == cpus  # every CPU once
    for core in cores:  # siblings as the kernel lists them
        for cpu in core:
            path = f"/sys/devices/system/cpu/cpu{cpu}/topology/thread_siblings_list"
            if os.path.exists(path):
                with open(path) as siblings:
                    listed = siblings.read().strip()
                assert set(core) <= _parse_list(listed), (core, listed)


def _parse_list(text: str) -> set[int]:
    cpus = set()
    for part in text.split(","):
        low, _, high = part.partition("-")
        cpus |= set(range(int(low), int(high or low) + 1))
    return cpus


@pytest.mark.parametrize("cpus, text", [((0, 1, 2, 3, 6), "0-3,6"), ((5,), "5"), ((7, 1, 2), "1-2,7")])
def test_describe_writes_cores_as_taskset_does(cpus, text):
    assert cpu_affinity.describe(cpus) == text


@pytest.fixture
def workers_on(monkeypatch):
    """build_workers and pin_cpu_workers as on a machine whose engine may use `cores` cores (the
    planning only: no process is pinned), with its host pools removed afterwards."""
    made = []

    def build(cores: int, **config):
        monkeypatch.setattr(placement, "usable_cpus", lambda: list(range(cores)))
        monkeypatch.setattr(placement, "physical_cores", lambda cpus: [[cpu] for cpu in cpus])
        monkeypatch.setattr("dfuse.engine.config.usable_cpus", lambda: list(range(cores)))
        prefix = new_segment_prefix()
        made.append(prefix)
        config = EngineConfig(model="synthetic:encoder=1ms,dit=1ms,decoder=1ms", **config)
        workers = build_workers(config, prefix)
        return pin_cpu_workers(config, workers), workers

    yield build
    for prefix in made:
        unlink_segments(prefix)
        assert list_segments(prefix) == []


def test_an_engine_pins_its_cpu_workers_when_their_threads_fit(workers_on):
    summary, workers = workers_on(8, instances={"encoder": 1, "dit": 2, "decoder": 1}, cpu_threads=2)
    assert [w.cpus for w in workers.values()] == [(0, 1), (2, 3), (4, 5), (6, 7)]
    assert summary == (
        "pinned, cores of their own: worker 0 on 0-1, worker 1 on 2-3, worker 2 on 4-5, worker 3 on 6-7")


def test_the_default_thread_count_divides_the_cores_and_pins(workers_on):
    summary, workers = workers_on(7)  # 3 workers x 2 threads: the seventh core is no worker's
    assert [w.cpus for w in workers.values()] == [(0, 1), (2, 3), (4, 5)]


def test_workers_that_do_not_fit_are_left_to_the_os(workers_on):
    summary, workers = workers_on(2, cpu_threads=1)  # this CI machine: 3 workers, 2 cores
    assert all(w.cpus is None for w in workers.values())
    assert summary == "left to the OS: 3 CPU workers x 1 thread(s) need more than the 2 cores here"


def test_pinning_can_be_turned_off(workers_on):
    summary, workers = workers_on(8, cpu_threads=1, pin_cpu_workers=False)
    assert all(w.cpus is None for w in workers.values())
    assert summary == "left to the OS (pin_cpu_workers=False)"


def test_an_openmp_affinity_setting_is_left_to_openmp(workers_on, monkeypatch):
    """libgomp reads OMP_PROC_BIND when torch loads, before a worker could pin itself, and would
    bind its threads by it: the user chose that placement."""
    monkeypatch.setenv("OMP_PROC_BIND", "close")
    summary, workers = workers_on(8, cpu_threads=1)
    assert all(w.cpus is None for w in workers.values())
    assert summary == "left to OpenMP's own placement (OMP_PROC_BIND is set)"


def test_pin_cpu_workers_must_be_a_bool():
    with pytest.raises(ValueError, match=r"pin_cpu_workers: must be True or False \(got 'yes'\)"):
        EngineConfig(pin_cpu_workers="yes")


def test_cores_that_are_not_ours_leave_the_worker_unpinned_with_a_warning(caplog):
    """A cpuset that shrank since the plan must not turn every restart of the worker into a crash."""
    before = os.sched_getaffinity(0)
    with caplog.at_level("WARNING", logger="dfuse.worker"):
        cpu_affinity.pin_this_process((4095,))  # no such CPU: the kernel refuses it
    assert os.sched_getaffinity(0) == before
    assert "could not pin to cores 4095" in caplog.text and "running where the OS places this worker" in caplog.text
