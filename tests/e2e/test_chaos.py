"""Crashes lose nothing: requests keep flowing while stage workers are SIGKILLed, a poison request
fails alone after bounded attempts, and nothing outlives the engine.

The engines that may hang run in a child process: a hung core thread cannot be stopped from
inside its own process, and it would spin on a core for the rest of the test session. Killing
the child is always safe (its workers see the death pipe close and clean up after it).

How long anything may take is measured on the engine under test, never fixed seconds (the
machine may be busy with other jobs): a multiple of its start-up and of a calm wave of requests
(bench/chaos.py, Pace). The windows only bound how long a hang takes to show; what is asserted
does not depend on them.
"""

import json
import os
import signal

import msgspec
import numpy as np
import pytest

from dfuse.bench.chaos import chaos_requests, start_engine
from dfuse.engine.config import EngineConfig
from dfuse.engine.state import EngineClosed, RequestFailed
from dfuse.engine.stats import EngineStats
from dfuse.engine.transport.shm_files import list_segments

from process_utils import alive, run_watched, wait_until

REQUESTS = 200
KILL_EVERY = 20
CHAOS_SEED = 7  # picks the victims: a random stage, then a random instance of it
# Every kill costs the requests in flight on its victim one attempt, and a request is in flight on
# at most one victim per kill: with at most REQUESTS // KILL_EVERY kills, one more attempt than
# that means chaos alone can never exhaust a request (only a request that is itself fatal could).
MAX_ATTEMPTS = REQUESTS // KILL_EVERY + 1
INSTANCES = {"encoder": 1, "dit": 2, "decoder": 1}
SLOTS = {stage: EngineConfig(instances=INSTANCES).slots_per_worker(stage) for stage in ("encoder", "dit", "decoder")}
# Until a child has measured its pace it starts Python and an engine, which bounds its own start-up.
FIRST_QUIET_LIMIT_S = EngineConfig().startup_timeout_s + 60

CHAOS_SCRIPT = """
import dataclasses, json, os, random, sys, time
import numpy as np
from dfuse.bench.chaos import chaos_requests, close_and_check, drive, start_engine
from dfuse.engine.config import EngineConfig
from process_utils import Heartbeat

WAVE = 20  # drive()'s

if __name__ == "__main__":
    model, requests, kill_every, seed, max_attempts, instances, out = sys.argv[1:]
    requests, kill_every, seed = int(requests), int(kill_every), int(seed)
    beat = Heartbeat(os.path.join(out, "heartbeat.json"))
    config = EngineConfig(model=model, cpu_threads=1, instances=json.loads(instances), max_attempts=int(max_attempts))
    engine, pace = start_engine(config)
    beat("started", pace.stall_s)
    # One calm wave first: how fast this machine serves right now sets the chaos pass's windows.
    calm = drive(engine, chaos_requests(WAVE), None, pace=pace, progress=lambda done: beat(f"calm {done}", pace.stall_s))
    pace = pace.with_wave_from(calm, WAVE)
    run = drive(engine, chaos_requests(requests), kill_every, random.Random(seed), pace=pace,
                progress=lambda done: beat(f"chaos {done}", pace.stall_s))
    report = {"stalled": calm.stalled or run.stalled, "calm_errors": calm.errors, "errors": run.errors,
              "pace": pace.to_dict(), "kills": [dataclasses.asdict(k) for k in run.kills],
              "pids": sorted(calm.worker_pids | run.worker_pids), "prefix": engine.host_names[0],
              "run_dir": engine.host_names[1]}
    if report["stalled"]:  # a hung engine core cannot be closed; exiting makes the workers clean up
        print(json.dumps(report), flush=True)
        os._exit(3)
    # The last victim's replacement may still be loading, and the last slot releases may trail
    # the last result by a moment.
    beat("replacements", 2 * pace.reload_s)
    deadline = time.monotonic() + pace.reload_s
    while time.monotonic() < deadline and not all(w.ready and w.free_slots == config.slots_per_worker(w.stage)
                                                  for w in engine.stats().workers):
        time.sleep(0.05)
    report["stats"] = engine.stats().to_dict()
    beat("closing", pace.stall_s)
    report.update(close_and_check(engine, set(report["pids"])))
    missing = np.zeros((64, 64, 3), np.uint8)  # stands for a failed request (reported in errors)
    np.save(os.path.join(out, "images.npy"), np.stack([i if i is not None else missing for i in run.images]))
    print(json.dumps(report), flush=True)
"""


def _run_child(script: str, args: list[str], tmp_path) -> tuple[int | None, str, str, str | None]:
    """The child runs until it exits, or is killed once it makes no progress for longer than it
    measured it may need (process_utils.run_watched)."""
    path = tmp_path / "child.py"
    path.write_text(script)
    return run_watched(path, args, tmp_path / "heartbeat.json", FIRST_QUIET_LIMIT_S)


