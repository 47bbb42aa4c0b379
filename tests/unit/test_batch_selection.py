"""Per-stage batching without processes: config validation, batch keys, batch selection."""

from concurrent.futures import Future

import pytest

from dfuse.engine.batching import StageProfile, select_batch, should_wait
from dfuse.engine.config import BatchConfig, EngineConfig
from dfuse.engine.protocol import RequestParams
from dfuse.engine.queues import StageQueue
from dfuse.engine.state import Request
from dfuse.engine.models.sd3 import SD3Spec


def _params(**overrides) -> RequestParams:
    base = dict(prompt="a fox", negative_prompt=None, num_inference_steps=4, guidance_scale=4.5, height=64,
                width=64, seed=0)
    return RequestParams(**{**base, **overrides})


def _request(i, key=("k",), peak=0, priority=0, solo=False, stage="dit") -> Request:
    request = Request(i, _params(seed=i), Future(), priority=priority)
    request.profiles = {stage: StageProfile(key, peak)}
    request.solo = solo
    return request


# --- config ---------------------------------------------------------------------------------
def test_by_default_no_stage_batches():
    config = BatchConfig()
    assert [config.batch_limit(s) for s in ("encoder", "dit", "decoder")] == [1, 1, 1]
    assert EngineConfig().batching == config


def test_one_int_sets_every_stage_and_a_mapping_keeps_the_other_defaults():
    assert dict(BatchConfig(max_batch=3).max_batch) == {"encoder": 3, "dit": 3, "decoder": 3}
    assert dict(BatchConfig(max_batch={"dit": 2}).max_batch) == {"encoder": 8, "dit": 2, "decoder": 4}
    assert BatchConfig(enabled=True, max_batch={"dit": 2}).batch_limit("dit") == 2


@pytest.mark.parametrize("kwargs, field", [
    (dict(enabled="yes"), "batching.enabled"),
    (dict(max_batch=0), r"batching.max_batch.encoder: must be an integer in \[1, 64\]"),
    (dict(max_batch={"dit": 65}), r"batching.max_batch.dit: must be an integer in \[1, 64\]"),
    (dict(max_batch={"vae": 2}), "batching.max_batch: unknown stage"),
    (dict(max_batch=2.5), "batching.max_batch"),
    (dict(max_wait_ms=-1), r"batching.max_wait_ms: must be a number in \[0, 60000\]"),
    (dict(max_wait_ms=True), "batching.max_wait_ms"),
    (dict(max_batch_gib=0), "batching.max_batch_gib"),
])
def test_bad_values_name_the_field_and_range(kwargs, field):
    with pytest.raises(ValueError, match=field):
        BatchConfig(**kwargs)


def test_engine_config_checks_the_type_and_sizes_pools_for_a_batch():
    with pytest.raises(ValueError, match="batching: must be a BatchConfig"):
        EngineConfig(batching={"enabled": True})
    off = EngineConfig()
    on = EngineConfig(batching=BatchConfig(enabled=True, max_batch={"encoder": 8, "dit": 2}))
    assert [off.slots_per_worker(s) for s in ("encoder", "dit", "decoder")] == [3, 3, 3]
    assert [on.slots_per_worker(s) for s in ("encoder", "dit", "decoder")] == [9, 3, 5]


# --- keys -----------------------------------------------------------------------------------
def test_keys_group_what_one_diffusers_call_can_take():
    family = SD3Spec()
    key = family.batch_key
    a = _params()
    # Encoder: any prompts, as long as negatives are encoded for all or for none.
    assert key("encoder", a) == key("encoder", _params(prompt="a dog", height=128, num_inference_steps=9))
    assert key("encoder", a) != key("encoder", _params(guidance_scale=1.0))
    # DiT: one size, step count and guidance per call; prompts and seeds may differ.
    assert key("dit", a) == key("dit", _params(prompt="a dog", seed=5, negative_prompt="blurry"))
    for other in (dict(height=128), dict(width=96), dict(num_inference_steps=2), dict(guidance_scale=7.0)):
        assert key("dit", a) != key("dit", _params(**other)), other
    # Decoder: one latent shape; a tiled decode (memory is short) is never batched.
    assert key("decoder", a) == key("decoder", _params(num_inference_steps=9, guidance_scale=1.0))
    assert key("decoder", a) != key("decoder", _params(width=96))
    assert key("decoder", _params(vae_tiling=True)) is None


