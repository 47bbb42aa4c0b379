"""The elastic policy in the live engine: it moves a worker toward the bottleneck when the
workload shifts, never while the workload is steady, and every request keeps its image.

The synthetic family (stages/families/synthetic.py) in sleep mode stands in for stages on
their own GPUs: its costs scale with steps and pixels like real stages, without two CPU cores'
contention deciding where the bottleneck is.
"""

import os
import signal
import threading
import time

from dfuse import Engine
from dfuse.engine.config import EngineConfig
from dfuse.engine.elastic import ElasticConfig

from open_loop import OpenLoop
from process_utils import wait_until

# Costs at 4 steps and 64x64 px; the DiT scales with steps x pixels, the decoder with pixels.
MODEL = "synthetic:encoder=5ms,dit=40ms,decoder=30ms"
# 8 steps at 64 px: DiT 80 ms on 2 workers (25 req/s) vs decoder 30 ms (33 req/s): 1:2:1 is best.
DIT_BOUND = dict(num_inference_steps=8, height=64, width=64)
# 1 step at 128 px: DiT 40 ms on 2 workers (50 req/s) vs decoder 120 ms (8 req/s): 1:1:2 doubles it.
DECODER_BOUND = dict(num_inference_steps=1, height=128, width=128)
FAST = ElasticConfig(interval_s=0.5, window_s=4, min_arrivals=10, dwell_s=5, payback_s=10, confirm_s=2)


def test_elastic_moves_toward_the_new_bottleneck_and_not_while_steady():
    config = EngineConfig(model=MODEL, instances={"encoder": 1, "dit": 2, "decoder": 1}, cpu_threads=1,
                          policy="elastic", elastic=FAST)
    with Engine(config=config) as engine:
        load = OpenLoop(engine)
        # Steady, ~70% of the bottleneck: 16 controller intervals, no move (no thrash).
        load.feed(rate=18, seconds=8, **DIT_BOUND)
        assert engine.stats().moves == []

        # The bottleneck moves to the decoder: a DiT worker must become a decoder.
        shift_at = time.monotonic()
        load.feed(rate=12, seconds=20, until=lambda: engine.stats().moves, **DECODER_BOUND)
        moves = engine.stats().moves
        assert moves, "no move within 40 controller intervals of the shift"
        assert (moves[0].from_stage, moves[0].to_stage) == ("dit", "decoder")
        assert moves[0].reason == "elastic"
        assert wait_until(lambda: engine.stats().instances == {"encoder": 1, "dit": 1, "decoder": 2}, 30)
        # It keeps serving the new mix on the new placement: no move back.
        load.feed(rate=12, seconds=3, **DECODER_BOUND)
        served = load.check_all()
        stats = engine.stats()
        assert stats.completed == served and stats.failed == 0
        assert [(m.from_stage, m.to_stage) for m in stats.moves] == [("dit", "decoder")]
        # Move times count from the engine's start, like uptime_s: the move came after the shift.
        assert stats.uptime_s - (time.monotonic() - shift_at) < moves[0].t_s < stats.uptime_s
        assert len(stats.switch_s) == 1


def test_static_policy_never_moves():
    config = EngineConfig(model=MODEL, instances={"encoder": 1, "dit": 2, "decoder": 1}, cpu_threads=1,
                          policy="static", elastic=FAST)
    with Engine(config=config) as engine:
        load = OpenLoop(engine)
        load.feed(rate=12, seconds=4, **DECODER_BOUND)
        served = load.check_all()
        stats = engine.stats()
        assert stats.moves == [] and stats.policy == "static"
        assert stats.instances == {"encoder": 1, "dit": 2, "decoder": 1}
        assert stats.placement == {"cpu": ["encoder", "dit", "dit", "decoder"]}
        # Per-stage timings of the recent tasks: the 128 px decode (~120 ms) dwarfs the encode (5 ms).
        assert all(stats.stage_ms[s].tasks == served for s in ("encoder", "dit", "decoder"))
        assert stats.stage_ms["decoder"].p50 > stats.stage_ms["encoder"].p50


def test_a_worker_killed_while_switching_comes_back_in_its_new_stage():
    with Engine(model=MODEL, cpu_threads=1, instances={"encoder": 1, "dit": 2, "decoder": 1}) as engine:
        load = OpenLoop(engine)
        pid = engine.stats().workers[2].pid
        feeder = threading.Thread(target=load.feed, args=(20, 2), kwargs=DIT_BOUND)
        feeder.start()
        engine.move(2, "decoder")
        os.kill(pid, signal.SIGKILL)  # while it drains or switches
        feeder.join()
        load.check_all()
        assert wait_until(lambda: engine.stats().workers[2].ready, 60)
        assert engine.stats().instances == {"encoder": 1, "dit": 1, "decoder": 2}
        assert engine.stats().failed == 0
