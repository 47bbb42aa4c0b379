"""The start-up lines a person waiting on the engine reads (engine/startup.py), on a fake clock."""

import logging

import pytest

from dfuse.engine import startup
from dfuse.engine.protocol import Ready
from dfuse.engine.startup import REMIND_S, StartupProgress
from dfuse.engine.state import Worker


class _Clock:
    now = 100.0

    def __call__(self):
        return self.now


@pytest.fixture
def said(monkeypatch):
    """The lines logged, as "logger: message"; the clock is `said.clock`."""
    clock, lines = _Clock(), []
    monkeypatch.setattr(startup.time, "monotonic", clock)

    class Catch(logging.Handler):
        def emit(self, record):
            lines.append(f"{record.name}: {record.getMessage()}")

    handler = Catch(logging.INFO)
    monkeypatch.setattr(startup.log, "propagate", False)  # its records are caught once, here
    for logger in (startup.log, startup.engine_log):
        monkeypatch.setattr(logger, "level", logging.INFO)
        logger.addHandler(handler)
    yield lines, clock
    for logger in (startup.log, startup.engine_log):
        logger.removeHandler(handler)


def _workers():
    return {i: Worker(i, stage, device, pool=None) for i, (stage, device) in
            enumerate([("encoder", "cpu:0"), ("dit", "cpu:1"), ("decoder", "cpu:0")])}


def _ready(progress, workers, worker_id):
    workers[worker_id].ready = True
    progress.ready(workers[worker_id], Ready(worker_id, 4000 + worker_id, 0.5))


def test_the_workers_then_each_ready_one_then_only_engine_events(said):
    lines, clock = said
    workers = _workers()
    progress = StartupProgress(workers)
    progress.starting()
    clock.now += 2.0
    _ready(progress, workers, 1)
    clock.now += 1.0
    _ready(progress, workers, 0)
    _ready(progress, workers, 2)
    workers[1].ready = False  # died later; its replacement says READY
    _ready(progress, workers, 1)
    assert lines == [
        "dfuse.engine.startup: Starting stage workers: encoder worker 0 on cpu:0, dit worker 1 on cpu:1, "
        "decoder worker 2 on cpu:0",
        "dfuse.engine.startup: dit worker 1 on cpu:1 ready in 2.0 s (1/3)",
        "dfuse.engine.startup: encoder worker 0 on cpu:0 ready in 3.0 s (2/3)",
        "dfuse.engine.startup: decoder worker 2 on cpu:0 ready in 3.0 s (3/3)",
        "dfuse.engine: dit worker 1 ready in 0.50 s (pid 4001)",  # after start-up: an engine event
    ]


def test_a_long_silence_names_the_workers_still_loading(said):
    lines, clock = said
    workers = _workers()
    progress = StartupProgress(workers)
    progress.starting()
    clock.now += REMIND_S - 1
    progress.remind()  # not yet
    _ready(progress, workers, 0)
    clock.now += REMIND_S - 1
    progress.remind()  # news came since: the silence counts from it
    clock.now += 1
    progress.remind()
    progress.remind()  # said; the next one only after another silence
    assert lines[1:] == [
        f"dfuse.engine.startup: encoder worker 0 on cpu:0 ready in {REMIND_S - 1:.1f} s (1/3)",
        f"dfuse.engine.startup: still loading after {2 * REMIND_S - 1:.0f} s: dit worker 1 on cpu:1, "
        "decoder worker 2 on cpu:0",
    ]
    _ready(progress, workers, 1)
    _ready(progress, workers, 2)
    clock.now += 10 * REMIND_S
    progress.remind()  # start-up is over: nothing more to say
    assert len(lines) == 5
