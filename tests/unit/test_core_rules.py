"""The engine core's rules, with no worker process: dispatch, recovery, moves and deadlines, as
the real EngineCore applies them to workers the test plays (tests/core_harness.py)."""

import os
import socket
import time

import pytest
import zmq

from dfuse.engine import protocol as wire
from dfuse.engine.state import RequestFailed, RequestTimeout
from dfuse.engine.transport.tcp import FrameSigner, SlotClient, SlotServer, new_secret
from dfuse.engine.transport.shm_files import list_segments

from core_harness import CoreHarness

TWO_DITS = {"encoder": 1, "dit": 2, "decoder": 1}


def _through_encoder(h):
    """The encoder computes every task it is sent until its queue is empty."""
    (encoder,) = h.ids("encoder")
    while tasks := h.tasks(encoder):
        for task in tasks:
            h.done(encoder, task)
    h.settle()


def _dit_computing(h):
    """The one request submitted goes through the encoder to one of two DiTs: (the DiT that has
    it, the other, its task)."""
    _through_encoder(h)
    first, second = h.ids("dit")
    on_first = h.tasks(first)
    (task,) = on_first + h.tasks(second)
    return (first, second, task) if on_first else (second, first, task)


@pytest.mark.parametrize("rule, expected", [("earliest-finish", "AAB"), ("fewest-in-flight", "ABA")])
def test_tasks_go_to_the_worker_predicted_to_finish_first(rule, expected):
    """A DiT measured three times as fast takes two of three tasks before the slow one gets its
    first: its second finishes sooner than the slow one's first would. Blind to speed, the
    baseline rule alternates."""
    with CoreHarness(instances=TWO_DITS, dispatch=rule) as h:
        h.ready()
        fast, slow = h.ids("dit")
        warm = [h.submit(seed) for seed in (1, 2)]
        _through_encoder(h)
        (on_fast,), (on_slow,) = h.tasks(fast), h.tasks(slow)  # one each while nothing is measured
        h.done(fast, on_fast, compute_s=0.1)
        h.done(slow, on_slow, compute_s=0.3)
        h.serve(*warm)
        batch = [h.submit(seed) for seed in (3, 4, 5)]
        _through_encoder(h)
        taken = {t.request_id: "A" for t in h.tasks(fast)} | {t.request_id: "B" for t in h.tasks(slow)}
        assert "".join(taken[r.id] for r in batch) == expected


def test_a_dead_workers_requests_go_to_its_replacement_and_only_the_computing_one_is_charged():
    with CoreHarness() as h:
        h.ready()
        (dit,) = h.ids("dit")
        first, second = h.submit(1), h.submit(2)
        _through_encoder(h)
        sent = h.tasks(dit)
        assert [t.request_id for t in sent] == [first.id, second.id]  # one computing, one queued behind
        h.die(dit)
        replacement = h.spawned[-1]
        assert (replacement.worker_id, replacement.stage, replacement.generation) == (dit, "dit", 2)
        assert h.tasks(dit) == []  # nothing for it before it has loaded
        h.ready(dit)
        again = h.tasks(dit)
        assert [(t.request_id, t.inputs) for t in again] == [(t.request_id, t.inputs) for t in sent]  # same inputs
        assert (first.attempts, second.attempts) == (1, 0)
        h.serve(first, second)
        for request in (first, second):
            assert (request.future.result(5)[0] == request.params.seed).all()


def test_a_request_whose_workers_keep_dying_fails_and_the_one_behind_it_is_served():
    with CoreHarness(max_attempts=2) as h:
        h.ready()
        (dit,) = h.ids("dit")
        poison, innocent = h.submit(1), h.submit(2)
        _through_encoder(h)
        for _ in range(2):
            assert [t.request_id for t in h.tasks(dit)] == [poison.id, innocent.id]
            h.die(dit)
            h.ready(dit)
        with pytest.raises(RequestFailed, match="died 2 times"):
            poison.future.result(5)
        h.serve(innocent)
        assert (innocent.future.result(5)[0] == 2).all()
        assert innocent.attempts == 0


def test_a_request_whose_inputs_on_another_node_cannot_be_read_starts_over_then_fails_clearly():
    """A consumer that cannot read its inputs from another node (that node left before the
    engine saw it go) does not fail the request: it starts over from the first stage, on what is
    left. A link that never works fails it after max_attempts, saying so."""
    with CoreHarness(max_attempts=2) as h:
        h.ready()
        (dit,), (decoder,) = h.ids("dit"), h.ids("decoder")
        request = h.submit(1)
        for _ in range(2):
            _through_encoder(h)  # the request is there again: it started over
            (task,) = h.tasks(dit)
            h.done(dit, task)
            (task,) = h.tasks(decoder)
            h.worker(decoder).unanswered.remove(task)
            h.worker(decoder).say(wire.StageFailed(decoder, task.request_id, "could not read its inputs: refused",
                                                   inputs_unreachable=True))
            h.settle()
        with pytest.raises(RequestFailed, match="could not read request .* inputs from another node 2 times"):
            request.future.result(5)


