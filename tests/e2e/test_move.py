"""Moving a worker between stages while requests flow loses nothing and changes no image."""

import time

import numpy as np
import pytest

from dfuse import Engine
from dfuse.engine.config import EngineConfig

from process_utils import alive, wait_until

PARAMS = dict(num_inference_steps=3, guidance_scale=4.5, height=64, width=64)


def test_move_under_load_loses_nothing(model_path, reference):
    # The speed-blind dispatch rule, so that the tie below is decided by worker id alone (the
    # default rule would weigh the two decoders' measured speeds, which this test is not about).
    config = EngineConfig(model=str(model_path), cpu_threads=1, instances={"encoder": 1, "dit": 2, "decoder": 1},
                          dispatch="fewest-in-flight")
    with Engine(config=config) as engine:
        before = {w.id: w for w in engine.stats().workers}
        futures = [engine.submit("a red fox", seed=300 + i, **PARAMS) for i in range(12)]
        engine.move(2, "decoder")  # the second DiT worker becomes a second decoder, mid-stream
        futures += [engine.submit("a red fox", seed=300 + i, **PARAMS) for i in range(12, 16)]
        for i, future in enumerate(futures):
            image = future.result(timeout=180).images[0]
            assert np.array_equal(np.array(image), reference("a red fox", seed=300 + i, **PARAMS))
        assert wait_until(lambda: engine.stats().workers[2].ready, 60)
        stats = engine.stats()
        assert [w.stage for w in stats.workers] == ["encoder", "dit", "decoder", "decoder"]
        # Switched in place: the same process now holds the decoder (no spawn, no imports).
        assert alive(before[2].pid) and stats.workers[2].pid == before[2].pid
        assert len(stats.switch_s) == 1 and stats.failed == 0
        # The moved worker now decodes.
        results = [engine.submit("a cat", seed=400 + i, **PARAMS).result(timeout=180) for i in range(4)]
        # One at a time, both decoders idle: fewest-in-flight dispatch breaks the tie to worker 2.
        assert {r.timings[0]["decoder"].worker_id for r in results} == {2}
        for i, result in enumerate(results):
            assert np.array_equal(np.array(result.images[0]), reference("a cat", seed=400 + i, **PARAMS))


def test_moves_that_would_stall_a_stage_are_refused():
    with Engine(model="synthetic:encoder=1ms,dit=1ms,decoder=1ms", cpu_threads=1) as engine:
        with pytest.raises(ValueError, match="^worker_id: worker 1 is the last dit worker"):
            engine.move(1, "decoder")
        with pytest.raises(ValueError, match="^stage: must be one of"):
            engine.move(1, "vae")
        with pytest.raises(ValueError, match="^worker_id: no worker 9"):
            engine.move(9, "dit")
        (image,) = engine.generate("x", seed=4)
        assert image.getpixel((0, 0))[0] == 4


def test_a_second_move_of_a_moving_worker_is_refused_to_the_caller_not_dropped():
    """move() returns once the engine core has taken the move: a second move of the same worker
    right after is refused with the reason, never accepted here and dropped there."""
    with Engine(model="synthetic:encoder=1ms,dit=200ms,decoder=1ms", cpu_threads=1,
                instances={"encoder": 1, "dit": 2, "decoder": 1}) as engine:
        busy = [engine.submit("x", seed=i) for i in range(4)]
        deadline = time.monotonic() + 30
        while not engine.stats().workers[1].inflight:  # worker 1 has work: it drains for a while
            assert time.monotonic() < deadline
            time.sleep(0.005)
        engine.move(1, "decoder")
        with pytest.raises(ValueError, match="^worker_id: worker 1 is already moving"):
            engine.move(1, "encoder")
        assert all(f.result(timeout=60).images for f in busy)


def test_a_mover_takes_its_new_stage_only_once_downstream_has_read_its_outputs():
    """DiT worker 1's slots are full of latents waiting for the decoder (worker 3, busy with two
    large images) when worker 1 is moved to the decoder stage. Had it switched at once, its own
    full pool would leave it no slot to decode into, and once worker 3 moved away it would be the
    only decoder: those requests would hang. It must wait until its outputs have been read."""
    with Engine(model="synthetic:encoder=1ms,dit=1ms,decoder=10ms", cpu_threads=1,
                instances={"encoder": 1, "dit": 2, "decoder": 1}) as engine:

        def serves(worker_id, stage):
            worker = engine.stats().workers[worker_id]
            return worker.stage == stage and worker.ready and worker.moving_to is None

        engine.move(1, "encoder")  # for a moment worker 2 is the only DiT: it takes the large ones
        assert wait_until(lambda: serves(1, "encoder"), 60)
        large = [engine.submit("x", height=1024, width=1024, seed=i) for i in range(2)]  # ~2.6 s to decode each
        assert wait_until(lambda: engine.stats().workers[3].inflight == 2, 60)
        engine.move(1, "dit")
        assert wait_until(lambda: serves(1, "dit"), 60)
        small = []
        for i in range(3):  # one at a time, so each goes to worker 1: both DiTs idle, lowest id
            small.append(engine.submit("x", seed=10 + i))
            assert wait_until(lambda: engine.stats().queues["decoder"] == i + 1, 60)
        assert engine.stats().workers[1].free_slots == 0
        engine.move(1, "decoder")
        assert wait_until(lambda: serves(1, "decoder"), 60)
        engine.move(3, "dit")  # legal: worker 1 serves the decoder stage now
        for seed, future in enumerate(large):
            assert future.result(timeout=60).images[0].getpixel((0, 0))[0] == seed
        for i, future in enumerate(small):
            assert future.result(timeout=60).images[0].getpixel((0, 0))[0] == 10 + i
        assert wait_until(lambda: serves(3, "dit"), 60)
        assert engine.generate("x", seed=99)[0].getpixel((0, 0))[0] == 99
