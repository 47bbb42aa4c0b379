"""Stage queue order without processes: priority first; a deadline moves a request ahead only
as it nears and by a bounded lead, so requests without one are never starved."""

from concurrent.futures import Future

import pytest

from dfuse.engine.batching import StageProfile, select_batch
from dfuse.engine.protocol import RequestParams
from dfuse.engine.queues import DEADLINE_LEAD_S, StageQueue
from dfuse.engine.state import Request

LEAD = DEADLINE_LEAD_S


def _request(i, queued_at, deadline=None, priority=0) -> Request:
    params = RequestParams("a fox", None, 4, 4.5, 64, 64, i)
    request = Request(i, params, Future(), priority=priority, deadline=deadline)
    request.queued_at = queued_at
    request.profiles = {"dit": StageProfile(("k",), 0)}
    return request


def _order(*requests) -> list[int]:
    queue = StageQueue()
    for request in requests:
        queue.push(request)
    return [r.id for r in queue.in_order()]


def test_a_steady_stream_of_deadline_requests_does_not_starve_an_earlier_one_without():
    # One service a second, two arrivals a second, each with a 1 s timeout: the stage is
    # overloaded with deadline requests for the whole run. The request without a deadline,
    # queued first, is overtaken only by what arrived within LEAD of it.
    queue, waiting = StageQueue(), _request(0, queued_at=0.0)
    queue.push(waiting)
    served_at, next_id = None, 1
    for tick in range(200):  # 0.5 s ticks, 100 s
        now = tick * 0.5
        queue.push(_request(next_id, queued_at=now, deadline=now + 1.0))
        next_id += 1
        if tick % 2 == 0 and queue.pop() is waiting:
            served_at = now
            break
    assert served_at is not None, "starved for 100 s"
    # Ahead of it: the arrivals in [0, LEAD) at two a second, served one a second.
    assert served_at <= 2 * LEAD + 1.0


def test_a_near_deadline_goes_ahead_of_later_arrivals_and_recent_earlier_ones():
    early = _request(0, queued_at=0.0)
    urgent = _request(1, queued_at=1.0, deadline=1.5)
    later = [_request(2, queued_at=2.0), _request(3, queued_at=2.5, deadline=100.0)]
    assert _order(later[1], early, later[0], urgent) == [1, 0, 2, 3]


def test_earliest_deadline_first_among_near_ones():
    a, b = _request(0, queued_at=0.0, deadline=3.0), _request(1, queued_at=0.5, deadline=2.0)
    assert _order(a, b) == [1, 0]


def test_a_far_deadline_is_not_a_priority_knob():
    plain = _request(0, queued_at=0.0)
    far = _request(1, queued_at=0.1, deadline=0.1 + 10 * LEAD)
    assert _order(far, plain) == [0, 1]


def test_the_lead_is_bounded_an_old_request_is_not_overtaken_by_late_arrivals():
    old = _request(0, queued_at=0.0)
    late_urgent = _request(1, queued_at=LEAD + 0.1, deadline=LEAD + 0.2)  # deadline already at hand
    assert _order(late_urgent, old) == [0, 1]


def test_priority_still_comes_first():
    urgent_low = _request(0, queued_at=0.0, deadline=0.1)
    high = _request(1, queued_at=9.0, priority=5)
    assert _order(urgent_low, high) == [1, 0]


def test_without_priorities_or_deadlines_it_is_fifo_and_a_put_back_request_keeps_its_place():
    requests = [_request(i, queued_at=float(i)) for i in range(5)]
    queue = StageQueue()
    for request in reversed(requests):
        queue.push(request)
    head = queue.pop()
    queue.push(_request(9, queued_at=10.0))
    queue.push(head)  # its worker died: queued_at is unchanged
    assert [r.id for r in queue.in_order()] == [0, 1, 2, 3, 4, 9]


def test_batching_starts_from_the_head_the_queue_serves():
    plain, urgent, other = _request(0, 0.0), _request(1, 1.0, deadline=1.2), _request(2, 2.0)
    queue = StageQueue()
    for request in (plain, other, urgent):
        queue.push(request)
    assert queue.peek() is urgent
    assert select_batch(queue.in_order(), "dit", 3, None) == [urgent, plain, other]


def test_a_negative_lead_is_refused():
    with pytest.raises(ValueError, match="deadline_lead_s"):
        StageQueue(deadline_lead_s=-1.0)