def _refused_address() -> str:
    """Where nothing listens: a connection there is refused at once, as on a node that left."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"tcp://127.0.0.1:{s.getsockname()[1]}"


def test_pixels_on_a_node_that_left_before_they_were_read_start_the_request_over_then_fail_clearly():
    """The decoder's node leaves between its StageDone and the engine reading the pixels from
    there: the request does not fail but starts over, and its image comes from the node that
    serves it then (a real slot server over TCP). A node that never answers fails the request
    after max_attempts, saying so."""
    secret = new_secret()
    with CoreHarness(max_attempts=2) as h:
        h.ready()
        (dit,), (decoder,) = h.ids("dit"), h.ids("decoder")
        pool = h.core.workers[decoder].pool
        h.core._remote_reader = SlotClient(FrameSigner(secret))  # the copy-out thread's, as on a cluster
        server = SlotServer("127.0.0.1", FrameSigner(secret), lambda name: pool.segment.data if name == pool.name else None)
        try:
            pool.served_at = _refused_address()  # the decoder's node is gone
            request = h.submit(7)
            _through_encoder(h)
            (task,) = h.tasks(dit)
            h.done(dit, task)
            (task,) = h.tasks(decoder)
            h.done(decoder, task)
            h.until(lambda: request.attempts == 1, turns=5000)  # the copy-out thread reads over TCP: up to ~10 s
            assert not request.future.done()  # it started over
            pool.served_at = server.address  # served again (a new decoder there, in the engine's eyes)
            h.serve(request, turns=5000)
            assert (request.future.result(5)[0] == 7).all()
            assert (h.core._stats.completed, h.core._stats.failed) == (1, 0)

            pool.served_at = _refused_address()
            never = h.submit(8)
            h.serve(never, turns=5000)
            with pytest.raises(RequestFailed, match="the engine could not read request .* pixels from another node 2 times"):
                never.future.result(5)
            assert (h.core._stats.completed, h.core._stats.failed) == (1, 1)

            cancelled = h.submit(9)  # its caller cancels once the decoder is done: it is dropped, not retried
            _through_encoder(h)
            (task,) = h.tasks(dit)
            h.done(dit, task)
            (task,) = h.tasks(decoder)
            h.done(decoder, task)
            assert cancelled.future.cancel()
            h.until(lambda: pool.free == pool.n_slots, turns=5000)  # the copy-out thread tried, and gave the slot back
            h.settle()
            assert cancelled.attempts == 0 and h.tasks(h.ids("encoder")[0]) == []
            assert (h.core._stats.completed, h.core._stats.failed) == (1, 1)
        finally:
            server.close()
            h.core._remote_reader.close()


def test_a_move_waits_for_its_outputs_to_be_read_then_switches_in_its_own_process():
    with CoreHarness(instances=TWO_DITS) as h:
        h.ready()
        first = h.submit(1)
        mover, stays, task = _dit_computing(h)
        assert task.request_id == first.id
        h.core._start_moves([(mover, "encoder")], reason="asked", strict=True)
        second = h.submit(2)
        _through_encoder(h)
        assert [t.request_id for t in h.tasks(stays)] == [second.id]  # a mover takes no new work
        h.done(mover, task)
        h.settle()
        assert h.sent(mover, wire.Become) == []  # its output is not read yet
        (decoder,) = h.ids("decoder")
        (decode,) = [t for t in h.tasks(decoder) if t.request_id == first.id]
        h.done(decoder, decode)
        h.settle()
        assert [m.stage for m in h.sent(mover, wire.Become)] == ["encoder"]
        processes = len(h.spawned)
        h.ready(mover)  # the same process, in its new stage
        assert len(h.spawned) == processes and h.core.workers[mover].stage == "encoder"
        third, fourth = h.submit(3), h.submit(4)  # the first encoder takes one, the mover the other
        assert [t.params.seed for t in h.tasks(mover)] == [4]
        h.serve(third, fourth)
        assert (third.future.result(5)[0] == 3).all() and (fourth.future.result(5)[0] == 4).all()


def test_a_worker_killed_mid_move_comes_back_in_its_new_role_and_loses_nothing():
    with CoreHarness(instances=TWO_DITS) as h:
        h.ready()
        request = h.submit(1)
        mover, stays, _ = _dit_computing(h)
        h.core._start_moves([(mover, "decoder")], reason="asked", strict=True)
        h.die(mover)
        assert h.spawned[-1].stage == "decoder" and h.spawned[-1].worker_id == mover
        h.ready(mover)
        assert h.core.workers[mover].stage == "decoder"
        assert [t.request_id for t in h.tasks(stays)] == [request.id]  # the DiT left runs it again
        h.serve(request)
        assert (request.future.result(5)[0] == 1).all()
        assert request.attempts == 1


def test_a_computing_request_past_its_deadline_fails_its_caller_and_its_worker_is_told_to_stop():
    with CoreHarness() as h:
        h.ready()
        (encoder,) = h.ids("encoder")
        late = h.submit(1, deadline_s=0.05)
        (task,) = h.tasks(encoder)
        time.sleep(0.1)
        h.turn(health=True)
        with pytest.raises(RequestTimeout, match="deadline in the encoder stage"):
            late.future.result(5)
        assert [m.request_id for m in h.sent(encoder, wire.CancelTask)] == [late.id]
        h.fail(encoder, task)  # it stopped: its slot comes back
        pool = h.core.workers[encoder].pool
        h.until(lambda: pool.free == pool.n_slots)
        served = h.submit(2)
        h.serve(served)
        assert (served.future.result(5)[0] == 2).all()


def test_requests_wait_for_a_worker_still_loading_and_fail_once_none_of_their_stage_can_come():
    """One DiT keeps dying as it loads (e.g. its node's memory is gone) while the other still
    loads (e.g. on a node that came back): the queue waits for the second; when it dies loading
    too, nothing can serve the stage and the requests fail with the reason."""
    with CoreHarness(instances=TWO_DITS, max_attempts=1) as h:
        h.ready()
        a, b = h.ids("dit")
        h.die(a)
        h.die(b)  # both replaced: both load again
        first = h.submit(1)
        _through_encoder(h)
        h.die(a)  # dies while loading, max_attempts times in a row
        h.settle()
        assert first in h.core._queues["dit"]  # not failed: b may still serve it
        h.ready(b)
        h.serve(first)
        assert (first.future.result(5)[0] == 1).all()
        h.die(b)
        second = h.submit(2)
        _through_encoder(h)
        h.die(b)  # now b dies while loading too, and a waits out its back-off: no DiT can come now
        with pytest.raises(RequestFailed, match="no dit worker is ready: worker .* died 1 times in a row while loading"):
            second.future.result(5)


def test_a_device_giving_up_a_stage_drains_it_then_its_process_socket_and_pool_go():
    """cpu:0 stops decoding and cpu:1 starts: the new decoder starts at once on its own device,
    the old one finishes the request it holds, then leaves with its pool and socket file."""
    with CoreHarness(devices=["cpu:0", "cpu:1"], placement={"cpu:0": ["encoder", "decoder"], "cpu:1": ["dit"]}) as h:
        h.ready()
        (encoder,), (dit,), (old,) = h.ids("encoder"), h.ids("dit"), h.ids("decoder")
        first = h.submit(1)
        _through_encoder(h)
        (task,) = h.tasks(dit)
        h.done(dit, task)
        (decode,) = h.tasks(old)
        h.core._start_moves([], starts=[("cpu:1", "decoder")], stops=[old], reason="asked", strict=True)
        new = h.spawned[-1]
        assert (new.stage, new.device) == ("decoder", "cpu:1") and new.worker_id not in (encoder, dit, old)
        leaving, pool = h.worker(old).process, h.core.workers[old].pool.name
        socket_file = h.core.workers[old].socket.getsockopt_string(zmq.LAST_ENDPOINT).removeprefix("ipc://")
        h.ready(new.worker_id)
        h.settle()
        assert old in h.core.workers and not leaving.stop_asked  # it still holds the first request
        assert pool in list_segments() and os.path.exists(socket_file)
        h.done(old, decode)
        h.until(lambda: old not in h.core.workers)
        assert (first.future.result(5)[0] == 1).all()
        assert leaving.stop_asked and pool not in list_segments() and not os.path.exists(socket_file)
        assert [m.name for m in h.sent(encoder, wire.ClosePool)] == [pool]  # its readers let go of it
        second = h.submit(2)
        h.serve(second)
        assert [t.request_id for t in h.worker(new.worker_id).received if isinstance(t, wire.StageTask)] == [second.id]


def test_a_worker_waiting_to_be_replaced_misses_nothing_and_stops_nothing():
    """A dead DiT whose replacement must wait (a removed worker's process on its device has not
    exited yet; or, on a cluster, its node is gone) is not there to be told that another
    worker's pool went: the engine serves on, and the DiT hears what it must once it is back."""
    placement = {"cpu:0": ["encoder", "decoder"], "cpu:1": ["encoder", "dit", "decoder"]}
    with CoreHarness(devices=["cpu:0", "cpu:1"], placement=placement) as h:
        h.ready()
        (_, encoder), (dit,), (_, decoder) = h.ids("encoder"), h.ids("dit"), h.ids("decoder")
        h.core._start_moves([], stops=[decoder], reason="asked", strict=True)
        h.until(lambda: decoder not in h.core.workers)  # its process is leaving cpu:1
        h.die(dit)  # its replacement waits for that process to exit
        h.core._start_moves([], stops=[encoder], reason="asked", strict=True)
        h.until(lambda: encoder not in h.core.workers)  # every worker is told its pool went
        deadline = time.monotonic() + 5
        while h.core.workers[dit].process is None and time.monotonic() < deadline:
            time.sleep(0.02)
            h.turn(health=True)
        h.ready(dit)
        request = h.submit(3)
        h.serve(request)
        assert (request.future.result(5)[0] == 3).all()


def test_requests_waiting_for_a_stage_lost_with_its_node_start_over_on_a_fused_worker():
    """The DiT's node left (the cluster says so) while a request waited for it; the device left
    turns fused: the request starts over there rather than wait for the lost DiT."""
    with CoreHarness(devices=["cpu:0", "cpu:1"], placement={"cpu:0": ["encoder", "decoder"], "cpu:1": ["dit"]}) as h:
        (encoder,), (dit,), (decoder,) = h.ids("encoder"), h.ids("dit"), h.ids("decoder")
        h.ready(encoder, decoder)  # the DiT never comes: its node is gone
        h.core._lost_devices = lambda: frozenset({"cpu:1"})  # what the engine's RayCluster reports
        request = h.submit(4)
        _through_encoder(h)
        assert len(h.core._queues["dit"]) == 1
        h.core._start_moves([(encoder, "encoder+dit+decoder")], stops=[decoder], reason="asked", strict=True)
        for _ in range(50):  # health passes: the stranded request leaves the DiT's queue, the encoder drains
            h.turn(health=True)
            if h.core.workers[encoder].stage == "encoder+dit+decoder":
                break
        h.ready(encoder)
        h.serve(request)
        assert (request.future.result(5)[0] == 4).all()
        assert request.timings["dit"].worker_id == encoder  # served whole by the fused worker


def test_a_replacement_that_never_says_ready_is_killed_after_startup_timeout_and_started_again():
    with CoreHarness(startup_timeout_s=30) as h:
        h.ready()
        (dit,) = h.ids("dit")
        h.die(dit)
        stuck = h.worker(dit).process  # loads forever (a hung filesystem)
        request = h.submit(1)
        _through_encoder(h)
        h.turn(health=True)
        assert stuck.exitcode is None  # loading for less than startup_timeout_s: left alone
        h.core.workers[dit].loading_since -= 31  # as if 31 s had passed
        h.turn(health=True)
        assert stuck.exitcode == -9  # killed
        h.turn(health=True)
        assert h.worker(dit).process is not stuck and h.spawned[-1].generation == 3
        h.ready(dit)
        h.serve(request)
        assert (request.future.result(5)[0] == 1).all()


def test_a_silent_workers_queued_task_goes_to_another_and_its_late_answer_only_frees_the_slot():
    with CoreHarness(instances=TWO_DITS) as h:
        h.ready()
        a, b = h.ids("dit")
        first, second, third = h.submit(1), h.submit(2), h.submit(3)
        _through_encoder(h)
        on_a = [t for t in h.tasks(a)]
        on_b = [t for t in h.tasks(b)]
        if len(on_a) < 2:  # name the worker holding two tasks (one computing, one queued) `a`
            (a, on_a), (b, on_b) = (b, on_b), (a, on_a)
        computing, queued = on_a
        h.core.workers[a].last_heard -= 5  # silent for 5 s: past 3 heartbeats, short of heartbeat_timeout_s
        h.turn(health=True)
        assert [t.request_id for t in h.tasks(b)] == [queued.request_id]  # the queued one, not the computing one
        pool = h.core.workers[a].pool
        held = pool.n_slots - pool.free
        h.done(a, queued)  # a wakes up and answers the task it was relieved of
        h.settle()
        assert pool.n_slots - pool.free == held - 1  # only its slot comes back; the request is b's
        h.serve(first, second, third)
        for request in (first, second, third):
            assert (request.future.result(5)[0] == request.params.seed).all()
        assert h.core.stats("m", "f").completed == 3
