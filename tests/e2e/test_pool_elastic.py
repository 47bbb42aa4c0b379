"""Devices move between stages on a pool of two one-core CPU devices (this machine's stand-in
for two small GPUs): the elastic policy turns the split devices into whole pipelines when the
bottleneck moves (fused, or every stage as its own worker where fused is off), never while the
load is steady, and no request is lost or gets another's image; asked swaps,
starts and stops of real stages keep every image equal to diffusers', and a stopped worker
leaves nothing behind.

The synthetic stages burn CPU (mode=burn), so two workers on one core really share it."""

import os

import numpy as np
import pytest

from dfuse import Engine
from dfuse.engine.config import EngineConfig
from dfuse.engine.elastic import ElasticConfig

from open_loop import OpenLoop
from process_utils import alive, wait_until

# At 8 steps of 64 px: encoder 40 ms, DiT 80 ms, decoder 30 ms: cpu:0 = E+D (70 ms) and cpu:1 = T
# (80 ms) serve 12.5 req/s, plenty for 7. At 1 step of 128 px the DiT costs 40 ms and the decoder
# 120 ms: E+D (160 ms) serves 6.25 req/s, too few for 6 at the controller's 80% target; every
# stage on both devices serves 2 / 200 ms = 10 (a swap to E+T and D would serve 8.3), fused or not.
MODEL = "synthetic:encoder=40ms,dit=40ms,decoder=30ms,mode=burn"
DIT_BOUND = dict(num_inference_steps=8, height=64, width=64)
DECODER_BOUND = dict(num_inference_steps=1, height=128, width=128)
SPLIT = {"cpu:0": ["encoder", "decoder"], "cpu:1": ["dit"]}
EVERYTHING = {"cpu:0": ["encoder", "dit", "decoder"], "cpu:1": ["encoder", "dit", "decoder"]}
FUSED = "encoder+dit+decoder"
FAST = dict(interval_s=0.5, window_s=4, min_arrivals=10, min_gain=0.15, dwell_s=5, payback_s=10, confirm_s=2)


@pytest.mark.parametrize("fused, placed, made", [
    (True, {"cpu:0": [FUSED], "cpu:1": [FUSED]}, [("decoder", "idle"), ("dit", FUSED), ("encoder", FUSED)]),
    (False, EVERYTHING, [("idle", "decoder"), ("idle", "dit"), ("idle", "encoder")]),
])
def test_the_devices_take_on_the_whole_pipeline_when_the_split_stops_paying(fused, placed, made):
    config = EngineConfig(model=MODEL, devices=["cpu:0", "cpu:1"], placement=SPLIT, policy="elastic",
                          elastic=ElasticConfig(**FAST, fused=fused))
    with Engine(config=config) as engine:
        load = OpenLoop(engine)
        load.feed(rate=7, seconds=8, **DIT_BOUND)  # ~55% of the split's capacity: nothing to gain by moving
        assert engine.stats().moves == []

        load.feed(rate=6, seconds=30, until=lambda: engine.stats().moves, **DECODER_BOUND)
        assert wait_until(lambda: engine.stats().placement == placed, 60), engine.stats().placement
        moves = engine.stats().moves
        assert sorted((m.from_stage, m.to_stage) for m in moves) == made, moves
        load.feed(rate=6, seconds=3, **DECODER_BOUND)
        served = load.check_all()
        stats = engine.stats()
        assert stats.completed == served and stats.failed == 0
        assert len(stats.moves) == 3, "it moved back, or again"


def test_an_asked_swap_of_real_stages_keeps_every_image_equal_to_diffusers(model_path, reference):
    with Engine(model=str(model_path), devices=["cpu:0", "cpu:1"], placement=SPLIT) as engine:
        ids = {(w.device, w.stage): w.id for w in engine.stats().workers}
        futures = [engine.submit("a fox", num_inference_steps=2, seed=seed) for seed in range(6)]
        engine.move({ids["cpu:0", "decoder"]: "dit", ids["cpu:1", "dit"]: "decoder"})
        futures += [engine.submit("a fox", num_inference_steps=2, seed=seed) for seed in range(6, 10)]
        for seed, future in enumerate(futures):
            (image,) = future.result(timeout=180).images
            assert np.array_equal(np.array(image), reference("a fox", num_inference_steps=2, seed=seed)), seed
        assert wait_until(lambda: engine.stats().placement == {"cpu:0": ["encoder", "dit"], "cpu:1": ["decoder"]}, 60)
        (image,) = engine.generate("a fox", num_inference_steps=2, seed=11)
        assert np.array_equal(np.array(image), reference("a fox", num_inference_steps=2, seed=11))


def test_devices_asked_to_grow_then_shrink_serve_every_image_equal_to_diffusers(model_path, reference):
    with Engine(model=str(model_path), devices=["cpu:0", "cpu:1"], placement=SPLIT) as engine:
        submit = lambda seeds: [(s, engine.submit("a fox", num_inference_steps=2, seed=s)) for s in seeds]  # noqa: E731
        futures = submit(range(4))
        engine.place(EVERYTHING)  # three workers start, their weights from the host weight cache
        futures += submit(range(4, 8))
        assert wait_until(lambda: engine.stats().placement == EVERYTHING and all(
            w.ready for w in engine.stats().workers), 120), engine.stats().placement
        futures += submit(range(8, 12))
        grown = {w.id: w.pid for w in engine.stats().workers}
        engine.place(SPLIT)  # and stop again once drained
        futures += submit(range(12, 16))
        for seed, future in futures:
            (image,) = future.result(timeout=180).images
            assert np.array_equal(np.array(image), reference("a fox", num_inference_steps=2, seed=seed)), seed
        assert wait_until(lambda: engine.stats().placement == SPLIT, 60), engine.stats().placement
        stopped = set(grown) - {w.id for w in engine.stats().workers}
        assert len(stopped) == 3
        assert wait_until(lambda: not any(alive(grown[w]) for w in stopped), 30), "a stopped worker is still running"
        assert not [n for n in os.listdir("/dev/shm") if any(n.endswith(f"w{w}") for w in stopped)], \
            "a stopped worker's output pool is left in /dev/shm"
        # Grown again: new workers, new ids and pools (consumers knew the old pools by name).
        engine.place(EVERYTHING)
        assert wait_until(lambda: engine.stats().placement == EVERYTHING and all(
            w.ready for w in engine.stats().workers), 120), engine.stats().placement
        assert not {w.id for w in engine.stats().workers} & stopped, "a stopped worker's id was given again"
        for seed, future in submit(range(16, 24)):
            (image,) = future.result(timeout=180).images
            assert np.array_equal(np.array(image), reference("a fox", num_inference_steps=2, seed=seed)), seed
        stats = engine.stats()
        assert stats.failed == 0 and len(stats.moves) == 9
