"""A multi-prompt submit is one future: it fails as soon as one prompt fails (the others are
cancelled, not computed for nothing) and a cancel of the whole cancels every prompt."""

from concurrent.futures import Future
from types import SimpleNamespace

import numpy as np
import pytest

from dfuse.engine.completions import UserCallbacks, UserFuture
from dfuse.engine.engine import _gather
from dfuse.engine.state import RequestFailed


CALLBACKS = UserCallbacks()


def _requests(n):
    return [SimpleNamespace(future=Future(), params=SimpleNamespace(seed=i), warnings=[]) for i in range(n)]


def test_the_first_failure_fails_the_submit_at_once_and_cancels_the_rest():
    requests = _requests(3)
    outer = _gather(requests, UserFuture(CALLBACKS, key=object()))
    requests[1].future.set_exception(RequestFailed("decoder ran out of memory"))
    assert outer.done()
    with pytest.raises(RequestFailed, match="out of memory"):
        outer.result(0)
    assert requests[0].future.cancelled() and requests[2].future.cancelled()


def test_all_prompts_done_gives_their_images_in_order():
    requests = _requests(2)
    requests[1].warnings.append("the prompt is longer than CLIP's 77 tokens")
    outer = _gather(requests, UserFuture(CALLBACKS, key=object()))
    for i, request in enumerate(requests):
        request.future.set_result((np.full((4, 4, 3), i, np.uint8), {"dit": i}))
    result = outer.result(0)
    assert [np.array(image)[0, 0, 0] for image in result.images] == [0, 1] and result.seeds == [0, 1]
    assert result.warnings == [[], ["the prompt is longer than CLIP's 77 tokens"]]  # per prompt, in order


def test_cancelling_the_submit_cancels_every_prompt():
    requests = _requests(2)
    outer = _gather(requests, UserFuture(CALLBACKS, key=object()))
    assert outer.cancel()
    assert all(r.future.cancelled() for r in requests)
