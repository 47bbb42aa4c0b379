"""Devices move between stages on a pool of two one-core CPU devices (this machine's stand-in
for two small GPUs): the elastic policy swaps the DiT and the decoder between the devices when
the bottleneck moves, never while the load is steady, and no request is lost or gets another's
image; an asked swap of real stages keeps every image equal to diffusers'.

The synthetic stages burn CPU (mode=burn), so two workers on one core really share it."""

import numpy as np

from dfuse import Engine
from dfuse.engine.config import EngineConfig
from dfuse.engine.elastic import ElasticConfig

from open_loop import OpenLoop
from process_utils import wait_until

# At 8 steps of 64 px: encoder 40 ms, DiT 80 ms, decoder 30 ms: cpu:0 = E+D (70 ms) and cpu:1 = T
# (80 ms) serve 12.5 req/s; E+T and D would serve 8.3. At 1 step of 128 px the DiT costs 40 ms and
# the decoder 120 ms: E+D (160 ms) serves 6.25 req/s, E+T (80 ms) and D (120 ms) 8.3.
MODEL = "synthetic:encoder=40ms,dit=40ms,decoder=30ms,mode=burn"
DIT_BOUND = dict(num_inference_steps=8, height=64, width=64)
DECODER_BOUND = dict(num_inference_steps=1, height=128, width=128)
SPLIT = {"cpu:0": ["encoder", "decoder"], "cpu:1": ["dit"]}
FAST = ElasticConfig(interval_s=0.5, window_s=4, min_arrivals=10, min_gain=0.15, dwell_s=5, payback_s=10, confirm_s=2)


def test_two_devices_swap_dit_and_decoder_when_the_bottleneck_moves():
    config = EngineConfig(model=MODEL, devices=["cpu:0", "cpu:1"], placement=SPLIT, policy="elastic",
                          elastic=FAST)
    with Engine(config=config) as engine:
        load = OpenLoop(engine)
        load.feed(rate=7, seconds=8, **DIT_BOUND)  # ~55% of the split's capacity: nothing to gain by moving
        assert engine.stats().moves == []

        load.feed(rate=6, seconds=30, until=lambda: len(engine.stats().moves) >= 2, **DECODER_BOUND)
        moves = engine.stats().moves
        assert sorted((m.from_stage, m.to_stage) for m in moves) == [("decoder", "dit"), ("dit", "decoder")], moves
        assert wait_until(lambda: engine.stats().placement == {"cpu:0": ["encoder", "dit"], "cpu:1": ["decoder"]}, 60)
        load.feed(rate=6, seconds=3, **DECODER_BOUND)
        served = load.check_all()
        stats = engine.stats()
        assert stats.completed == served and stats.failed == 0
        assert len(stats.moves) == 2, "it moved back, or again"


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