def test_chaos_all_requests_complete_with_their_no_kill_images(model_path, reference, tmp_path):
    print(f"chaos seed {CHAOS_SEED}, requests {REQUESTS}, kill every {KILL_EVERY}, max_attempts {MAX_ATTEMPTS}")
    code, out, err, killed = _run_child(
        CHAOS_SCRIPT,
        [str(model_path), str(REQUESTS), str(KILL_EVERY), str(CHAOS_SEED), str(MAX_ATTEMPTS),
         json.dumps(INSTANCES), str(tmp_path)],
        tmp_path,
    )
    assert code is not None, f"the chaos run hung: {killed}; stderr tail:\n{err[-3000:]}"
    report = json.loads(out.strip().splitlines()[-1]) if out.strip() else {}
    assert not report.get("stalled"), f"the engine stopped serving: {report['stalled']}; kills: {report['kills']}"
    assert code == 0, f"chaos child exited with {code}; stderr tail:\n{err[-3000:]}"
    kills, stats = report["kills"], msgspec.convert(report["stats"], EngineStats)
    print("pace:", report["pace"])
    print("kills:", [(k["at_completed"], k["stage"], k["worker_id"], k["inflight"]) for k in kills])
    print("recovery_s:", stats.recovery_s)

    # All 200 complete, each with the image diffusers makes for it (a run without any kill).
    assert [e for e in report["calm_errors"] + report["errors"] if e] == []
    images = np.load(tmp_path / "images.npy")
    unequal = [i for i, request in enumerate(chaos_requests(REQUESTS))
               if not np.array_equal(images[i], reference(**request))]
    assert unequal == []

    # About one kill per 20 completions (a burst past two multiples counts once), each one seen
    # as a restart of exactly its victim, each with a recovery time.
    assert REQUESTS // KILL_EVERY // 2 <= len(kills) <= REQUESTS // KILL_EVERY
    for worker in stats.workers:
        assert worker.restarts == sum(k["worker_id"] == worker.id for k in kills), worker
        assert worker.ready and worker.free_slots == SLOTS[worker.stage], worker
    assert len(stats.recovery_s) == len(kills)
    assert stats.completed == len(report["calm_errors"]) + REQUESTS and stats.failed == 0

    # Closed: no worker (original or replacement) alive, no segment, no socket folder.
    assert report["leaked_processes"] == [] and report["leaked_segments"] == [] and not report["run_dir_left"]
    assert not any(alive(p) for p in report["pids"])
    assert list_segments(report["prefix"]) == []


# --- a request that kills every worker it reaches ----------------------------------------------

POISON_MODEL = "synthetic:encoder=1ms,dit=2ms,decoder=50ms"  # decodes are slow: innocents linger there
POISON_ATTEMPTS = 2


@pytest.fixture(scope="module")
def poison_engine():
    """The engine, and its pace (the yardstick of how long a reload or a request may take)."""
    engine, pace = start_engine(EngineConfig(model=POISON_MODEL, cpu_threads=1, max_attempts=POISON_ATTEMPTS))
    with engine:
        yield engine, pace


def _dit(engine) -> dict:
    (dit,) = [w for w in engine.stats().workers if w.stage == "dit"]
    return dit


def _pixel(future, timeout: float) -> int:
    return future.result(timeout=timeout).images[0].getpixel((0, 0))[0]


def test_poison_request_fails_after_bounded_attempts_and_the_engine_serves_on(poison_engine):
    engine, pace = poison_engine
    restarts = _dit(engine).restarts
    # Innocent requests in flight in the decoder (256 px: 800 ms each) while the poison kills DiTs.
    # The poison goes in once they are all past the DiT: a request computed just before it on the
    # same DiT is another case (test_innocent_request_dispatched_beside_a_poison_request_completes).
    denoised = set()

    def on_progress(seed):
        def record(stage, step, total):
            if step == total:
                denoised.add(seed)
        return record

    innocents = [engine.submit("innocent", seed=s, height=256, width=256, on_progress=on_progress(s))
                 for s in (11, 12, 13)]
    assert wait_until(lambda: len(denoised) == 3 and _dit(engine).inflight == 0, pace.stall_s)
    poison = engine.submit("crash:dit", seed=1)
    with pytest.raises(RequestFailed) as info:
        poison.result(timeout=POISON_ATTEMPTS * pace.stall_s)  # a reload after each death but the last
    message = str(info.value)
    print("poison error:", message)
    assert "dit" in message and f"{POISON_ATTEMPTS} times" in message
    assert [_pixel(f, pace.stall_s) for f in innocents] == [11, 12, 13]
    # Exactly max_attempts DiT deaths, each replaced; then the engine serves normal requests.
    assert wait_until(lambda: _dit(engine).ready, pace.reload_s)
    assert _dit(engine).restarts == restarts + POISON_ATTEMPTS
    assert [_pixel(engine.submit("after", seed=s), pace.stall_s) for s in (21, 22)] == [21, 22]