# --- selection ------------------------------------------------------------------------------
def _queue(*requests) -> list:
    queue = StageQueue()
    for request in requests:
        queue.push(request)
    return queue.in_order()


def test_the_head_decides_the_key_and_later_matches_join_in_queue_order():
    a, b, c, d = _request(0, "64"), _request(1, "96"), _request(2, "64"), _request(3, "64")
    assert select_batch(_queue(d, c, b, a), "dit", 2, None) == [a, c]
    assert select_batch(_queue(b, a, c), "dit", 4, None) == [a, c]


def test_priority_picks_the_head_and_it_is_never_skipped():
    low, high = _request(0, "64"), _request(1, "96", priority=5)
    assert select_batch(_queue(low, high), "dit", 4, None) == [high]


def test_limit_one_solo_and_unbatchable_heads_go_alone():
    a, b = _request(0), _request(1)
    assert select_batch(_queue(a, b), "dit", 1, None) == [a]
    assert select_batch(_queue(_request(2, solo=True), b), "dit", 4, None)[1:] == []
    assert select_batch(_queue(a, _request(3, solo=True)), "dit", 4, None) == [a]
    assert select_batch(_queue(_request(4, key=None), b), "dit", 4, None)[1:] == []


def test_cancelled_requests_do_not_join():
    a, b, c = _request(0), _request(1), _request(2)
    b.future.cancel()
    assert select_batch(_queue(a, b, c), "dit", 4, None) == [a, c]


def test_memory_cap_bounds_the_batch_but_never_refuses_the_head():
    big, small1, small2 = _request(0, peak=60), _request(1, peak=30), _request(2, peak=50)
    assert select_batch(_queue(big, small1, small2), "dit", 4, 100) == [big, small1]  # 60+30; +50 > 100
    huge = _request(3, peak=500, priority=1)  # alone over the cap: admission let it in, it runs alone
    assert select_batch(_queue(huge, small1), "dit", 4, 100) == [huge]


def test_partial_batches_wait_only_when_asked_and_only_until_the_deadline():
    a = _request(0)
    a.queued_at = 100.0
    assert should_wait([a], "dit", 4, 0.0, now=100.0) is None  # default: no added latency
    assert should_wait([a], "dit", 4, 0.5, now=100.1) == 100.5
    assert should_wait([a], "dit", 4, 0.5, now=100.6) is None  # waited enough: send
    assert should_wait([a, _request(1)], "dit", 2, 0.5, now=100.1) is None  # full
    a.solo = True
    assert should_wait([a], "dit", 4, 0.5, now=100.1) is None


def test_producers_get_a_slot_for_every_task_their_consumers_may_hold():
    # 1:2:1: each DiT may hold two encoder slots (one computing, one queued): 2 x 2 + 1.
    static = EngineConfig(instances={"encoder": 1, "dit": 2, "decoder": 1})
    assert [static.slots_per_worker(s) for s in ("encoder", "dit", "decoder")] == [5, 3, 3]
    # Elastic on one device: any worker may become a producer for up to 4 - 2 = 2 consumers...
    elastic = EngineConfig(instances={"encoder": 1, "dit": 2, "decoder": 1}, policy="elastic")
    assert elastic.max_consumers("encoder") == 2 and elastic.max_consumers("decoder") == 1
    # ...and its pool, which it keeps through moves, is sized for the stage that needs most.
    assert [elastic.slots_per_worker(s) for s in ("encoder", "dit", "decoder")] == [5, 5, 5]