def test_innocent_request_dispatched_beside_a_poison_request_completes(poison_engine):
    engine, pace = poison_engine
    assert wait_until(lambda: _dit(engine).ready and _dit(engine).inflight == 0, pace.reload_s)
    # Kill the idle DiT and wait until the engine core has noticed: while its replacement loads, the
    # poison and an innocent request queue for the DiT and then reach each new DiT together.
    dit = _dit(engine)
    os.kill(dit.pid, signal.SIGKILL)
    assert wait_until(lambda: not _dit(engine).ready, pace.stall_s)
    poison = engine.submit("crash:dit", seed=2)
    innocent = engine.submit("innocent", seed=31)
    with pytest.raises(RequestFailed):
        poison.result(timeout=(POISON_ATTEMPTS + 1) * pace.stall_s)  # the reload in progress, then each death's
    assert _pixel(innocent, (POISON_ATTEMPTS + 1) * pace.stall_s) == 31


def test_a_device_fault_fails_its_request_and_replaces_the_worker(poison_engine):
    # After an illegal address or a device-side assert a CUDA context is unusable: a worker that
    # served on would fail every later request. It reports the request and exits to be replaced.
    engine, pace = poison_engine
    assert wait_until(lambda: _dit(engine).ready and _dit(engine).inflight == 0, pace.reload_s)
    before = _dit(engine)
    faulty = engine.submit("device-fault:dit", seed=4)
    with pytest.raises(RequestFailed) as info:
        faulty.result(timeout=pace.stall_s)
    assert "AcceleratorError" in str(info.value) and "dit worker restarts" in str(info.value)
    assert wait_until(lambda: _dit(engine).ready and _dit(engine).pid != before.pid, pace.reload_s)
    assert _dit(engine).restarts == before.restarts + 1
    assert _pixel(engine.submit("after a device fault", seed=41), pace.stall_s) == 41


def test_replacement_killed_while_loading_is_replaced_again():
    engine, pace = start_engine(EngineConfig(model="synthetic:encoder=1ms,dit=2ms,decoder=1ms", cpu_threads=1))
    with engine:
        dit = _dit(engine)
        os.kill(dit.pid, signal.SIGKILL)
        assert wait_until(lambda: _dit(engine).pid != dit.pid, pace.stall_s)
        replacement = _dit(engine)
        assert not replacement.ready  # it loads for seconds: still loading now
        os.kill(replacement.pid, signal.SIGKILL)
        try:
            assert _pixel(engine.submit("after two deaths", seed=3), 2 * pace.stall_s) == 3  # two reloads
        except EngineClosed as e:
            pytest.fail(f"the engine stopped: {e}")
        assert _dit(engine).restarts == 2


# --- a worker that died a moment ago --------------------------------------------------------------

LIVELOCK_SCRIPT = """
import os, signal, sys, time
from dfuse.bench.chaos import start_engine
from dfuse.engine.config import EngineConfig
from process_utils import Heartbeat

def state(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return "gone"

if __name__ == "__main__":
    beat = Heartbeat(sys.argv[1])
    engine, pace = start_engine(EngineConfig(model="synthetic:encoder=1ms,dit=1ms,decoder=1ms", cpu_threads=1,
                                             instances={"encoder": 2, "dit": 1, "decoder": 1}))
    for trial in range(3):
        beat(f"trial {trial}", pace.reload_s + pace.stall_s)  # the last trial's replacements load, then this one
        while not all(w.ready for w in engine.stats().workers):
            time.sleep(0.01)
        first, second = [w for w in engine.stats().workers if w.stage == "encoder"]
        os.kill(first.pid, signal.SIGKILL)
        # The engine core notices deaths on a health tick every 100 ms: once it has seen this one, the
        # next tick is ~100 ms away. The second encoder dies now; a request for it comes 50 ms later,
        # when it is dead (a zombie: its sockets are closed) but before the engine core can have noticed.
        while engine.stats().workers[first.id].ready:
            time.sleep(0.0005)
        tick = time.monotonic()
        os.kill(second.pid, signal.SIGKILL)
        while state(second.pid) not in ("Z", "gone"):
            time.sleep(0.0005)
        time.sleep(max(0.0, tick + 0.05 - time.monotonic()))  # let the engine's zmq see it go
        after_ms, unnoticed = (time.monotonic() - tick) * 1000, state(second.pid) == "Z"
        future = engine.submit("for a dead encoder", seed=40 + trial)
        print(f"trial {trial}: request sent {after_ms:.0f} ms after the tick", flush=True)
        try:
            pixel = future.result(timeout=pace.stall_s).images[0].getpixel((0, 0))[0]
        except TimeoutError:
            print(f"trial {trial}: not served within {pace.stall_s:.0f} s (its encoders' reload: {pace})", flush=True)
            os._exit(4)  # a hung engine core cannot be closed; exiting makes the workers clean up
        print(f"trial {trial}: served {pixel}", flush=True)
        if unnoticed and after_ms < 80:  # inside the window: conclusive
            break
    beat("closing", pace.stall_s)
    engine.close()
    print("closed", flush=True)
"""


def test_request_sent_to_a_just_killed_worker_is_served(tmp_path):
    code, out, err, killed = _run_child(LIVELOCK_SCRIPT, [str(tmp_path / "heartbeat.json")], tmp_path)
    print(out)
    assert code is not None, f"the engine hung: {killed}; output:\n{out}"
    assert code == 0, f"child exited with {code}:\n{err[-3000:]}"
    assert "served" in out and "closed" in out
